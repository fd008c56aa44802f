"""Quantize the full-size SD3 Medium transformer (random weights) and time it against the FP16 IR.

    python benchmarks/quantize_full_size.py --folder /tmp/ovsd3-full-size/sd3-medium-ov

FOLDER is a converted full-size folder (benchmarks/convert_full_size.py makes one). Calibration inputs are
synthetic (values do not change speed or size), batch 1 as a Flash model records them. Quantization runs
in a child process, so its peak RSS is its own; then FP16 and INT8 transformer calls at 512x512, batch 1
and 2, are timed side by side in one process (median of --repeats, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_inputs(batch: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    side = size // 8
    return {"hidden_states": rng.standard_normal((batch, 16, side, side), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 333, 4096), dtype=np.float32),
            "pooled_projections": rng.standard_normal((batch, 2048), dtype=np.float32)}


def quantize_child(folder: Path, out: Path, samples: int, size: int) -> None:
    import openvino as ov

    from ovsd3.quantize.transformer import TransformerQuantization, quantize_transformer

    rng = np.random.default_rng(0)
    model = ov.Core().read_model(folder / "transformer" / "openvino_model.xml")
    started = time.perf_counter()
    weights = (folder / "transformer" / "openvino_model.bin").stat().st_size
    quantized = quantize_transformer(model, [synthetic_inputs(1, size, rng) for _ in range(samples)],
                                     TransformerQuantization(subset_size=samples), weight_bytes=weights)
    ov.save_model(quantized, out / "openvino_model.xml")
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def time_calls(xml: Path, batch: int, size: int, repeats: int) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    inputs = synthetic_inputs(batch, size, np.random.default_rng(1))
    compiled(inputs)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        compiled(inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ovsd3-int8-transformer"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        quantize_child(args.folder, args.out, args.samples, args.size)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, __file__, "--child", "--folder", str(args.folder), "--out", str(args.out),
                           "--samples", str(args.samples), "--size", str(args.size)], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        print(f"quantization failed (exit {done.returncode}; -9 is the out-of-memory killer)")
        return 1
    quantization = json.loads(done.stdout.strip().splitlines()[-1])
    fp16_xml, int8_xml = args.folder / "transformer" / "openvino_model.xml", args.out / "openvino_model.xml"
    sizes = {name: xml.with_suffix(".bin").stat().st_size / 1e6 for name, xml in (("fp16", fp16_xml), ("int8", int8_xml))}
    print(f"SD3 Medium transformer, random weights, {args.size}x{args.size}, CPU, median of {args.repeats}")
    print(f"quantization: {quantization['seconds']:.0f} s, {args.samples} samples, "
          f"peak RSS {quantization['peak_rss_gib']:.1f} GiB")
    print(f"{'':22s}{'FP16 IR':>10s}{'INT8 IR':>10s}{'speed-up':>10s}")
    print(f"{'IR size (MB)':22s}{sizes['fp16']:10,.0f}{sizes['int8']:10,.0f}{sizes['fp16'] / sizes['int8']:9.2f}x")
    for batch in (1, 2):
        fp16 = time_calls(fp16_xml, batch, args.size, args.repeats)
        int8 = time_calls(int8_xml, batch, args.size, args.repeats)
        print(f"{f'call, batch {batch} (s)':22s}{fp16:10.2f}{int8:10.2f}{fp16 / int8:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
