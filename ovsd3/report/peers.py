"""The same generation through ovsd3's peers, timed like ovsd3's own (run in child processes).

- openvino.genai's C++ Text2ImagePipeline on the same folder, its TaylorSeer step caching off (every step runs
  the transformer, as ovsd3 and diffusers do) and on (its default for SD3: later steps reuse extrapolated
  transformer outputs, trading exactness for time).
- diffusers' StableDiffusion3Pipeline on the PyTorch model the folder came from, on the CPU, fp32 and bf16.
"""

from __future__ import annotations

import os
from pathlib import Path

from ovsd3.errors import OvsdError, reason_of
from ovsd3.report.stats import timed_batches


def genai_batches(task: dict) -> dict:
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
    caching = config.taylorseer_config

    def call(batch: int, steps: int, seed: int):
        pipe.generate(task["prompt"], width=task["width"], height=task["height"], num_inference_steps=steps,
                      guidance_scale=task["guidance_scale"], num_images_per_prompt=batch, rng_seed=seed,
                      max_sequence_length=task.get("max_sequence_length", 256))

    seconds = timed_batches(task, call)
    # How many transformer calls the last generation made: fewer than its steps when caching skipped some.
    transformer_calls = len(pipe.get_performance_metrics().raw_metrics.transformer_inference_durations)
    return {"seconds": seconds, "transformer_calls": transformer_calls,
            "taylorseer": None if caching is None else {
                "cache_interval": caching.cache_interval,
                "disable_cache_before_step": caching.disable_cache_before_step,
                "disable_cache_after_step": caching.disable_cache_after_step}}


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

    return {"seconds": timed_batches(task, call), "torch": torch.__version__}
