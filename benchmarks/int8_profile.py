"""Where one transformer call and one VAE decode spend their time, FP16 IR (f32 execution) against INT8, by kind
of operation and by the kernel OpenVINO's CPU plugin picked (``exec_type``).

    python benchmarks/int8_profile.py --workdir /tmp/ovsd3-int8 [--size 512] [--repeats 3]

WORKDIR comes from benchmarks/int8_models.py. FP16 and INT8 are compiled side by side in one process and called
in turn (FP16, INT8, FP16, ...), so that a busy machine slows both alike; the medians of the wall times give the
ratio. Then OpenVINO's per-node counters (``PERF_COUNT``) of one more call each, summed by node type and by
(node type, exec_type): which FullyConnected runs an int8 kernel (``..._I8``) and which fall back to f32.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from int8_models import XML, decoder_inputs, transformer_inputs  # noqa: E402
from int8_single_layer import interleaved  # noqa: E402  (the upstream reproduction stays standalone)


def compiled(model, config: dict):
    import openvino as ov

    settings = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES", **config}
    return ov.Core().compile_model(model, "CPU", settings).create_infer_request()


def by_kind(request) -> tuple[collections.Counter, collections.Counter]:
    """Seconds by node type and by (node type, exec type), from the last call's counters."""
    types, kernels = collections.Counter(), collections.Counter()
    for info in request.profiling_info:
        seconds = info.real_time.total_seconds()
        types[info.node_type] += seconds
        kernels[(info.node_type, info.exec_type)] += seconds
    return types, kernels


def print_table(title: str, rows: dict, names: list[str], threshold: float = 0.01) -> None:
    print(f"\n| {title} | " + " | ".join(f"{name} s" for name in names) + f" | {names[0]}/{names[1]} |")
    print("|---" * (len(names) + 2) + "|")
    keys = sorted({key for counts in rows.values() for key in counts}, key=lambda key: -rows[names[0]].get(key, 0))
    for key in keys:
        values = [rows[name].get(key, 0.0) for name in names]
        if max(values) < threshold:
            continue
        ratio = f"{values[0] / values[1]:.2f}x" if values[1] else "-"
        label = key if isinstance(key, str) else " / ".join(key)
        print(f"| {label} | " + " | ".join(f"{value:.3f}" for value in values) + f" | {ratio} |")
    totals = [sum(rows[name].values()) for name in names]
    print("| **sum of counters** | " + " | ".join(f"{value:.3f}" for value in totals)
          + f" | {totals[0] / totals[1]:.2f}x |")


def profile(part: str, variants: dict[str, tuple[Path, dict]], inputs: dict, repeats: int) -> None:
    requests = {name: compiled(str(xml), config) for name, (xml, config) in variants.items()}
    medians = interleaved(requests, inputs, repeats)
    names = list(variants)
    print(f"\n### {part}: median wall seconds of {repeats} interleaved calls")
    for name in names:
        print(f"- {name}: {medians[name]:.3f} s ({medians[names[0]] / medians[name]:.2f}x of {names[0]})")
    counts = {name: by_kind(request) for name, request in requests.items()}
    print_table(f"{part}, by node type", {name: counts[name][0] for name in names}, names)
    print_table(f"{part}, by node type / exec_type", {name: counts[name][1] for name in names}, names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-int8"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("transformer", "vae_decoder", "both"), default="both")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    parts = ("transformer", "vae_decoder") if args.part == "both" else (args.part,)
    for part in parts:
        inputs = transformer_inputs(1, args.size, rng) if part == "transformer" else decoder_inputs(args.size, rng)
        profile(f"{part} at {args.size}x{args.size}",
                {"FP16": (args.workdir / "fp16" / part / XML, f32), "INT8": (args.workdir / "int8" / part / XML, {})},
                inputs, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
