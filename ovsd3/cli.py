"""The `ovsd3` command line. Heavy imports happen inside each command, so `ovsd3 --help` is instant and
`ovsd3 run` never loads PyTorch. Ctrl-C and SIGTERM are handled from main's first instruction (and, with
`python -m ovsd3`, before this module loads): one line, exit code 128 + the signal, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

from ovsd3 import __version__
from ovsd3.arguments import check_options, number, path_fits
from ovsd3.atomic import Interrupts, exit_code_of, interrupted_line
from ovsd3.errors import OvsdError

EXIT_INTERNAL = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_PSNR = 200.0  # dB: float32 round-off alone stays below 160, so a higher bound could never be met
# Checked before anything opens; quantize's counts and sizes, some of which need the folder, are checked by
# quantize_folder as soon as the folder is open
CONVERT_RULES = {"min_psnr": number(0, MAX_PSNR)}
QUANTIZE_RULES = {"source": path_fits, "output": path_fits, "calib_cache": path_fits,
                  "smooth_quant_alpha": number(0, 1, also=(-1,)),
                  "min_psnr": number(0, MAX_PSNR), "min_ssim": number(-1, 1), "max_digit_drop": number(0, 1)}


def _add_convert(subparsers) -> None:
    from ovsd3.convert import DEFAULT_MIN_PSNR
    from ovsd3.layout import DEFAULT_MODEL_ID, FLASH_LORA_ID

    parser = subparsers.add_parser(
        "convert", help="SD3 / SD3.5 (PyTorch, diffusers layout) to an OpenVINO model folder",
        usage="ovsd3 convert [-h] [--flash-lora [ADAPTER]] [--no-t5] [--weight-format {fp16,fp32}] [--overwrite] "
              "[--min-psnr MIN_PSNR] [--controlnet PATH_OR_HUB_ID] [MODEL] OUT",
        description="Convert a Stable Diffusion 3 pipeline to OpenVINO IR in the layout optimum-intel writes "
                    "(loads in openvino.genai, optimum-intel and OpenVINO Model Server). "
                    f"Example: ovsd3 convert {DEFAULT_MODEL_ID} sd3-medium-ov")
    # One positional list, so that options may come between MODEL and OUT (argparse alone cannot split an
    # optional positional from a required one once an option separates them); main() adds what follows.
    parser.add_argument("paths", nargs="+", metavar="[MODEL] OUT",
                        help=f"MODEL: model hub id or local diffusers folder (default {DEFAULT_MODEL_ID}); "
                             "OUT: output folder (created atomically)")
    parser.add_argument("--flash-lora", nargs="?", const=FLASH_LORA_ID, default=None, metavar="ADAPTER",
                        help=f"merge a PEFT LoRA into the transformer (default adapter {FLASH_LORA_ID}); "
                             "the folder then defaults to 4 steps, no guidance, the Flash sampler")
    parser.add_argument("--no-t5", action="store_true", help="leave the T5 text encoder out (zeros are used)")
    parser.add_argument("--weight-format", choices=("fp16", "fp32"), default="fp16",
                        help="weight precision of the IR (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH_OR_HUB_ID",
                        help="an SD3 ControlNet (diffusers' SD3ControlNetModel folder or hub id) to convert beside "
                             "the transformer, into controlnet/, controlnet_1/, ...; repeatable")
    parser.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR,
                        help=f"fail if any component agrees with PyTorch worse than this (default "
                             f"{DEFAULT_MIN_PSNR:.0f} dB)")
    parser.set_defaults(handler=_run_convert)


@contextlib.contextmanager
def _convert_extras_needed(task: str):
    """A runtime-only install lacks torch, nncf and friends: say which and how to get them."""
    try:
        yield
    except ImportError as error:
        raise OvsdError(f"{task} needs the convert extras ({error.name} is missing): "
                        f"pip install 'ovsd3[convert]'") from None


def _run_convert(args) -> int:
    check_options(args, CONVERT_RULES)
    if len(args.paths) > 2:
        raise OvsdError(f"convert takes MODEL and OUT, got {len(args.paths)} paths: {' '.join(args.paths)}")
    from ovsd3.layout import DEFAULT_MODEL_ID

    model, output = args.paths if len(args.paths) == 2 else (DEFAULT_MODEL_ID, args.paths[0])
    with _convert_extras_needed("conversion"):
        from ovsd3.convert import ConvertRequest, convert_model
    convert_model(ConvertRequest(
        model=model, output=Path(output), flash_lora=args.flash_lora, with_t5=not args.no_t5,
        weight_format=args.weight_format, overwrite=args.overwrite, min_psnr=args.min_psnr,
        controlnets=tuple(args.controlnet),
    ))
    return 0


def _add_run(subparsers) -> None:
    from ovsd3.runtime.cli import add_parser

    add_parser(subparsers)


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="INT8 transformer and VAE decoder, INT4 weights elsewhere, behind a quality gate",
        description="Quantize an OpenVINO SD3 folder: the transformer and the VAE decoder to INT8 (NNCF, "
                    "calibrated on their own inputs, recorded while the folder draws), text encoders and VAE "
                    "encoder to INT4 weights; refuse the result if it draws too differently from the original. "
                    "Example: ovsd3 quantize sd3-medium-ov sd3-medium-int8 --calib 200")
    parser.add_argument("source", type=Path, metavar="IN", help="folder from `ovsd3 convert` or optimum-intel")
    parser.add_argument("output", type=Path, metavar="OUT")
    parser.add_argument("--calib", type=int, default=200, help="transformer-input samples (default 200)")
    parser.add_argument("--calib-size", type=int, default=None,
                        help="resolution of calibration and gate images (default: the model's, at most 512)")
    parser.add_argument("--dataset", default="builtin",
                        help="builtin (calibration/prompts.txt), conceptual_captions (streamed), or a file "
                             "with one prompt a line")
    parser.add_argument("--calib-cache", type=Path, default=None,
                        help="where recorded inputs go (default ~/.cache/ovsd3/calibration/<key>)")
    parser.add_argument("--preset", choices=("mixed", "performance"), default=None,
                        help="NNCF preset (default: NNCF's for transformers, mixed)")
    parser.add_argument("--smooth-quant-alpha", type=float, default=None,
                        help="NNCF's SmoothQuant alpha for MatMuls, 0 to 1, or -1 to turn SmoothQuant off "
                             "(default: NNCF's)")
    parser.add_argument("--ignore", action="append", default=[], metavar="NODE",
                        help="keep this transformer node in float too (repeatable)")
    parser.add_argument("--slices", type=int, default=None,
                        help="quantize the transformer in this many block ranges (default: by size, so "
                             "SD3 Medium fits in 24 GB; 1 = whole)")
    parser.add_argument("--transformer-weights", choices=("int8", "int4"), default=None,
                        help="compress only the transformer's weights (int8 per channel, or int4 in groups of "
                             "128) instead of INT8 activations: no calibration pass for it, a smaller speed-up; "
                             "with --vae-decoder weights nothing is calibrated at all")
    parser.add_argument("--weights", choices=("int4_sym", "int4_asym", "int8"), default="int4_sym")
    parser.add_argument("--group-size", type=int, default=128,
                        help="weights sharing one INT4 scale (default 128), or -1 for one per output channel")
    parser.add_argument("--ratio", type=float, default=0.8,
                        help="share of the encoders' weights in --weights, the rest INT8 (above 0, at most 1; "
                             "default 0.8)")
    parser.add_argument("--vae-decoder", choices=("int8", "weights"), default=None,
                        help="int8: INT8 activations, calibrated on the final latents of the calibration run, "
                             "faster; weights: the --weights mode, as for the encoders (default: what "
                             "--target-cpu picks: int8 where INT8 convolutions measure faster)")
    parser.add_argument("--target-cpu", choices=("this", "avx2", "avx512", "vnni", "amx"), default="this",
                        help="the CPU the formats are chosen for. this (the default): one layer of each kind "
                             "timed float against INT8 on the CPU quantize runs on (a few seconds, once per CPU), "
                             "the attention's inputs and the VAE decoder INT8 only where that is faster. A named "
                             "level: the table's choice (vnni, amx: the whole transformer INT8; avx2, avx512 "
                             "without VNNI: its fully connected layers, the attention fused in float). The choice "
                             "and why go into ovsd3.json; `ovsd3 report` shows them")
    parser.add_argument("--gate-prompts", type=int, default=None,
                        help="held-out prompts the gate draws (default 4; 20 for the digits demo, whose share of "
                             "digits drawn as asked needs that many to see a 15-point drop)")
    parser.add_argument("--min-psnr", type=float, default=None, help="gate: mean image PSNR, dB (default 15)")
    parser.add_argument("--min-ssim", type=float, default=None, help="gate: mean image SSIM (default 0.4)")
    parser.add_argument("--max-digit-drop", type=float, default=0.15,
                        help="gate, digits demo only: how far the share of digits drawn as asked may fall "
                             "(default 0.15, 15 points: INT8 costs the demo about 5 points, which 20 prompts "
                             "measure to +-5; a broken quantization draws next to no digits)")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=_run_quantize)


def _run_quantize(args) -> int:
    check_options(args, QUANTIZE_RULES, positionals={"source": "IN", "output": "OUT"})
    from ovsd3.quantize.calibration import BUILTIN, CONCEPTUAL_CAPTIONS

    if args.dataset not in (BUILTIN, CONCEPTUAL_CAPTIONS):  # then a prompt file
        path_fits("--dataset", args.dataset)
    with _convert_extras_needed("quantization"):
        import nncf  # noqa: F401

        from ovsd3.quantize.gate import DEFAULT_MIN_PSNR, DEFAULT_MIN_SSIM
        from ovsd3.quantize.pipeline import QuantizeRequest, quantize_folder
        from ovsd3.quantize.transformer import TransformerQuantization
        from ovsd3.quantize.vae import VaeDecoderQuantization
        from ovsd3.quantize.weights import WeightCompression
    quantize_folder(QuantizeRequest(
        source=args.source, output=args.output, calib=args.calib, calib_size=args.calib_size,
        dataset=args.dataset, calib_cache=args.calib_cache,
        transformer=TransformerQuantization(subset_size=args.calib, preset=args.preset,
                                            smooth_quant_alpha=args.smooth_quant_alpha, ignore=tuple(args.ignore),
                                            slices=args.slices, weights=args.transformer_weights),
        weights=WeightCompression(mode=args.weights, group_size=args.group_size, ratio=args.ratio),
        vae_decoder=None if args.vae_decoder is None else VaeDecoderQuantization(mode=args.vae_decoder),
        target_cpu=args.target_cpu,
        gate_prompts=args.gate_prompts,
        min_psnr=DEFAULT_MIN_PSNR if args.min_psnr is None else args.min_psnr,
        min_ssim=DEFAULT_MIN_SSIM if args.min_ssim is None else args.min_ssim,
        max_digit_drop=args.max_digit_drop,
        overwrite=args.overwrite,
    ))
    return 0


def _add_report(subparsers) -> None:
    from ovsd3.report.cli import add_parsers

    add_parsers(subparsers)


def _add_serve(subparsers) -> None:
    from ovsd3.serve.cli import add_parser
    from ovsd3.serve.cluster import add_parsers

    add_parser(subparsers)
    add_parsers(subparsers)  # ovsd3 worker, ovsd3 cluster status


class ExampleHelpFormatter(argparse.HelpFormatter):
    """argparse's formatting, but a description's closing ``Example: ovsd3 ...`` (or ``Examples:``) keeps a line of
    its own, unwrapped: argparse would break it at any space or hyphen, and a command is copied whole."""

    EXAMPLE = re.compile(r"(?s)(.*?)\s*(Examples?: ovsd3 .*)")

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        found = self.EXAMPLE.fullmatch(text)
        if found is None:
            return super()._fill_text(text, width, indent)
        prose, example = found.groups()
        example = indent + " ".join(example.split())
        return f"{super()._fill_text(prose, width, indent)}\n\n{example}" if prose.strip() else example


class CommandParser(argparse.ArgumentParser):
    """Each command's parser (and its own commands'), with :class:`ExampleHelpFormatter`."""

    def __init__(self, *args, formatter_class=ExampleHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsd3", description="Stable Diffusion 3 on OpenVINO")
    parser.add_argument("--version", action="version", version=f"ovsd3 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    _add_convert(subparsers)
    _add_run(subparsers)
    _add_quantize(subparsers)
    _add_report(subparsers)
    _add_serve(subparsers)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "convert" or any(value.startswith("-") for value in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.paths += extra  # `convert SRC --overwrite OUT`
    return args


COMMANDS = ("convert", "run", "quantize", "report", "benchmark", "serve")


def main(argv: list[str] | None = None) -> int:
    try:
        with Interrupts() as interrupts:  # before the imports of parsing: Ctrl-C may come at any moment
            return _main(argv, interrupts)
    except KeyboardInterrupt as stop:  # as the handlers went in or back, outside _main's try: the same one line
        print(interrupted_line(_command_named(argv), stop), file=sys.stderr)
        return exit_code_of(stop)


def _command_named(argv: list[str] | None) -> str | None:
    """The command, for the message, until parsed."""
    return next((word for word in (sys.argv[1:] if argv is None else argv) if word in COMMANDS), None)


def _main(argv: list[str] | None, interrupts: Interrupts) -> int:
    command = _command_named(argv)
    try:
        args = _parse(argv)
        command = args.command
        code = args.handler(args)
    except KeyboardInterrupt as stop:
        return _report_interrupted(command, stop)
    except Exception as error:
        recorded = interrupts.recorded()
        if recorded is not None:  # a library turned the interrupt into an error of its own
            return _report_interrupted(command, recorded)
        if isinstance(error, OvsdError):
            print(f"ovsd3 {command}: error: {error}", file=sys.stderr)
            return EXIT_ERROR
        if os.environ.get("OVSD3_DEBUG"):  # a bug, or a library failing in a way not foreseen: still one line
            raise
        return _report_unexpected(command, error)
    # A signal whose exception a library caught, or Python swallowed (see Interrupts._unraisable), and the command
    # went on to its end: the user still said stop (AtomicOutput published nothing, seeing the same record)
    recorded = interrupts.recorded()
    return code if recorded is None else _report_interrupted(command, recorded)


def _report_interrupted(command: str | None, stop: KeyboardInterrupt) -> int:
    from ovsd3.atomic import ignore_signals

    ignore_signals()  # a second Ctrl-C while saying so must not print a traceback (main's Interrupts puts them back)
    print(interrupted_line(command, stop), file=sys.stderr)
    return exit_code_of(stop)


def _report_unexpected(command: str, error: Exception) -> int:
    from ovsd3.atomic import ENVIRONMENT_ERRNOS

    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:  # a full disk, a read-only folder
        where = f": {error.filename}" if error.filename else ""
        print(f"ovsd3 {command}: error: {error.strerror}{where}", file=sys.stderr)
        return EXIT_ERROR
    first_line = str(error).splitlines()[0] if str(error) else ""
    print(f"ovsd3 {command}: internal error: {type(error).__name__}: {first_line} "
          f"(set OVSD3_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
