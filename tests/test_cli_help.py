"""Every command's --help shows one runnable example, on a line of its own; `ovsd3 --version` says the version."""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
import sys

import pytest

from ovsd3 import __version__
from ovsd3.cli import _parse, build_parser

COMMANDS = ("convert", "run", "quantize", "report", "benchmark", "serve", "worker", "cluster")
MARKERS = ("Example: ovsd3 ", "Examples: ovsd3 ")


def help_text(command: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    return printed.getvalue()


def test_every_command_is_listed():
    """COMMANDS is all of them: a new command without an example would otherwise go unnoticed."""
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert set(commands) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example_that_parses(command, monkeypatch):
    """The example is one unwrapped line (narrow terminals too), for this command, and its options exist: it
    parses as the command line it shows (several, separated by "; ", for "Examples:")."""
    monkeypatch.setenv("COLUMNS", "60")  # argparse wraps to the terminal: the example line must survive it
    lines = [line.strip() for line in help_text(command).splitlines()]
    examples = [line for line in lines if line.startswith(MARKERS)]
    assert len(examples) == 1, examples
    commands = examples[0].split(": ", 1)[1].split("; ")
    for example in commands:
        words = shlex.split(example)
        assert words[:2] == ["ovsd3", command]
        args = _parse(words[1:])  # an unknown option or a missing argument would exit 2 here
        assert args.command == command


def test_version():
    done = subprocess.run([sys.executable, "-m", "ovsd3", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, f"ovsd3 {__version__}")
