"""SD3.5 Medium or Large at full size (random weights, real shapes) through the whole job, with memory.

    python benchmarks/sd35_full_size.py --preset sd3.5-medium [--with-t5] [--workdir /tmp/ovsd3-sd35]
    python benchmarks/sd35_full_size.py --preset sd3.5-large --turbo ...   (Large Turbo's folder defaults)

Builds the preset's architecture with random fp16 weights (as the real checkpoints are stored), then runs
each stage as a user would from the shell, in its own process:

1. ``ovsd3 convert SOURCE fp16 [--no-t5]``: records the model card's defaults (Medium 40 steps, guidance 4.5,
   skip-layer guidance on blocks 7-9; Large 28 / 3.5; Turbo 4 / 0)
2. ``ovsd3 quantize fp16 int8 --calib N --calib-size S``: INT8 transformer and decoder, INT4 elsewhere
3. ``ovsd3 quantize fp16 w8 --transformer-weights int8 --vae-decoder weights`` and the same with int4: no
   calibration at all
4. one transformer call per folder at 512x512 and 1024x1024, batch 2 (guidance), 333 text tokens
5. one whole image per folder with ``ovsd3 run`` at the folder's defaults (``--image-steps`` to shorten)

For every stage: wall time, the process's peak RSS (its own, from the kernel's accounting at exit) and the
lowest MemAvailable seen while it ran (sampled twice a second). The quality gate and calibration run at
``--calib-size`` (256 by default, to keep the stage short: time and memory of quantization depend on the
model, not on the calibration images' values; their size only changes how long recording takes).
Random weights say nothing about image quality: the gate's figures here only show that it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from full_size import MemoryWatch  # a sibling script: python puts benchmarks/ on the path

GIB = 2**30
VARIANTS = {"INT8": [],  # + --calib
            "INT8 weights": ["--transformer-weights", "int8", "--vae-decoder", "weights"],
            "INT4 weights": ["--transformer-weights", "int4", "--vae-decoder", "weights"]}
CALL_SCRIPT = """
import json, statistics, sys, time
import numpy as np, openvino as ov
from ovsd3.memory import trimmed_mappings
xml, side, repeats = sys.argv[1], int(sys.argv[2]) // 8, int(sys.argv[3])
rng = np.random.default_rng(0)
inputs = {"hidden_states": rng.standard_normal((2, 16, side, side), dtype=np.float32),
          "timestep": np.full((2,), 500.0, dtype=np.float32),
          "encoder_hidden_states": rng.standard_normal((2, 333, 4096), dtype=np.float32),
          "pooled_projections": rng.standard_normal((2, 2048), dtype=np.float32)}
started = time.perf_counter()
compiled = ov.Core().compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
compile_seconds = time.perf_counter() - started
with trimmed_mappings():  # as ovsd3's runtime does: the IR's pages go once the first call has repacked them
    compiled(inputs)
times = []
for _ in range(repeats):
    started = time.perf_counter()
    compiled(inputs)
    times.append(time.perf_counter() - started)
print(json.dumps({"compile_seconds": compile_seconds, "call_seconds": statistics.median(times)}))
"""


def run_watched(command: list[str], log_path: Path) -> dict:
    """Run ``command``, echoing its output; its wall time, exit code, peak RSS and the lowest MemAvailable."""
    started = time.perf_counter()
    output = []
    with MemoryWatch() as watch, open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            output.append(line)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS, from the kernel
    return {"seconds": time.perf_counter() - started, "exit": os.waitstatus_to_exitcode(status),
            "peak_rss_gib": usage.ru_maxrss * 1024 / GIB, "lowest_available_gib": watch.lowest,
            "last_line": output[-1].strip() if output else ""}


BUILD_SCRIPT = """
import sys, torch
from pathlib import Path
from ovsd3.presets import get_preset
from ovsd3.synthetic import save_random_pipeline
save_random_pipeline(get_preset(sys.argv[1]), Path(sys.argv[2]), with_t5=sys.argv[3] == "t5", dtype=torch.float16,
                     log=lambda line: print(f"  {line}", flush=True))
"""


def build_source(preset: str, workdir: Path, with_t5: bool, turbo: bool) -> Path:
    """The random-weight diffusers folder, built in a child process: Linux carries a process's peak RSS into the
    ru_maxrss of every child it starts afterwards (vfork + exec), so a parent that held the 16 GB transformer
    would put a floor under every stage's figure."""
    name = f"{preset}{'-turbo' if turbo else ''}-random-fp16{'' if with_t5 else '-no-t5'}"
    source = workdir / name
    if not (source / "model_index.json").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD_SCRIPT, preset, str(source), "t5" if with_t5 else "no-t5"],
                       check=True)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return source


def stage(name: str, command: list[str], rows: list[dict], log_path: Path, reuse_marker: Path | None = None) -> dict:
    if reuse_marker is not None and reuse_marker.exists():
        print(f"\n== {name}: reusing {reuse_marker.parent}", flush=True)
        return {}
    shown = " ".join("<CALL_SCRIPT>" if part == CALL_SCRIPT else part for part in command)
    print(f"\n== {name}\n$ {shown}", flush=True)
    result = run_watched(command, log_path)
    rows.append({"stage": name, "command": shown, **result})
    print(f"== {name}: exit {result['exit']}, {result['seconds']:.0f} s, peak RSS {result['peak_rss_gib']:.1f} GiB, "
          f"lowest MemAvailable {result['lowest_available_gib']:.1f} GiB", flush=True)
    if result["exit"] != 0:
        raise SystemExit(f"{name} failed (exit {result['exit']}; -9 is the out-of-memory killer); see {log_path}")
    return result


def folder_stages(args, source: Path, folders: dict[str, Path], rows: list[dict], log_path: Path) -> None:
    ovsd3 = [sys.executable, "-m", "ovsd3"]
    convert = ovsd3 + ["convert", str(source), str(folders["FP16"]), "--overwrite"]
    stage("convert", convert + ([] if args.with_t5 else ["--no-t5"]), rows, log_path,
          folders["FP16"] / "ovsd3.json" if args.reuse else None)
    quantize = ovsd3 + ["quantize", str(folders["FP16"])]
    common = ["--calib-size", str(args.calib_size), "--gate-prompts", "1", "--overwrite"]
    if args.drop_source:
        shutil.rmtree(source)
    variants = {**VARIANTS, "INT8": ["--calib", str(args.calib)]}
    for label in [label for label in folders if label != "FP16"]:  # in --variants' order
        extra = variants[label]
        stage(f"quantize ({label})", quantize + [str(folders[label]), *extra, *common], rows, log_path,
              folders[label] / "ovsd3.json" if args.reuse else None)


def call_stages(args, folders: dict[str, Path], rows: list[dict], log_path: Path) -> dict:
    calls = {}
    for size in args.sizes:
        for label, folder in folders.items():
            xml = folder / "transformer" / "openvino_model.xml"
            result = stage(f"transformer call {size}x{size} ({label})",
                           [sys.executable, "-c", CALL_SCRIPT, str(xml), str(size), str(args.repeats)], rows, log_path)
            calls[(size, label)] = {**json.loads(result["last_line"]), "peak_rss_gib": result["peak_rss_gib"],
                                    "lowest_available_gib": result["lowest_available_gib"]}
    return calls


def image_stages(args, folders: dict[str, Path], rows: list[dict], log_path: Path) -> None:
    for label, folder in folders.items():
        command = [sys.executable, "-m", "ovsd3", "run", str(folder), "--prompt", "a lighthouse at dusk",
                   "--seed", "1", "--width", str(args.image_size), "--height", str(args.image_size),
                   "--no-cache", "--output", str(args.workdir / "images" / label.replace(" ", "-"))]
        if args.image_steps:
            command += ["--steps", str(args.image_steps)]
        stage(f"image {args.image_size}x{args.image_size} ({label})", command, rows, log_path)


def summary(args, rows: list[dict], calls: dict) -> str:
    lines = [f"# {args.preset}{' Turbo' if args.turbo else ''} at full size, random weights, "
             f"{'with' if args.with_t5 else 'no'} T5", "",
             "| stage | wall time | peak RSS | lowest MemAvailable |", "|---|---|---|---|"]
    for row in rows:
        if not row["stage"].startswith("transformer call"):
            lines.append(f"| {row['stage']} | {row['seconds']:.0f} s | {row['peak_rss_gib']:.1f} GiB | "
                         f"{row['lowest_available_gib']:.1f} GiB |")
    if calls:
        lines += ["", "| transformer call, batch 2, 333 text tokens | seconds | vs FP16 | peak RSS | lowest "
                  "MemAvailable |", "|---|---|---|---|---|"]
        for (size, label), call in calls.items():
            fp16 = calls.get((size, "FP16"), call)["call_seconds"]
            lines.append(f"| {size}x{size} {label} | {call['call_seconds']:.2f} | "
                         f"{fp16 / call['call_seconds']:.2f}x | {call['peak_rss_gib']:.1f} GiB | "
                         f"{call['lowest_available_gib']:.1f} GiB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("sd3.5-medium", "sd3.5-large"), default="sd3.5-medium")
    parser.add_argument("--turbo", action="store_true", help="name the source as Large Turbo (its defaults)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-sd35"))
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/results/<preset>")
    parser.add_argument("--with-t5", action="store_true", help="include T5-XXL (9.5 GB more)")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples (the recipe: 200)")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--image-steps", type=int, default=None, help="default: the folder's")
    parser.add_argument("--skip", nargs="*", default=[], choices=("quantize", "calls", "images"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="LABEL",
                        help=f"quantized folders to make (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--drop-source", action="store_true",
                        help="delete the random diffusers source once converted (Large with T5: 27.6 GB)")
    parser.add_argument("--reuse", action="store_true", help="keep folders an earlier run made")
    args = parser.parse_args()
    results = args.results or Path("benchmarks/results") / f"{args.preset}{'-turbo' if args.turbo else ''}"
    results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log_path = results / "run.log"
    log_path.write_text("")
    source = build_source(args.preset, args.workdir, args.with_t5, args.turbo)
    folders = {label: args.workdir / f"{args.preset}-{label.lower().replace(' ', '-')}"
               for label in ("FP16", *args.variants)}
    if "quantize" in args.skip:
        folders = {"FP16": folders["FP16"]}
    rows: list[dict] = []
    calls: dict = {}
    try:
        folder_stages(args, source, folders, rows, log_path)
        calls = call_stages(args, folders, rows, log_path) if "calls" not in args.skip else {}
        if "images" not in args.skip:
            image_stages(args, folders, rows, log_path)
    finally:  # the stages done so far, also when one fails or the run is stopped
        text = summary(args, rows, calls)
        (results / "summary.md").write_text(text)
        (results / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
