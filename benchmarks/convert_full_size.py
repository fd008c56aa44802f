"""Convert full-size SD3 (random weights, real shapes) and report time, size and peak memory.

Real weights cannot be downloaded here; time and memory of conversion do not depend on the values.
The source folder is written in fp16, as the real checkpoints are stored, one component at a time.

    python benchmarks/convert_full_size.py --preset sd3-medium --workdir /tmp/sd3-full

prints the converter's own per-component lines (size, time, agreement with PyTorch) and its peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-full-size"))
    parser.add_argument("--no-t5", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the source and output folders")
    args = parser.parse_args()

    import torch

    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    source = args.workdir / f"{args.preset}-random-fp16"
    output = args.workdir / f"{args.preset}-ov"
    if not (source / "model_index.json").exists():
        start = time.perf_counter()
        save_random_pipeline(get_preset(args.preset), source, with_t5=not args.no_t5, dtype=torch.float16,
                             log=lambda line: print(f"  {line}", flush=True))
        print(f"built random {args.preset} source in {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(output, ignore_errors=True)

    command = [sys.executable, "-m", "ovsd3", "convert", str(source), str(output)]
    if args.no_t5:
        command.append("--no-t5")
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    print(f"ovsd3 convert exited {code} after {time.perf_counter() - start:.0f} s (machine: "
          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
          f"{_memory_gib():.0f} GiB RAM)", flush=True)
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    return code


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20


if __name__ == "__main__":
    sys.exit(main())
