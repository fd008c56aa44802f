"""`ovsd3 report` and `ovsd3 benchmark` on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ovsd3.arguments import check_options, path_fits

# Checked before anything opens; the generation settings and counts by ovsd3.report.settings, also before any work
REPORT_RULES = {"folders": path_fits, "out": path_fits, "prompt_file": path_fits}
BENCHMARK_RULES = {"folder": path_fits, "out": path_fits}


def _add_max_sequence_length(parser) -> None:
    parser.add_argument("--max-sequence-length", type=int, default=256,
                        help="T5 tokens, zeros when the folder has no T5 (default 256, as diffusers); openvino.genai "
                             "feeds a no-T5 transformer a shorter sequence: 77 comes close to it")


def _add_image_size(parser) -> None:
    """--width/--height as `ovsd3 run` takes them; --size N the square shorthand (not with them)."""
    parser.add_argument("--width", type=int, default=None,
                        help="image width, a multiple of 16 for SD3 (default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--size", type=int, default=None,
                        help="square images: --size N is --width N --height N (not with them)")


def add_parsers(subparsers) -> None:
    _add_report_parser(subparsers)
    _add_benchmark_parser(subparsers)


def _add_report_parser(subparsers) -> None:
    report = subparsers.add_parser(
        "report", help="compare folders: size, speed, quality (report.md/json, image grid, chart)",
        description="Generate the same prompts with the same seeds, steps and size from two or more folders "
                    "(typically FP16 and quantized) and compare size, speed and image quality against the first. "
                    "Example: ovsd3 report sd3-medium-ov sd3-medium-int8 --prompts 5 --width 1024 --height 576 "
                    "--out report/")
    report.add_argument("folders", nargs="+", type=Path, metavar="FOLDER", help="the first is the reference")
    report.add_argument("--out", type=Path, required=True, help="report folder (created atomically)")
    report.add_argument("--prompts", type=int, default=3, help="number of prompts (default 3)")
    report.add_argument("--prompt-file", type=Path, default=None,
                        help="prompts, one a line (default: calibration/heldout_prompts.txt)")
    report.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed + i")
    report.add_argument("--steps", type=int, default=None, help="default: the first folder's")
    report.add_argument("--guidance", type=float, default=None, help="default: the first folder's")
    _add_image_size(report)
    report.add_argument("--device", default="AUTO")
    report.add_argument("--clip", default=None, metavar="MODEL",
                        help="CLIP model (hub id or local folder) for CLIP scores; needs the convert extras")
    _add_max_sequence_length(report)
    report.add_argument("--digits", action=argparse.BooleanOptionalAction, default=None,
                        help="score the share of images whose digit and colour match the prompt (default: on "
                             "when the first folder is ovsd3's digits demo, whose prompts it then uses)")
    report.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                        help="also draw the digits demo's control images (outlines of held-out digits, prompts "
                             "naming other digits) through each folder with a ControlNet and score the share that "
                             "follows them (default: on when the digits are scored and the first folder has a "
                             "ControlNet)")
    report.add_argument("--control-cases", type=int, default=20, metavar="N",
                        help="control images drawn per folder (default 20)")
    report.add_argument("--label", action="append", default=[], help="a column label per folder (repeat)")
    report.add_argument("--cache", action="append", default=None, metavar="MODE",
                        help="step-caching mode, as `ovsd3 run --cache` (repeat: each folder runs with each, "
                             "one column per pair; default off)")
    report.add_argument("--genai", action="store_true",
                        help="also draw the prompts with openvino.genai's Text2ImagePipeline from the first folder, "
                             "its TaylorSeer step caching off and on (its default): two more columns")
    report.add_argument("--full-size", nargs="?", const="sd3-medium", default=None, metavar="PRESET",
                        help="also estimate what INT8 gains at full size on this CPU: a few blocks of PRESET's "
                             "transformer (sd3-medium, the default, or sd3.5-large) at full width with random "
                             "weights, FP16 against INT8 at 512x512 and 1024x1024 (about 3 minutes on 2 cores; "
                             "needs the convert extras)")
    report.add_argument("--overwrite", action="store_true")
    report.set_defaults(handler=_run_report)


def _add_benchmark_parser(subparsers) -> None:
    benchmark = subparsers.add_parser(
        "benchmark", help="images per second across batch sizes, optionally against openvino.genai and diffusers",
        description="Time generation at several batch sizes; with --peers also openvino.genai (step caching "
                    "off and on) on the same folder and diffusers on its PyTorch model (fp32 and bf16). "
                    "Example: ovsd3 benchmark sd3-medium-int8 --batch 1,2,4 --width 1024 --height 576 --peers genai")
    benchmark.add_argument("folder", type=Path, metavar="MODEL_DIR")
    benchmark.add_argument("--batch", default="1,2,4", help="batch sizes, comma-separated (default 1,2,4)")
    benchmark.add_argument("--steps", type=int, default=None, help="default: the folder's")
    benchmark.add_argument("--guidance", type=float, default=None, help="default: the folder's")
    _add_image_size(benchmark)
    benchmark.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (default 3)")
    benchmark.add_argument("--device", default="AUTO")
    _add_max_sequence_length(benchmark)
    benchmark.add_argument("--peers", nargs="?", const="all", default=None, metavar="PEERS",
                           help="also run the peers: all (default), or genai and/or diffusers, comma-separated; "
                                "diffusers needs the PyTorch model")
    benchmark.add_argument("--torch-model", default=None, metavar="MODEL",
                           help="the diffusers model the folder was converted from (default: its source, when "
                                "that is a local folder)")
    benchmark.add_argument("--cache", action="append", default=None, metavar="MODE",
                           help="step-caching mode for ovsd3, as `ovsd3 run --cache` (repeat: one ovsd3 runner "
                                "each; default off)")
    benchmark.add_argument("--out", type=Path, default=None, help="default: benchmark-<folder name>")
    benchmark.add_argument("--overwrite", action="store_true")
    benchmark.set_defaults(handler=_run_benchmark)


def _needs_report_extras():
    from ovsd3.errors import OvsdError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OvsdError("reports draw charts with matplotlib: pip install 'ovsd3[report]'") from None


def _run_report(args) -> int:
    check_options(args, REPORT_RULES)
    _needs_report_extras()
    from ovsd3.report.compare import ReportRequest, make_report

    make_report(ReportRequest(folders=args.folders, out=args.out, prompts=args.prompts, prompt_file=args.prompt_file,
                              seed=args.seed, steps=args.steps, guidance_scale=args.guidance, size=args.size,
                              width=args.width, height=args.height, device=args.device, clip=args.clip,
                              max_sequence_length=args.max_sequence_length,
                              labels=args.label, caches=args.cache or ["off"], digits=args.digits,
                              genai=args.genai, full_size=args.full_size, control=args.control,
                              control_cases=args.control_cases,
                              overwrite=args.overwrite))
    return 0


def _run_benchmark(args) -> int:
    check_options(args, BENCHMARK_RULES)
    _needs_report_extras()
    from ovsd3.report.benchmark import BenchmarkRequest, parse_batches, parse_peers, run_benchmark

    out = args.out or Path(f"benchmark-{args.folder.resolve().name}")
    run_benchmark(BenchmarkRequest(folder=args.folder, out=out, batches=parse_batches(args.batch), steps=args.steps,
                                   guidance_scale=args.guidance, size=args.size, width=args.width,
                                   height=args.height, repeats=args.repeats,
                                   max_sequence_length=args.max_sequence_length, device=args.device,
                                   peers=parse_peers(args.peers) if args.peers else (), torch_model=args.torch_model,
                                   caches=tuple(args.cache or ("off",)), overwrite=args.overwrite))
    return 0
