"""How much of an ovsd3 generation is Python rather than OpenVINO inference, next to openvino.genai.

    python benchmarks/runtime_overhead.py FOLDER --size 512 --steps 4 --repeats 3

Runs the same folder, prompt, size and steps through ovsd3's runtime and through
openvino_genai.Text2ImagePipeline (its TaylorSeer step caching off, so both run every transformer call),
one after the other so only one pipeline is in memory. Prints medians over the repeats.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a lighthouse on a rocky coast during a storm"


def bench_ovsd3(folder: Path, size: int, steps: int, guidance: float, repeats: int) -> dict:
    from ovsd3.runtime import SD3Pipeline

    started = time.perf_counter()
    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None)
    load = time.perf_counter() - started
    pipe(PROMPT, width=size, height=size, num_inference_steps=1, guidance_scale=guidance, seed=0)  # warm-up
    totals, python = [], []
    for repeat in range(repeats):
        result = pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                      seed=repeat)
        totals.append(result.timings["total_seconds"])
        python.append(result.timings["python_seconds"])
    return {"load": load, "total": statistics.median(totals), "python": statistics.median(python),
            "python_share": statistics.median(p / t for p, t in zip(python, totals))}


def bench_genai(folder: Path, size: int, steps: int, guidance: float, repeats: int) -> dict:
    import openvino_genai

    started = time.perf_counter()
    pipe = openvino_genai.Text2ImagePipeline(str(folder), "CPU")
    load = time.perf_counter() - started
    config = pipe.get_generation_config()
    config.taylorseer_config = None  # every step runs the transformer, as in ovsd3
    pipe.set_generation_config(config)
    settings = dict(width=size, height=size, guidance_scale=guidance)
    pipe.generate(PROMPT, num_inference_steps=1, rng_seed=0, **settings)  # warm-up
    totals = []
    for repeat in range(repeats):
        started = time.perf_counter()
        pipe.generate(PROMPT, num_inference_steps=steps, rng_seed=repeat, **settings)
        totals.append(time.perf_counter() - started)
    return {"load": load, "total": statistics.median(totals)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None,
                        help="default: 0 for Flash folders, 7 otherwise (as each pipeline defaults)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from ovsd3.layout import FolderRecord, GenerationDefaults

    record = FolderRecord.load(args.folder)
    guidance = args.guidance if args.guidance is not None else (
        record.defaults if record else GenerationDefaults()).guidance_scale
    print(f"{args.folder}: {args.size}x{args.size}, {args.steps} steps, guidance {guidance}, "
          f"median of {args.repeats}, CPU", flush=True)
    ours = bench_ovsd3(args.folder, args.size, args.steps, guidance, args.repeats)
    gc.collect()
    theirs = bench_genai(args.folder, args.size, args.steps, guidance, args.repeats)
    print(f"{'':24s}{'ovsd3':>10s}{'genai':>10s}")
    print(f"{'load + compile (s)':24s}{ours['load']:10.1f}{theirs['load']:10.1f}")
    print(f"{'generation (s)':24s}{ours['total']:10.2f}{theirs['total']:10.2f}")
    print(f"{'outside inference (s)':24s}{ours['python']:10.3f}{'':>10s}")
    print(f"ovsd3 Python share of a generation: {ours['python_share']:.2%}; "
          f"ovsd3 / genai time: {ours['total'] / theirs['total']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
