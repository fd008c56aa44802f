"""Checks the report's full-size INT8 estimate against a whole full-size transformer, on this CPU.

    python benchmarks/int8_estimate.py FP16_FOLDER INT8_FOLDER [--sizes 512,1024] [--repeats 3] [--blocks 3] [--form F]

The folders: a full-size SD3 Medium FP16 folder and its INT8 folder (random weights are fine: time does not
depend on them), e.g. `python benchmarks/convert_full_size.py --preset sd3-medium --no-t5 OUT` then
`ovsd3 quantize OUT OUT-int8 --calib 8 --calib-size 256`. It runs `ovsd3 report --full-size`'s estimate
(a few blocks at full width, FP16 and INT8, the full call estimated), then times one call of each folder's
whole transformer with the same inputs, compiled and alternated the same way, and prints both with the
estimate's error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.report.full_size import EstimateRequest, estimate, transformer_inputs
from ovsd3.timing import alternating_medians


def whole_calls(folders: dict[str, Path], sizes: tuple[int, ...], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of one whole-transformer call per folder and size, compiled for that size's shapes as the
    estimate's models are, calls alternating."""
    from ovsd3.presets import get_preset
    from ovsd3.runtime.devices import CompileOptions, DevicePlan, ModelCompiler

    arch = get_preset("sd3-medium").transformer
    measured = {}
    for size in sizes:
        inputs = transformer_inputs(arch, size, np.random.default_rng(size))
        shapes = {name: value.shape for name, value in inputs.items()}
        models = {label: ModelCompiler(folder, CompileOptions(plan=DevicePlan("CPU"), cache_dir=None))
                  .compile(layout.TRANSFORMER, static_shapes=shapes) for label, folder in folders.items()}
        measured[str(size)] = alternating_medians(models, inputs, repeats)
        del models
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp16", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--form", default=None, help="the INT8 form of INT8_FOLDER's transformer (int8: all "
                        "INT8, as ovsd3 0.2.0 made it; int8-fc: the attention in float); default: this CPU's")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        estimated = estimate(EstimateRequest(blocks=args.blocks, sizes=sizes, repeats=args.repeats,
                                             int8_form=args.form), Path(scratch))
    measured = whole_calls({"FP16": args.fp16, "INT8": args.int8}, sizes, args.repeats)
    print(f"{'size':>6} {'folder':>6} {'estimated s':>12} {'measured s':>11} {'error':>7}")
    for size in map(str, sizes):
        for label in ("FP16", "INT8"):
            guess, real = estimated["sizes"][size][label]["full_seconds"], measured[size][label]
            print(f"{size:>6} {label:>6} {guess:12.2f} {real:11.2f} {guess / real - 1:+7.1%}")
        real_speedup = measured[size]["FP16"] / measured[size]["INT8"]
        print(f"{size:>6} {'INT8 speed-up':>13}: estimated {estimated['sizes'][size]['speedup']:.2f}x, "
              f"measured {real_speedup:.2f}x")
    print(json.dumps({"estimate": estimated, "measured": measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
