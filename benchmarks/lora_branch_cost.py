"""The cost of LoRA branches on the full-size SD3 Medium INT8 transformer: one 512x512 step without an
adapter, with a rank-16 and with a rank-64 branch adapter.

    python benchmarks/lora_branch_cost.py --folder /tmp/ovsd3-cluster-bench/sd3-medium-int8-ov

FOLDER is a quantized full-size folder; where it does not exist it is made first, as the other full-size
benchmarks make theirs (``benchmarks/convert_full_size.py``, then ``ovsd3 quantize``, with --source-fp16 for
the FP16 folder to start from). Each adapter has random weights on every attention and feed-forward Linear of
every block (image and text streams: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, ff(.context).net.0.proj
and net.2), as a real SD3 LoRA targets them, and is applied with ``lora_mode="branch"``. A step is one
transformer call at batch 2 (classifier-free guidance), median of --repeats after a warm-up, the plain
pipeline and one with branches loaded at once and called in turn; the adapter weight is changed once between
the warm-up and the timed calls (no compile: the scale is an input).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2")


def ensure_folder(folder: Path, source_fp16: Path | None) -> None:
    if folder.exists():
        return
    if source_fp16 is None or not source_fp16.exists():
        sys.exit(f"{folder} does not exist: give --source-fp16 (a full-size FP16 folder, made by "
                 "benchmarks/convert_full_size.py) to quantize it from")
    subprocess.run([sys.executable, "-m", "ovsd3", "quantize", str(source_fp16), str(folder), "--calib", "8"],
                   check=True)


def random_adapter(folder: Path, out: Path, rank: int, seed: int) -> Path:
    """A diffusers-format LoRA file (``transformer.<module>.lora_A/B.weight``, scale 1) on TARGETS."""
    import openvino as ov
    from safetensors.numpy import save_file

    from ovsd3.ir.lora import layer_shapes

    shapes = layer_shapes(ov.Core().read_model(folder / "transformer" / "openvino_model.xml"))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, shape in shapes.items():
        if module.startswith("transformer_blocks.") and module.split(".", 2)[2] in TARGETS:
            out_features, in_features = shape[:2]
            tensors[f"transformer.{module}.lora_A.weight"] = rng.normal(0, 0.01, (rank, in_features)).astype(np.float16)
            tensors[f"transformer.{module}.lora_B.weight"] = rng.normal(0, 0.01, (out_features, rank)).astype(np.float16)
    save_file(tensors, str(out))
    print(f"rank {rank}: {len(tensors) // 2} layers, {sum(t.size for t in tensors.values()) / 1e6:.1f} M parameters",
          flush=True)
    return out


def inputs(folder: Path, batch: int, size: int) -> dict[str, np.ndarray]:
    """Random transformer inputs at ``size`` with 77 + 256 text tokens, widths from the folder's config."""
    import json

    config = json.loads((folder / "transformer" / "config.json").read_text())
    rng = np.random.default_rng(0)
    side = size // 8
    return {"hidden_states": rng.standard_normal((batch, config.get("in_channels", 16), side, side),
                                                 dtype=np.float32),
            "timestep": np.full((batch,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 333, config["joint_attention_dim"]),
                                                         dtype=np.float32),
            "pooled_projections": rng.standard_normal((batch, config["pooled_projection_dim"]), dtype=np.float32)}


def loaded(folder: Path, adapter: Path | None, size: int):
    """(the pipeline's transformer call, seconds to load and compile), warmed up, the adapter weight changed
    once after the warm-up (the scale is an input: no recompile)."""
    from ovsd3.runtime import SD3Pipeline

    started = time.perf_counter()
    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None, lora_mode="branch" if adapter else None,
                            adapters=[(adapter, 1.0)] if adapter else None)
    load = time.perf_counter() - started
    pipe.transformer(inputs(folder, 2, size))  # warm-up: the first call at a shape
    if adapter:
        pipe.set_adapters([adapter], adapter_weights=[0.8])
    return pipe.transformer, load


def main() -> None:
    from ovsd3.timing import alternating_medians

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ovsd3-cluster-bench/sd3-medium-int8-ov"))
    parser.add_argument("--source-fp16", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-lora-branch"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    ensure_folder(args.folder, args.source_fp16)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, load = loaded(args.folder, None, args.size)
    print(f"no adapter: loaded and compiled in {load:.0f} s", flush=True)
    feed = inputs(args.folder, 2, args.size)
    for rank in args.ranks:
        adapter = random_adapter(args.folder, args.workdir / f"rank{rank}.safetensors", rank, seed=rank)
        branched, load = loaded(args.folder, adapter, args.size)
        # two pipelines at once (a third does not fit in 24 GB), called in turn, so that a busy spell or a
        # drifting clock hits both alike
        seconds = alternating_medians({"plain": base, "branches": branched}, feed, args.repeats)
        print(f"rank {rank} branches: {seconds['branches']:.2f} s a step against {seconds['plain']:.2f} s without "
              f"(median of {args.repeats}, alternating), x{seconds['branches'] / seconds['plain']:.2f}; loaded and "
              f"compiled in {load:.0f} s", flush=True)
        del branched
        gc.collect()


if __name__ == "__main__":
    main()
