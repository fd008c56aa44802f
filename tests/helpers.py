"""Shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

from ovsd3.cli import main

# The gate's defaults are for real models. These tiny ones have random weights (the Flash one a strong
# random LoRA on top), which INT8 moves further; the mechanics are what the tests check, and
# test_forced_gate_failure_writes_nothing checks that the gate refuses.
TINY_GATE = ("--min-psnr", "10", "--min-ssim", "0.2")


def quantize(source: Path, out: Path, *extra) -> int:
    return main(["quantize", str(source), str(out), "--calib", "8", "--calib-size", "64", "--group-size", "8",
                 "--gate-prompts", "2", "--calib-cache", str(out.parent / f"{out.name}-calib"), *TINY_GATE,
                 *map(str, extra)])
