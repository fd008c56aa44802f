"""The `ovsd3` command line. Heavy imports happen inside each command, so `ovsd3 --help` is instant and
`ovsd3 run` never loads PyTorch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ovsd3 import __version__
from ovsd3.errors import OvsdError
from ovsd3.layout import DEFAULT_MODEL_ID, FLASH_LORA_ID

EXIT_INTERNAL = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_convert(subparsers) -> None:
    from ovsd3.convert import DEFAULT_MIN_PSNR

    parser = subparsers.add_parser(
        "convert", help="SD3 / SD3.5 (PyTorch, diffusers layout) to an OpenVINO model folder",
        description="Convert a Stable Diffusion 3 pipeline to OpenVINO IR in the layout optimum-intel writes "
                    "(loads in openvino.genai, optimum-intel and OpenVINO Model Server).")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL_ID, metavar="MODEL",
                        help=f"model hub id or local diffusers folder (default {DEFAULT_MODEL_ID})")
    parser.add_argument("output", type=Path, metavar="OUT", help="output folder (created atomically)")
    parser.add_argument("--flash-lora", nargs="?", const=FLASH_LORA_ID, default=None, metavar="ADAPTER",
                        help=f"merge a PEFT LoRA into the transformer (default adapter {FLASH_LORA_ID}); "
                             "the folder then defaults to 4 steps, no guidance, the Flash sampler")
    parser.add_argument("--no-t5", action="store_true", help="leave the T5 text encoder out (zeros are used)")
    parser.add_argument("--weight-format", choices=("fp16", "fp32"), default="fp16",
                        help="weight precision of the IR (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR,
                        help=f"fail if any component agrees with PyTorch worse than this (default "
                             f"{DEFAULT_MIN_PSNR:.0f} dB)")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    try:
        from ovsd3.convert import ConvertRequest, convert_model
    except ImportError as error:
        raise OvsdError(f"conversion needs the convert extras ({error.name} is missing): "
                        f"pip install 'ovsd3[convert]'") from None
    convert_model(ConvertRequest(
        model=args.model, output=args.output, flash_lora=args.flash_lora, with_t5=not args.no_t5,
        weight_format=args.weight_format, overwrite=args.overwrite, min_psnr=args.min_psnr,
    ))
    return 0


def _add_run(subparsers) -> None:
    from ovsd3.runtime.cli import add_parser

    add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsd3", description="Stable Diffusion 3 on OpenVINO")
    parser.add_argument("--version", action="version", version=f"ovsd3 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subparsers)
    _add_run(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except OvsdError as error:
        print(f"ovsd3 {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"ovsd3 {args.command}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug, or a library failing in a way not foreseen: still one line
        if os.environ.get("OVSD3_DEBUG"):
            raise
        first_line = str(error).splitlines()[0] if str(error) else ""
        print(f"ovsd3 {args.command}: internal error: {type(error).__name__}: {first_line} "
              f"(set OVSD3_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
