"""One fully connected layer of SD3 Medium at 512x512 (1024 image tokens x 1536 -> 6144, the feed-forward's first
layer), in every form OpenVINO's CPU plugin can run it, timed in turn in one process: an upstream-ready
reproduction of the INT8 kernel choice on a CPU without VNNI (AVX2 only).

    python benchmarks/int8_single_layer.py [--tokens 1024] [--k 1536] [--n 6144] [--repeats 20]

Forms (weights random; values do not change speed):
- f32:            f32 weights, f32 activations.
- fp16 IR in f32: fp16 weights (Convert to f32), as `ovsd3 convert` writes them, executed in f32.
- int8 static:    activations through a FakeQuantize (u8, per tensor) and int8 weights with a per-channel scale,
                  the pattern NNCF's post-training quantization writes; the plugin runs it as an int8 GEMM.
- int8 weights:   int8 weights (Convert, Subtract zero point, Multiply scale), f32 activations: weight-only
                  compression (nncf.compress_weights INT8_ASYM), run with DYNAMIC_QUANTIZATION_GROUP_SIZE 0
                  (off) and with dynamic quantization of the activations at the group sizes given.
- int4 weights:   the same with INT4_SYM weights in groups of 128.

For each: median milliseconds, the GFLOP/s that makes, and the kernel the plugin picked (``exec_type``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def layer(tokens: int, k: int, n: int, form: str, rng: np.random.Generator):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, tokens, k], ov.Type.f32, name="x")
    scale = ops.constant((rng.random((n, 1)) * 0.01 + 0.001).astype(np.float32))
    if form == "f32":
        weights = ops.constant(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
    elif form == "fp16 IR":
        weights = ops.convert(ops.constant(rng.standard_normal((n, k)).astype(np.float16)), ov.Type.f32)
    elif form == "int4 weights":
        groups = k // 128
        codes = ops.constant(rng.integers(-8, 8, (n, groups, 128)).astype(np.int8), ov.Type.i4)
        group_scale = ops.constant((rng.random((n, groups, 1)) * 0.01 + 0.001).astype(np.float32))
        weights = ops.reshape(ops.multiply(ops.convert(codes, ov.Type.f32), group_scale), [n, k], False)
    else:
        codes = ops.constant(rng.integers(-127, 128, (n, k)).astype(np.int8))
        decompressed = ops.convert(codes, ov.Type.f32)
        if form == "int8 weights":
            zero_point = ops.convert(ops.constant(np.full((n, 1), 3, np.uint8)), ov.Type.f32)
            decompressed = ops.subtract(decompressed, zero_point)
        weights = ops.multiply(decompressed, scale)
    source = x.output(0)
    if form == "int8 static":
        low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        source = ops.fake_quantize(x, low, high, low, high, 256).output(0)
    out = ops.matmul(source, weights, False, True)
    return ov.Model([ops.result(out)], [x], form)


def compile_form(model, config: dict):
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES",
                                                  **config}).create_infer_request()


def kernels_of(request) -> str:
    return ", ".join(sorted({f"{info.node_type}:{info.exec_type}" for info in request.profiling_info
                             if info.real_time.total_seconds() > 0
                             and info.node_type not in ("Parameter", "Result")}))


def interleaved(requests: dict, inputs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each form, called in turn (a busy machine slows them alike), after a warm-up each."""
    times = {name: [] for name in requests}
    for request in requests.values():
        request.infer(inputs)
    for _ in range(repeats):
        for name, request in requests.items():
            started = time.perf_counter()
            request.infer(inputs)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--k", type=int, default=1536)
    parser.add_argument("--n", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[32, 128, 1536])
    args = parser.parse_args()
    import openvino as ov

    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((1, args.tokens, args.k)).astype(np.float32)}
    off = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "INFERENCE_PRECISION_HINT": "f32"}
    runs = [("f32", "f32", off), ("fp16 IR in f32", "fp16 IR", off), ("int8 static", "int8 static", off),
            ("int8 weights", "int8 weights", off)]
    for form in ("int8 weights", "int4 weights"):
        runs += [(f"{form}, dyn. quant. {size}", form, {**off, "DYNAMIC_QUANTIZATION_GROUP_SIZE": size})
                 for size in args.group_sizes]
    runs.append(("int4 weights, dyn. quant. off", "int4 weights", off))
    flops = 2 * args.tokens * args.k * args.n
    print(f"openvino {ov.__version__}; CPU capabilities "
          f"{ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}; FC {args.tokens} x {args.k} -> {args.n}")
    requests = {label: compile_form(layer(args.tokens, args.k, args.n, form, rng), config)
                for label, form, config in runs}
    medians = interleaved(requests, inputs, args.repeats)
    print(f"\n| form | ms (median of {args.repeats}, interleaved) | GFLOP/s | f32 / form | kernels |\n"
          "|---|---|---|---|---|")
    for label, seconds in medians.items():
        print(f"| {label} | {seconds * 1e3:.1f} | {flops / seconds / 1e9:.0f} | {medians['f32'] / seconds:.2f}x | "
              f"{kernels_of(requests[label])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
