"""What torch-compatible noise costs: seeding and drawing SD3's latents with ovsd3's two noise sources.

    python benchmarks/noise.py [--repeats 50]

ovsd3's default noise reproduces torch's CPU stream (``torch.Generator().manual_seed(seed)`` + ``torch.randn``)
in numpy, so that a seed draws diffusers' picture; the alternative is numpy's own generator. Per request a
source is seeded once and draws the initial latents (and, for Flash, one draw per step). This prints the
median milliseconds of seeding plus one draw at 512x512 and 1024x1024 (latents 1x16x64x64 and 1x16x128x128)
for both, to set beside a transformer call (seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time

from ovsd3.runtime.noise import NumpyNoise, TorchNoise


def median_ms(source_type, shape: tuple, repeats: int) -> float:
    times = []
    for seed in range(repeats):
        started = time.perf_counter()
        source_type(seed)(shape)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print("| latents | numpy: ms | torch-compatible: ms |\n|---|---|---|")
    for side in (64, 128):
        shape = (1, 16, side, side)
        numpy_ms, torch_ms = (median_ms(kind, shape, args.repeats) for kind in (NumpyNoise, TorchNoise))
        print(f"| {'x'.join(map(str, shape))} | {numpy_ms:.2f} | {torch_ms:.2f} |")


if __name__ == "__main__":
    main()
