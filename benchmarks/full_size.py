"""The whole ovsd3 job at SD3 Medium's real size, without downloads: the tables the README quotes.

    python benchmarks/full_size.py --workdir /tmp/ovsd3-full-size --results benchmarks/results/full-size

Builds SD3 Medium's real architecture (transformer, both CLIPs, VAE; T5-XXL with --with-t5) with random fp16
weights and a random adapter shaped like the Flash SD3 LoRA (rank 64, its target layers), then runs, each as a
user would from the shell:

1. ``ovsd3 convert SOURCE fp16 --flash-lora ADAPTER --no-t5``   (the published recipe's model)
2. ``ovsd3 quantize fp16 int8 --calib N``                      (calibration inputs recorded from the random
   model: values do not change speed or size)
3. ``ovsd3 report fp16 int8 --size 512``                        (size, speed, first start, memory, agreement)
4. ``ovsd3 benchmark fp16 --peers`` and ``ovsd3 benchmark int8 --peers genai``, with 256 T5 tokens (zeros: no
   T5), as diffusers computes; then both again with ``--peers genai --max-sequence-length 77``, nearer the
   shorter sequence openvino.genai gives a no-T5 transformer

Every stage's wall time and the lowest MemAvailable seen while it ran are printed (the machine has 24 GB);
``--results`` receives summary.md plus each command's report, JSON and charts. Image quality figures are
meaningless on random weights (the images are noise); the demo model gives real ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def mem_available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class MemoryWatch:
    """The lowest MemAvailable while a stage runs, sampled every half second."""

    def __init__(self):
        self.lowest = mem_available_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.wait(0.5):
            self.lowest = min(self.lowest, mem_available_gib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_stage(name: str, command: list[str], stages: list[dict], log_path: Path) -> None:
    print(f"\n== {name}\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with MemoryWatch() as watch, open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
        code = process.wait()
    seconds = time.perf_counter() - started
    stages.append({"stage": name, "command": " ".join(command), "seconds": seconds,
                   "lowest_mem_available_gib": watch.lowest})
    print(f"== {name}: exit {code}, {seconds:.0f} s, lowest MemAvailable {watch.lowest:.1f} GiB", flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log_path}")


def build_source(workdir: Path, with_t5: bool) -> tuple[Path, Path]:
    import torch
    from diffusers import SD3Transformer2DModel

    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_lora, save_random_pipeline

    source = workdir / ("sd3-medium-random-fp16" + ("" if with_t5 else "-no-t5"))
    adapter = workdir / "flash-shaped-lora-r64"
    if not (source / "model_index.json").exists():
        started = time.perf_counter()
        save_random_pipeline(get_preset("sd3-medium"), source, with_t5=with_t5, dtype=torch.float16,
                             log=lambda line: print(f"  {line}", flush=True))
        print(f"built random SD3 Medium in {time.perf_counter() - started:.0f} s", flush=True)
    if not (adapter / "adapter_config.json").exists():
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=torch.float16)
        save_random_lora(transformer, adapter, rank=64, seed=3, std=0.02)  # a small update, as trained adapters are
        del transformer
    return source, adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-full-size"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/full-size"))
    parser.add_argument("--with-t5", action="store_true", help="include T5-XXL (the folder grows by 9.5 GB)")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples (recipe: 200)")
    parser.add_argument("--prompts", type=int, default=3, help="report prompts")
    parser.add_argument("--batch", default="1,2", help="benchmark batch sizes")
    parser.add_argument("--repeats", type=int, default=2, help="benchmark calls per batch size")
    parser.add_argument("--steps", type=int, default=4, help="Flash SD3's 4 steps")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the converted and quantized folders of an earlier run instead of remaking them")
    args = parser.parse_args()
    from ovsd3.report.machine import processor_name

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    log_path = args.results / "full_size.log"
    log_path.write_text("")
    source, adapter = build_source(args.workdir, args.with_t5)
    fp16, int8 = args.workdir / "sd3-flash-fp16-ov", args.workdir / "sd3-flash-int8-ov"
    report = args.workdir / "report"
    ovsd3 = [sys.executable, "-m", "ovsd3"]
    stages: list[dict] = []
    if not (args.reuse and (fp16 / "ovsd3.json").exists()):
        convert = ovsd3 + ["convert", str(source), str(fp16), "--flash-lora", str(adapter), "--overwrite"]
        run_stage("convert", convert + ([] if args.with_t5 else ["--no-t5"]), stages, log_path)
    if not (args.reuse and (int8 / "ovsd3.json").exists()):
        run_stage("quantize", ovsd3 + ["quantize", str(fp16), str(int8), "--calib", str(args.calib),
                                       "--gate-prompts", "2", "--overwrite"], stages, log_path)
    run_stage("report", ovsd3 + ["report", str(fp16), str(int8), "--label", "FP16", "--label", "INT8",
                                 "--prompts", str(args.prompts), "--size", "512", "--steps", str(args.steps),
                                 "--out", str(report), "--overwrite"], stages, log_path)
    bench = ["--batch", args.batch, "--size", "512", "--steps", str(args.steps), "--repeats", str(args.repeats),
             "--overwrite"]
    benchmarks = {"benchmark-fp16": [str(fp16), "--peers", "all", "--torch-model", str(source)],
                  "benchmark-int8": [str(int8), "--peers", "genai"],
                  "benchmark-fp16-t5len77": [str(fp16), "--peers", "genai", "--max-sequence-length", "77"],
                  "benchmark-int8-t5len77": [str(int8), "--peers", "genai", "--max-sequence-length", "77"]}
    for name, arguments in benchmarks.items():
        run_stage(name, ovsd3 + ["benchmark", *arguments, *bench, "--out", str(args.workdir / name)], stages, log_path)

    for name in ("report.md", "report.json", "chart.png", "grid.png"):
        shutil.copy(report / name, args.results / name)
    for folder in benchmarks:
        for name in ("benchmark.md", "benchmark.json", "benchmark.png"):
            shutil.copy(args.workdir / folder / name, args.results / f"{folder}-{name}")
    lines = ["# Full-size run", "",
             f"SD3 Medium architecture, random fp16 weights, Flash-shaped LoRA (rank 64) merged, "
             f"{'with' if args.with_t5 else 'no'} T5; {processor_name()} ({os.cpu_count()} CPUs), "
             f"{_total_memory_gib():.0f} GiB RAM.", "",
             "| stage | command | wall time | lowest MemAvailable |", "|---|---|---|---|"]
    for stage in stages:
        command = stage["command"].replace(sys.executable + " -m ", "").replace(str(args.workdir) + "/", "")
        lines.append(f"| {stage['stage']} | `{command}` | {stage['seconds']:.0f} s | "
                     f"{stage['lowest_mem_available_gib']:.1f} GiB |")
    (args.results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


def _total_memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20


if __name__ == "__main__":
    sys.exit(main())
