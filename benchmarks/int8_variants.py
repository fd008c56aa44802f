"""Which INT8 form of the SD3 transformer and VAE decoder is fastest on this CPU: each variant against the FP16 IR
(f32 execution), called in turn in one process, medians of the wall times.

    python benchmarks/int8_variants.py --workdir /tmp/ovsd3-int8 [--part transformer] [--repeats 3]

WORKDIR comes from benchmarks/int8_models.py (its fp16/ and int8/ folders); the variants are built next to them
once (WORKDIR/variants/NAME/PART/openvino_model.xml):

transformer
- int8:             ovsd3 quantize's INT8 (NNCF, TRANSFORMER model type: every MatMul's activations and the
                    attention's query and key quantized)
- int8-fc:          the same with the fused attention (ScaledDotProductAttention) left in float, so the CPU
                    plugin keeps its fused attention kernel; only the fully connected layers are INT8
- w8:               INT8 weights only (nncf.compress_weights INT8_ASYM), activations in float
- w8, dq32:         the same compiled with DYNAMIC_QUANTIZATION_GROUP_SIZE 32 (activations quantized on the fly)
- w4, dq32:         INT4_SYM weights in groups of 128, dynamic quantization 32
vae_decoder
- int8:             ovsd3 quantize's INT8 decoder
- w8:               INT8 weights only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from int8_models import XML, decoder_inputs, transformer_inputs  # noqa: E402
from int8_profile import by_kind, compiled, interleaved, print_table  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
NO_DQ = {**F32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}


def build_variant(workdir: Path, name: str, part: str, samples: int, size: int) -> Path:
    import openvino as ov

    from int8_models import quantize_transformer_ir
    from ovsd3.quantize.weights import WeightCompression, compress

    out = workdir / "variants" / name / part / XML
    if out.exists():
        return out
    source = workdir / "fp16" / part / XML
    print(f"building {out}", flush=True)
    if name == "int8-fc":
        quantize_transformer_ir(source, out, samples, size, ignore_types=("ScaledDotProductAttention",))
        return out
    mode = {"w8": WeightCompression(mode="int8", ratio=1.0), "w4": WeightCompression(mode="int4_sym", ratio=1.0)}
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(compress(ov.Core().read_model(source), mode[name]), out)
    return out


def variants(workdir: Path, part: str, samples: int, size: int) -> dict[str, tuple[Path, dict]]:
    fp16, int8 = workdir / "fp16" / part / XML, workdir / "int8" / part / XML
    if part == "vae_decoder":
        return {"FP16": (fp16, F32), "int8": (int8, F32),
                "w8": (build_variant(workdir, "w8", part, samples, size), NO_DQ)}
    return {"FP16": (fp16, F32), "int8": (int8, F32),
            "int8-fc": (build_variant(workdir, "int8-fc", part, samples, size), F32),
            "w8": (build_variant(workdir, "w8", part, samples, size), NO_DQ),
            "w8, dq32": (workdir / "variants" / "w8" / part / XML, {**F32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32}),
            "w4, dq32": (build_variant(workdir, "w4", part, samples, size),
                         {**F32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-int8"))
    parser.add_argument("--part", choices=("transformer", "vae_decoder"), default="transformer")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=None, help="these variants (FP16 always)")
    args = parser.parse_args()
    from ovsd3.quantize.pipeline import _quiet_nncf

    _quiet_nncf()
    rng = np.random.default_rng(1)
    inputs = transformer_inputs(1, args.size, rng) if args.part == "transformer" else decoder_inputs(args.size, rng)
    chosen = variants(args.workdir, args.part, args.samples, args.calib_size)
    if args.only is not None:
        chosen = {name: value for name, value in chosen.items() if name == "FP16" or name in args.only}
    requests = {name: compiled(str(xml), config) for name, (xml, config) in chosen.items()}
    medians = interleaved(requests, inputs, args.repeats)
    print(f"\n### {args.part} at {args.size}x{args.size}: median wall seconds of {args.repeats} interleaved calls")
    print("\n| variant | s | FP16 / variant |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {medians['FP16'] / seconds:.2f}x |")
    kernels = {name: by_kind(request)[1] for name, request in requests.items()}
    print_table(f"{args.part}, by node type / exec_type", kernels, list(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
