"""The same generation through ovsd3's peers, timed like ovsd3's own (run in child processes).

- openvino.genai's C++ Text2ImagePipeline on the same folder, its TaylorSeer step caching off (every step runs
  the transformer, as ovsd3 and diffusers do) and on (its default for SD3: later steps reuse extrapolated
  transformer outputs, trading exactness for time).
- diffusers' StableDiffusion3Pipeline on the PyTorch model the folder came from, on the CPU, fp32 and bf16.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ovsd3.errors import OvsdError, reason_of
from ovsd3.report.stats import timed_batches, timed_generations


def genai_pipeline(task: dict):
    """genai's Text2ImagePipeline on the task's folder, its TaylorSeer caching on (its defaults) or off."""
    import openvino_genai

    try:
        pipe = openvino_genai.Text2ImagePipeline(str(task["folder"]), task["device"])
    except RuntimeError as error:
        raise OvsdError(f"openvino.genai cannot load {task['folder']}: {reason_of(error)}") from None
    config = pipe.get_generation_config()
    if not task["taylorseer"]:
        config.taylorseer_config = None
    elif config.taylorseer_config is None:
        config.taylorseer_config = openvino_genai.TaylorSeerCacheConfig()
    pipe.set_generation_config(config)
    return pipe


def _generation(task: dict) -> dict:
    """The task's generate() keywords that every genai measurement shares."""
    return {"width": task["width"], "height": task["height"], "guidance_scale": task["guidance_scale"],
            "max_sequence_length": task.get("max_sequence_length", 256)}


def _taylorseer(pipe) -> dict | None:
    caching = pipe.get_generation_config().taylorseer_config
    return None if caching is None else {
        "cache_interval": caching.cache_interval, "disable_cache_before_step": caching.disable_cache_before_step,
        "disable_cache_after_step": caching.disable_cache_after_step}


def genai_generate(task: dict) -> dict:
    """`ovsd3 report`'s measurement (ovsd3.report.measure.generate) of genai: the same prompts and seeds
    (genai's TorchGenerator draws the noise diffusers and ovsd3 draw), each part timed by genai's own metrics."""
    import openvino as ov
    import openvino_genai
    from PIL import Image

    settings = _generation(task)

    def draw(pipe, prompt: str, seed: int):
        started = time.perf_counter()
        pixels = pipe.generate(prompt, num_inference_steps=task["steps"],
                               generator=openvino_genai.TorchGenerator(seed), **settings)
        total = time.perf_counter() - started
        return Image.fromarray(pixels.data[0]), _genai_timings(pipe.get_performance_metrics(), total, task["steps"])

    pipe, measured = timed_generations(
        task, lambda: genai_pipeline(task),
        lambda pipe: pipe.generate(task["prompts"][0], num_inference_steps=1, **settings), draw)
    return {**measured, "taylorseer": _taylorseer(pipe), "openvino": ov.get_version(),
            "execution_devices": [task["device"]], "device_names": {}}


def _genai_timings(metrics, total_seconds: float, steps: int) -> dict:
    """One generation's parts from genai's metrics (milliseconds there), in the report's shape."""
    raw = metrics.raw_metrics
    calls = len(raw.transformer_inference_durations)
    return {"text_seconds": sum(metrics.get_text_encoder_infer_duration().values()) / 1e3,
            "step_seconds": [duration / 1e3 for duration in raw.iteration_durations],
            "decode_seconds": metrics.get_vae_decoder_infer_duration() / 1e3, "total_seconds": total_seconds,
            "cache": {"full_calls": calls, "work": calls, "steps": steps}}


def _genai_picture(pipe, task: dict) -> None:
    """The benchmark's quality picture: seed 0 through TorchGenerator, the noise ovsd3 and diffusers draw."""
    import openvino_genai
    from PIL import Image

    pixels = pipe.generate(task["prompt"], num_inference_steps=task["steps"],
                           generator=openvino_genai.TorchGenerator(0), **_generation(task))
    Image.fromarray(pixels.data[0]).save(task["image_path"])


def genai_batches(task: dict) -> dict:
    pipe = genai_pipeline(task)

    def call(batch: int, steps: int, seed: int):
        pipe.generate(task["prompt"], num_inference_steps=steps, num_images_per_prompt=batch, rng_seed=seed,
                      **_generation(task))

    seconds = timed_batches(task, call)
    # How many transformer calls the last generation made: fewer than its steps when caching skipped some.
    transformer_calls = len(pipe.get_performance_metrics().raw_metrics.transformer_inference_durations)
    _genai_picture(pipe, task)
    return {"seconds": seconds, "transformer_calls": transformer_calls, "taylorseer": _taylorseer(pipe)}


def diffusers_batches(task: dict) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[task["dtype"]]
    without_t5 = {} if task["with_t5"] else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(task["torch_model"], torch_dtype=dtype, **without_t5)
    except Exception as error:  # diffusers raises many kinds: missing files, hub errors, bad configs
        reason = reason_of(error)
        raise OvsdError(f"diffusers cannot load the PyTorch model {task['torch_model']}: {reason}") from None
    # The OpenVINO folder's scheduler (a Flash folder samples stochastically) and its LoRA, merged as convert did.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(Path(task["folder"]) / "scheduler")
    if task.get("flash_lora"):
        from ovsd3.convert.lora import merge_lora, resolve_adapter

        pipe.transformer = merge_lora(pipe.transformer, resolve_adapter(task["flash_lora"])).to(dtype)
    pipe.set_progress_bar_config(disable=True)

    def call(batch: int, steps: int, seed: int):
        with torch.inference_mode():
            pipe(task["prompt"], width=task["width"], height=task["height"], num_inference_steps=steps,
                 guidance_scale=task["guidance_scale"], num_images_per_prompt=batch,
                 generator=torch.Generator().manual_seed(seed), output_type="np",
                 max_sequence_length=task.get("max_sequence_length", 256))

    seconds = timed_batches(task, call)
    with torch.inference_mode():  # the quality picture, as ovsd3 and genai draw it
        pipe(task["prompt"], width=task["width"], height=task["height"], num_inference_steps=task["steps"],
             guidance_scale=task["guidance_scale"], generator=torch.Generator().manual_seed(0),
             max_sequence_length=task.get("max_sequence_length", 256)).images[0].save(task["image_path"])
    return {"seconds": seconds, "torch": torch.__version__}
