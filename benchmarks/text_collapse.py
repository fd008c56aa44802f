"""One transformer call without T5: the full zero-padded text, the collapsed text with an attention bias,
and openvino.genai's shorter padding, on a no-T5 folder (e.g. SD3 Medium converted with --no-t5).

    python benchmarks/text_collapse.py FOLDER --size 512 --repeats 3

Variants, each at batch 2 (classifier-free guidance) and batch 1:
  full 77+256       the original IR on diffusers' (and ovsd3's) sequence: 77 CLIP + 256 zero T5 tokens
  collapsed 77+1    the attention-bias IR on 77 + 1 tokens, log(256) on the last key (same output)
  genai 77+77       the original IR on 77 + 77 zero tokens, what openvino.genai feeds without T5
                    (its output differs: 77 copies of the zero token instead of 256)
  masked 77+256     the attention-bias IR on the full sequence with a zero bias: what the mask itself costs
Both IRs are compiled with the runtime's CPU config (PERFORMANCE_HINT LATENCY, default precision: bf16 where
the CPU has it). The variants are interleaved (the machine may be shared), one warm-up call each, and the
table gives medians of wall and process CPU seconds and their ratios to "full 77+256". On a shared machine
compare ratios, not absolute times: OpenVINO's worker threads spin while they wait for a descheduled peer,
so even CPU seconds grow with other jobs' load. Two compiled transformers are in memory at once.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.ir.attention_bias import ATTENTION_BIAS, add_attention_bias
from ovsd3.metrics import psnr
from ovsd3.runtime.text import CLIP_MAX_LENGTH
from ovsd3.runtime.text_collapse import collapse_text, patch_size_of

CPU_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}  # what ovsd3/runtime/devices.py compiles with
T5_TOKENS = 256
GENAI_T5_TOKENS = CLIP_MAX_LENGTH  # openvino.genai pads the missing T5 with zeros of CLIP's length


def compile_both(folder: Path):
    """(original, attention-bias) transformer, compiled; the uncompiled models are freed before returning."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(layout.model_xml(folder, layout.TRANSFORMER))
    started = time.perf_counter()
    original = core.compile_model(model, "CPU", CPU_CONFIG)
    biased = core.compile_model(add_attention_bias(model), "CPU", CPU_CONFIG)
    print(f"compiled both in {time.perf_counter() - started:.0f} s", flush=True)
    del model
    gc.collect()
    return original, biased


def no_t5_inputs(folder: Path, size: int, batch: int, t5_tokens: int) -> dict:
    """Random latents, CLIP tokens and pooled embeddings; T5 zeros. Seeded, so every length sees the same CLIP."""
    import json

    config = json.loads((folder / layout.TRANSFORMER / "config.json").read_text())
    rng = np.random.default_rng(0)
    latent = size // 8
    text = np.zeros((batch, CLIP_MAX_LENGTH + t5_tokens, config["joint_attention_dim"]), np.float32)
    text[:, :CLIP_MAX_LENGTH] = rng.standard_normal((batch, CLIP_MAX_LENGTH, config["joint_attention_dim"]))
    return {
        "hidden_states": rng.standard_normal((batch, config["in_channels"], latent, latent), dtype=np.float32),
        "timestep": np.full(batch, 500.0, np.float32),
        "encoder_hidden_states": text,
        "pooled_projections": rng.standard_normal((batch, config["pooled_projection_dim"]), dtype=np.float32),
    }


def variants(folder: Path, size: int, batch: int, original, biased) -> dict:
    """Variant name -> (compiled model, its inputs, text tokens)."""
    full = no_t5_inputs(folder, size, batch, T5_TOKENS)
    collapse = collapse_text(full, patch_size_of(folder))
    assert collapse.collapsed, "the T5 part of the benchmark inputs must be zeros"
    zero_bias = np.zeros(len(collapse.attention_bias) - 1 + T5_TOKENS, np.float32)
    return {
        "full 77+256": (original, full, CLIP_MAX_LENGTH + T5_TOKENS),
        "collapsed 77+1": (biased, collapse.biased_inputs(), CLIP_MAX_LENGTH + 1),
        "genai 77+77": (original, no_t5_inputs(folder, size, batch, GENAI_T5_TOKENS), CLIP_MAX_LENGTH + GENAI_T5_TOKENS),
        "masked 77+256": (biased, {**full, ATTENTION_BIAS: zero_bias}, CLIP_MAX_LENGTH + T5_TOKENS),
    }


def time_interleaved(cases: dict, repeats: int) -> tuple[dict, dict, dict]:
    """(name -> wall seconds, name -> process CPU seconds, name -> output) per call: one warm-up call each,
    then ``repeats`` rounds of every case. Interleaved, so a change in the machine's load hits every case."""
    outputs = {name: compiled(inputs)[0].copy() for name, (compiled, inputs, _) in cases.items()}  # warm-up
    wall, cpu = {name: [] for name in cases}, {name: [] for name in cases}
    for _ in range(repeats):
        for name, (compiled, inputs, _) in cases.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            compiled(inputs)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return wall, cpu, outputs


def print_table(size: int, batch: int, cases: dict, wall: dict, cpu: dict, outputs: dict) -> None:
    base, base_cpu = statistics.median(wall["full 77+256"]), statistics.median(cpu["full 77+256"])
    reference = outputs["full 77+256"]
    print(f"\n{size}x{size}, batch {batch}, {len(wall['full 77+256'])} timed calls each (medians)")
    print(f"{'variant':<16} {'text':>5} {'wall s':>7} {'min s':>6} {'vs full':>8} {'CPU s':>7} {'vs full':>8} "
          f"{'PSNR vs full':>13}")
    for name, (_, _, tokens) in cases.items():
        median, median_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<16} {tokens:>5} {median:>7.2f} {min(wall[name]):>6.2f} {median / base:>7.2f}x "
              f"{median_cpu:>7.2f} {median_cpu / base_cpu:>7.2f}x {psnr(reference, outputs[name]):>10.1f} dB",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an ovsd3/optimum-intel folder (no T5)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant, at least 3 (default 3)")
    parser.add_argument("--batches", default="2,1", help="batch sizes, comma-separated (default 2,1)")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (medians of fewer calls mean little on a shared machine)")
    original, biased = compile_both(args.folder)
    for batch in (int(b) for b in args.batches.split(",")):
        cases = variants(args.folder, args.size, batch, original, biased)
        wall, cpu, outputs = time_interleaved(cases, args.repeats)
        print_table(args.size, batch, cases, wall, cpu, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
