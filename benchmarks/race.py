"""The race: ovsd3's step-caching modes against openvino.genai with TaylorSeer off and on, at full size.

    python benchmarks/race.py --fp16 FP16_DIR --int8 INT8_DIR --results benchmarks/results/race \\
        --demo-quality benchmarks/results/cache-quality/cache_quality.json

FP16_DIR and INT8_DIR are full-size SD3 Medium folders without T5 (random weights: ``benchmarks/full_size.py``
builds them; time does not depend on the weights). In one run, one after another, each runner in its own
process (``ovsd3 benchmark``: one 1-step warm-up, then ``--repeats`` timed images), at 512x512:

1. SD3's default workload, 28 steps with guidance 7, on each folder: ovsd3 with every ``--cache`` mode, and
   openvino.genai with its TaylorSeer off and on (its default).
2. The Flash recipe, 4 steps without guidance, on Flash variants of both folders (the same IR, hard-linked,
   with Flash's stochastic scheduler): ovsd3 and openvino.genai.

It prints seconds per image, whole transformer calls, and each runner's time against genai+TaylorSeer on the
same folder (and, for Flash, the INT8 pipeline against FP16). An adaptive mode's skip rate depends on the
weights, which are random here: ``--demo-quality`` (``benchmarks/cache_quality.py``'s JSON on the demo model)
projects each adaptive mode from its measured work there and this run's cost of one whole call
(``--demo-quality-int8``: the same measured on the demo's INT8 folder, for the INT8 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ovsd3.runtime.cache import CacheConfig, FirstBlockCache

FAST_MODE = "fast"  # ovsd3.runtime.cache.PRESETS
DEFAULT_CACHES = ("off", "taylorseer", FAST_MODE)


def benchmark(folder: Path, out: Path, steps: int, guidance: float, repeats: int, caches: tuple[str, ...],
              reuse: bool = False) -> dict:
    if reuse and (out / "benchmark.json").exists():
        return json.loads((out / "benchmark.json").read_text())
    command = [sys.executable, "-m", "ovsd3", "benchmark", str(folder), "--batch", "1", "--size", "512",
               "--steps", str(steps), "--guidance", str(guidance), "--repeats", str(repeats), "--peers", "genai",
               "--out", str(out), "--overwrite", *[arg for spec in caches for arg in ("--cache", spec)]]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((out / "benchmark.json").read_text())


def flash_variant(folder: Path, workdir: Path) -> Path:
    """The same IR (hard links), sampled the Flash way: 4 steps, no guidance, stochastic scheduler."""
    target = workdir / f"{folder.name}-flash"
    if not (target / "ovsd3.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, copy_function=os.link)
        for name, edit in (("scheduler/scheduler_config.json", lambda c: c | {"stochastic_sampling": True}),
                           ("ovsd3.json", lambda r: r | {"defaults": {"num_inference_steps": 4,
                                                                      "guidance_scale": 0.0, "sampler": "flash"}})):
            path = target / name
            data = edit(json.loads(path.read_text()))
            path.unlink()  # a new file, not the hard-linked original
            path.write_text(json.dumps(data, indent=2) + "\n")
    return target


def rows_of(result: dict, folder_label: str) -> list[dict]:
    reference = result["runners"]["genai+taylorseer"]["batches"]["1"]["seconds_per_image"]
    rows = []
    for name, runner in result["runners"].items():
        seconds = runner["batches"]["1"]["seconds_per_image"]
        rows.append({"folder": folder_label, "runner": name, "seconds": seconds,
                     "calls": runner.get("transformer_calls"), "vs_genai_taylorseer": seconds / reference})
    return rows


def projected_rows(result: dict, folder_label: str, demo_quality: dict, steps: int) -> list[dict]:
    """Adaptive modes at this run's cost per whole guided call and their work on the demo at 24 blocks (an
    unguided call counted as half a guided one, a little less than it costs on a CPU)."""
    runners = result["runners"]
    off, cached = runners["ovsd3"], runners.get("ovsd3 taylorseer")
    if cached is None:
        return []
    off_s, cached_s = (r["batches"]["1"]["seconds_per_image"] for r in (off, cached))
    per_call = (off_s - cached_s) / (off["transformer_calls"] - cached["transformer_calls"])
    other = off_s - per_call * steps
    reference = runners["genai+taylorseer"]["batches"]["1"]["seconds_per_image"]
    rows = []
    for spec, row in demo_quality["modes"].items():
        if not isinstance(CacheConfig.parse(spec).step_cache, FirstBlockCache):
            continue
        seconds = other + per_call * steps * row["work_sd3_medium"]
        rows.append({"folder": folder_label, "runner": f"ovsd3 {spec} (projected from the demo's work)",
                     "seconds": seconds, "calls": row["full_calls"], "vs_genai_taylorseer": seconds / reference})
    return rows


def table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| folder | runner | s / image | whole transformer calls | vs genai+TaylorSeer |",
             "|---|---|---|---|---|"]
    for row in rows:
        calls = "" if row["calls"] is None else f"{row['calls']:g}"
        lines.append(f"| {row['folder']} | {row['runner']} | {row['seconds']:.1f} | {calls} | "
                     f"{row['vs_genai_taylorseer']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/race"))
    parser.add_argument("--repeats", type=int, default=1, help="timed images per runner (default 1)")
    parser.add_argument("--flash-repeats", type=int, default=3)
    parser.add_argument("--cache", action="append", default=None, help="ovsd3 modes (default: off, taylorseer, "
                                                                         f"{FAST_MODE})")
    parser.add_argument("--demo-quality", type=Path, default=None)
    parser.add_argument("--demo-quality-int8", type=Path, default=None,
                        help="the same measured on the demo's INT8 folder, for the INT8 rows (default: --demo-quality)")
    parser.add_argument("--skip-flash", action="store_true")
    parser.add_argument("--default-on", default="int8,fp16",
                        help="folders that run the 28-step default workload (default int8,fp16)")
    parser.add_argument("--reuse", action="store_true", help="keep the results of an earlier run's parts")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    caches = tuple(args.cache or DEFAULT_CACHES)
    demo = json.loads(args.demo_quality.read_text()) if args.demo_quality else None
    demo_of = {"FP16": demo, "INT8": json.loads(args.demo_quality_int8.read_text()) if args.demo_quality_int8 else demo}
    sections, summary = [], {}
    rows = []
    chosen = [part.strip().upper() for part in args.default_on.split(",")]
    for label, folder in [(label, folder) for label, folder in (("INT8", args.int8), ("FP16", args.fp16))
                          if label in chosen]:  # the targets are on INT8: first
        result = benchmark(folder, args.results / f"sd3-28-{label.lower()}", 28, 7.0, args.repeats, caches, args.reuse)
        summary[f"28-{label}"] = result
        rows += rows_of(result, label) + (projected_rows(result, label, demo_of[label], 28) if demo_of[label] else [])
    sections.append(table(rows, "SD3 default: 28 steps, guidance 7, 512x512, one image"))
    if not args.skip_flash:
        flash_rows = []
        for label, folder in (("FP16", args.fp16), ("INT8", args.int8)):
            result = benchmark(flash_variant(folder, args.results), args.results / f"flash-{label.lower()}", 4, 0.0,
                               args.flash_repeats, ("off",), args.reuse)
            summary[f"flash-{label}"] = result
            flash_rows += rows_of(result, label)
        fp16, int8 = (next(r["seconds"] for r in flash_rows if r["folder"] == f and r["runner"] == "ovsd3")
                      for f in ("FP16", "INT8"))
        sections.append(table(flash_rows, "Flash: 4 steps, no guidance, 512x512")
                        + f"\n\novsd3 INT8 pipeline against FP16: {fp16 / int8:.2f}x faster.")
    text = "\n\n".join(sections) + "\n"
    (args.results / "race.md").write_text(text)
    (args.results / "race.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
