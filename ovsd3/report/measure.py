"""ovsd3's own runtime, measured (run in child processes by :mod:`ovsd3.report.children`)."""

from __future__ import annotations

import time

from ovsd3.report.stats import timed_batches, timed_generations
from ovsd3.runtime import SD3Pipeline


def device_info(pipe: SD3Pipeline) -> dict:
    """Which devices actually ran the transformer (AUTO picks one), with their full names."""
    import openvino as ov

    core = ov.Core()
    devices = list(pipe.transformer.compiled.get_property("EXECUTION_DEVICES"))
    return {"openvino": ov.get_version(), "execution_devices": devices,
            "device_names": {device: core.get_property(device.split(".")[0], "FULL_DEVICE_NAME")
                             for device in devices}}


def _settings(task: dict) -> dict:
    return dict(num_inference_steps=task["steps"], guidance_scale=task["guidance_scale"], width=task["width"],
                height=task["height"], max_sequence_length=task.get("max_sequence_length", 256),
                cache=task.get("cache"))


def _control(path: str | None) -> dict:
    if path is None:
        return {}
    from PIL import Image

    with Image.open(path) as image:
        return {"control_image": image.convert("RGB")}


def generate(task: dict) -> dict:
    """Load without a model cache (first start, compiling), then draw each prompt once, timing each part; with
    ``task["control_images"]`` (a file per prompt), each prompt with its control image."""
    settings = _settings(task)
    # timed_generations draws the prompts in order: the control images are taken in the same order
    controls = iter(task.get("control_images") or [])

    def draw(pipe: SD3Pipeline, prompt: str, seed: int):
        control = next(controls, None)
        started = time.perf_counter()
        job = pipe.prepare(prompt, seed=seed, **settings, **_control(control))
        text_done = time.perf_counter()
        step_seconds, last = [], text_done
        for _ in pipe.steps(job):
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
        image = pipe.decode(job.latents)[0]
        finished = time.perf_counter()
        return image, {"text_seconds": text_done - started, "step_seconds": step_seconds,
                       "decode_seconds": finished - last, "total_seconds": finished - started,
                       "cache": job.cache_stats.as_dict()}

    pipe, measured = timed_generations(
        task, lambda: SD3Pipeline.load(task["folder"], device=task["device"], cache_dir=None),
        lambda pipe: pipe(task["prompts"][0], seed=0, **dict(settings, num_inference_steps=1)), draw)
    return {**measured, **device_info(pipe)}


def first_start(task: dict) -> dict:
    """Seconds to load (read and compile) with the model cache in ``task["cache_dir"]``, then to draw a first
    1-step image: OpenVINO's CPU plugin defers part of its preparation to the first inference, so load time
    alone flatters a model that compiles lazily."""
    started = time.perf_counter()
    pipe = SD3Pipeline.load(task["folder"], device=task["device"], cache_dir=task["cache_dir"])
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pipe(task["prompt"], seed=0, **dict(_settings(task), num_inference_steps=1))
    return {"load_seconds": load_seconds, "first_image_seconds": time.perf_counter() - started}


def batches(task: dict) -> dict:
    """Seconds per call for each batch size (images per call), timed as the peers are."""
    pipe = SD3Pipeline.load(task["folder"], device=task["device"], cache_dir=None)
    settings = _settings(task)

    stats = []

    def call(batch: int, steps: int, seed: int):
        result = pipe(task["prompt"], seed=seed, num_images=batch, **dict(settings, num_inference_steps=steps))
        stats.append(result.cache_stats)

    seconds = timed_batches(task, call)
    # The picture the quality column compares: seed 0 is torch's noise, which every runner draws alike.
    pipe(task["prompt"], seed=0, **settings).images[0].save(task["image_path"])
    return {"seconds": seconds, "cache": str(settings["cache"] or "off"), "transformer_calls": stats[-1].full_calls,
            "work": stats[-1].share, **device_info(pipe)}
