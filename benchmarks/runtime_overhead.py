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


def bench_ovsd3(folder: Path, size: int, steps: int, guidance: float, repeats: int,
                max_sequence_length: int = 256) -> dict:
    from ovsd3.runtime import SD3Pipeline

    started = time.perf_counter()
    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None)
    load = time.perf_counter() - started
    settings = dict(width=size, height=size, guidance_scale=guidance, max_sequence_length=max_sequence_length)
    pipe(PROMPT, num_inference_steps=1, seed=0, **settings)  # warm-up
    totals, python = [], []
    for repeat in range(repeats):
        result = pipe(PROMPT, num_inference_steps=steps, seed=repeat, **settings)
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
    parser.add_argument("--max-sequence-length", type=int, action="append", default=None,
                        help="T5 tokens for ovsd3 (repeatable; default 256, as diffusers). Without T5, diffusers "
                             "and ovsd3 append that many zero tokens; openvino.genai's sequence is shorter")
    args = parser.parse_args()
    from ovsd3.layout import ModelFolder

    guidance = args.guidance if args.guidance is not None else ModelFolder.open(args.folder).record.defaults.guidance_scale
    print(f"{args.folder}: {args.size}x{args.size}, {args.steps} steps, guidance {guidance}, "
          f"median of {args.repeats}, CPU", flush=True)
    lengths = args.max_sequence_length or [256]
    ours = {}
    for length in lengths:
        ours[length] = bench_ovsd3(args.folder, args.size, args.steps, guidance, args.repeats, length)
        gc.collect()
    theirs = bench_genai(args.folder, args.size, args.steps, guidance, args.repeats)
    columns = [f"ovsd3 T5 {length}" for length in lengths] + ["genai"]
    print(f"{'':24s}" + "".join(f"{name:>14s}" for name in columns))
    print(f"{'load + compile (s)':24s}" + "".join(f"{ours[n]['load']:14.1f}" for n in lengths)
          + f"{theirs['load']:14.1f}")
    print(f"{'generation (s)':24s}" + "".join(f"{ours[n]['total']:14.2f}" for n in lengths)
          + f"{theirs['total']:14.2f}")
    print(f"{'outside inference (s)':24s}" + "".join(f"{ours[n]['python']:14.3f}" for n in lengths))
    print(f"{'Python share':24s}" + "".join(f"{ours[n]['python_share']:14.2%}" for n in lengths))
    print(f"{'time / genai':24s}" + "".join(f"{ours[n]['total'] / theirs['total']:14.3f}" for n in lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
