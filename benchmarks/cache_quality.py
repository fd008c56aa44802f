"""What each step-caching mode costs in quality, on the demo model: the frontier of work against digits drawn.

    python benchmarks/cache_quality.py FOLDER -n 240 --out benchmarks/results/cache-quality \\
        --cache off --cache taylorseer --cache first-block-cache ...

FOLDER is an OpenVINO folder of the demo model (``bash demo/quickstart.sh`` makes ``digits-quickstart/fp16``
and ``/int8``). Every mode draws the same prompts with the same seeds at 28 steps and guidance 7 (the
defaults); for each it prints the share of images whose digit and colour match the prompt (the demo's
scorer), image PSNR and SSIM against the uncached image of the same prompt and seed, the transformer work
(blocks run, as a share of the uncached run's) and calls, and seconds per image. ``--out`` also gets
``cache_quality.json`` and ``cache_quality.png`` (work against digit share, one point per mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SD3_MEDIUM_BLOCKS = 24  # a first-block probe costs 1/24 of a call there, 1/4 on the demo's 4 blocks
DEFAULT_MODES = ("off", "taylorseer", "taylorseer:interval=2", "taylorseer:interval=4",
                 "taylorseer:before=3", "taylorseer:order=2", "first-block-cache:threshold=0.05",
                 "first-block-cache:threshold=0.1", "first-block-cache:threshold=0.2",
                 "guidance-interval:low=0.0,high=0.9", "guidance-interval:low=0.1,high=1.0",
                 "taylorseer+guidance-interval:low=0.1,high=1.0")


def draw(pipe, spec: str, prompts: list[str], steps: int, guidance: float, noise: str) -> dict:
    images, work, full_size_work, calls, seconds = [], 0.0, 0.0, 0, []
    for seed, prompt in enumerate(prompts):
        started = time.perf_counter()
        result = pipe(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, cache=spec, noise=noise)
        seconds.append(time.perf_counter() - started)
        images.append(result.images[0])
        work += result.cache_stats.work
        full_size_work += result.cache_stats.work_with(SD3_MEDIUM_BLOCKS)
        calls += result.cache_stats.full_calls
    return {"images": images, "work": work / (steps * len(prompts)),
            "work_sd3_medium": full_size_work / (steps * len(prompts)),
            "full_calls": calls / len(prompts), "seconds": float(np.median(seconds))}


def score(scorer, run: dict, reference: list, prompts: list[str]) -> dict:
    from ovsd3.metrics import psnr, ssim

    pairs = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
             for a, b in zip(reference, run["images"])]
    result = scorer.score(run["images"], prompts).to_json()
    return {"digit_share": result["accuracy"], "digit": result["digit_accuracy"],
            "colour": result["colour_accuracy"],
            "psnr": float(np.mean([min(psnr(a, b, data_range=255.0), 100.0) for a, b in pairs])),
            "ssim": float(np.mean([ssim(a, b, data_range=255.0) for a, b in pairs])),
            **{key: run[key] for key in ("work", "work_sd3_medium", "full_calls", "seconds")}}


def chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 5.5))
    for number, (spec, row) in enumerate(rows.items(), 1):  # numbered points, the modes in the legend
        x, y = row["work_sd3_medium"] * 100, row["digit_share"] * 100
        axes.scatter(x, y, label=f"{number}: {spec} ({y:.1f}%, {x:.0f}%)")
        axes.annotate(str(number), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xlabel("transformer work at SD3 Medium's 24 blocks (% of the uncached run's)")
    axes.set_ylabel("digits drawn as asked (%)")
    axes.set_xlim(0, 105)
    axes.set_title("Step caching on the demo model: work against quality")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def merge(paths: list[Path], out: Path | None) -> int:
    runs = [json.loads(path.read_text()) for path in paths]
    settings = {(run["prompts"], run["steps"], run["guidance"], round(run["modes"]["off"]["digit_share"], 6))
                for run in runs}
    if len(settings) != 1:
        raise SystemExit(f"cannot merge runs with different prompts, settings or uncached results: {settings}")
    rows = {}
    for run in runs:
        for spec, row in run["modes"].items():
            rows.setdefault(spec, row)
    print_table(rows)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cache_quality.json").write_text(json.dumps({**runs[0], "modes": rows}, indent=2) + "\n")
        chart(rows, out / "cache_quality.png")
    return 0


def print_table(rows: dict) -> None:
    print("| cache | digits as asked | digit | colour | PSNR vs off | SSIM vs off | transformer work (demo) | "
          "work at 24 blocks | whole calls | s / image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, row in rows.items():
        print(f"| `{spec}` | {row['digit_share']:.1%} | {row['digit']:.1%} | {row['colour']:.1%} | "
              f"{row['psnr']:.1f} dB | {row['ssim']:.3f} | {row['work']:.0%} | {row['work_sd3_medium']:.0%} | "
              f"{row['full_calls']:.1f} | {row['seconds']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("-n", type=int, default=240, help="generations per mode")
    parser.add_argument("--cache", action="append", default=None, help="a cache spec (repeatable)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--noise", choices=("numpy", "torch"), default="numpy",
                        help="the seeds' random stream (default numpy: the committed results were drawn with it)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="instead of drawing, join earlier runs' cache_quality.json (same folder, prompts and "
                             "settings) into one table and chart in --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    from ovsd3.demo.digits import DigitScorer, evaluation_prompts
    from ovsd3.runtime import SD3Pipeline

    modes = ["off", *[spec for spec in (args.cache or DEFAULT_MODES) if spec != "off"]]
    prompts = evaluation_prompts(args.n)
    pipe = SD3Pipeline.load(args.folder, device="CPU", cache_dir=None)
    scorer = DigitScorer()
    runs = {spec: draw(pipe, spec, prompts, args.steps, args.guidance, args.noise) for spec in modes}
    rows = {spec: score(scorer, run, runs["off"]["images"], prompts) for spec, run in runs.items()}
    print(f"{args.folder}: {len(prompts)} prompts, seeds 0-{len(prompts) - 1}, {args.steps} steps, "
          f"guidance {args.guidance}\n")
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cache_quality.json").write_text(json.dumps(
            {"folder": str(args.folder), "prompts": len(prompts), "steps": args.steps, "guidance": args.guidance,
             "noise": args.noise, "modes": rows}, indent=2) + "\n")
        chart(rows, args.out / "cache_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
