"""Where the Flash INT8 pipeline's time goes, against FP16: per component and per kind of operation.

    python benchmarks/int8_ceiling.py FP16_FOLDER INT8_FOLDER [--repeats 3] [--size 512]

Two folders of the same model (for the race's figures: the full-size SD3 Medium FP16 folder and its INT8
folder from benchmarks/race.py, both read as Flash: 4 steps, no guidance). For each folder and each
execution precision (the CPU plugin's default, which is bf16 for the float parts on a CPU with AVX512-BF16
or AMX, and f32 as on a CPU without them), it prints the median seconds of one image split into text
encoders, the four transformer calls and the VAE decode, and then, from OpenVINO's per-operation counters
of one transformer call and one decode, the seconds per kind of operation (fully connected layers,
scaled dot-product attention, convolutions, the rest) and their INT8 speed-ups.

Why this exists: the INT8 pipeline's end-to-end speed-up over FP16 is bounded by what INT8 kernels gain
over the float kernels they replace on the CPU at hand, weighted by each kind's share of the time. On a
CPU that runs FP16 IR in bf16, VNNI INT8 matrix units have about twice bf16's throughput, and attention and
layout changes gain less; on one that runs it in f32, the gain is far larger.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

STEPS = 4
KINDS = {"FullyConnected": "fully connected", "FullyConnectedQuantizedLegacy": "fully connected",
         "Convolution": "convolution", "Subgraph": "attention (fused)"}


def image_breakdown(folder: Path, precision: str | None, repeats: int, size: int) -> dict[str, float]:
    """Median seconds of one Flash image and of its parts."""
    from ovsd3.runtime.pipeline import SD3Pipeline

    pipe = SD3Pipeline.load(folder, precision=precision, cache_dir=None)
    settings = dict(num_inference_steps=STEPS, guidance_scale=0.0, height=size, width=size)
    pipe("warm-up", **settings)
    rows = []
    for seed in range(repeats):
        text, vae, transformer = pipe.infer_seconds["text"], pipe.infer_seconds["vae"], pipe.transformer.seconds
        started = time.perf_counter()
        pipe("a photo of a cat", seed=seed, **settings)
        rows.append({"image": time.perf_counter() - started, "text": pipe.infer_seconds["text"] - text,
                     "transformer": pipe.transformer.seconds - transformer,
                     "vae decode": pipe.infer_seconds["vae"] - vae})
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def recorded_inputs(folder: Path, size: int) -> tuple[object, dict]:
    """The transformer model the pipeline runs and the inputs of one of its calls."""
    from ovsd3.runtime.pipeline import SD3Pipeline

    pipe = SD3Pipeline.load(folder, cache_dir=None)
    transformer = pipe.transformer
    recorded = {}
    original_feed = transformer._feed

    def feed(inputs):
        compiled, fed = original_feed(inputs)
        recorded.update(fed)
        return compiled, fed

    transformer._feed = feed
    pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, height=size, width=size)
    model = transformer._biased_model() if "attention_bias" in recorded else transformer.compiler.read("transformer")
    return model, recorded


def seconds_by_kind(model, inputs: dict, precision: str | None) -> dict[str, float]:
    """OpenVINO's per-operation counters of one inference (after a warm-up), summed by kind."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    request.infer(inputs)
    request.infer(inputs)
    kinds = collections.Counter()
    for info in request.profiling_info:
        kinds[KINDS.get(info.node_type, "the rest")] += info.real_time.total_seconds()
    return dict(kinds)


def op_kinds(folder: Path, precision: str | None, size: int) -> dict[str, dict[str, float]]:
    import openvino as ov

    model, inputs = recorded_inputs(folder, size)
    latents = {"latent_sample": np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8),
                                                                         dtype=np.float32)}
    decoder = ov.Core().read_model(folder / "vae_decoder" / "openvino_model.xml")
    return {"transformer call": seconds_by_kind(model, inputs, precision),
            "vae decode": seconds_by_kind(decoder, latents, precision)}


def print_ratios(title: str, fp16: dict[str, float], int8: dict[str, float]) -> None:
    print(f"\n| {title} | FP16 s | INT8 s | INT8 speed-up |\n|---|---|---|---|")
    for key in fp16:
        if fp16[key] > 0.005 or int8.get(key, 0) > 0.005:
            quantized = int8.get(key, 0.0)
            ratio = f"{fp16[key] / quantized:.2f}x" if quantized else "-"
            print(f"| {key} | {fp16[key]:.2f} | {quantized:.2f} | {ratio} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp16", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precisions", choices=("both", "default"), default="both",
                        help="default: only the CPU's default precision (on a CPU without bf16 it is f32 already)")
    args = parser.parse_args()
    precisions = ((None, "the CPU's default precision"), ("f32", "f32"))
    for precision, label in precisions[:1] if args.precisions == "default" else precisions:
        images = [image_breakdown(folder, precision, args.repeats, args.size) for folder in (args.fp16, args.int8)]
        print_ratios(f"one Flash image ({STEPS} steps, {args.size}x{args.size}), {label}", *images)
        kinds = [op_kinds(folder, precision, args.size) for folder in (args.fp16, args.int8)]
        for part in kinds[0]:
            print_ratios(f"{part} by kind of operation, {label}", kinds[0][part], kinds[1][part])
    return 0


if __name__ == "__main__":
    sys.exit(main())
