"""Run by tests/test_signals.py in a pytest process of its own (see there).

A signal at the moments a handler swap or Python itself makes awkward, made deterministic.

CPython runs a pending signal's handler as ``signal.signal()`` starts, before it swaps; a patched ``signal.signal``
that raises KeyboardInterrupt on a chosen call stands for a Ctrl-C that came just then. The process-level case
(a KeyboardInterrupt caught after it left code run by exec(), which CPython up to 3.13 turns into death by SIGINT
at exit) runs ``python -m`` for real, the signal raised inside an exec() at a chosen point. A signal whose exception
never gets through is raised for real inside a weakref callback (Python swallows it there, as it did in importlib's
module-lock cleanup) or caught by a stand-in library."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

import ovsd3
from ovsd3 import atomic, cli
from ovsd3.atomic import (TERMINATING_SIGNALS, AtomicOutput, Interrupts, ignore_signals, restore_handlers,
                          signals_held)


@pytest.fixture(autouse=True)
def own_handlers():
    """Known handlers to start from (not pytest's), the real ones put back after."""
    saved = {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS}
    for signum in TERMINATING_SIGNALS:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    yield {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS}
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def interrupt_at_call(monkeypatch, number: int) -> list[int]:
    """signal.signal raises KeyboardInterrupt, before swapping, on its ``number``-th call from now (1 = next);
    returns the signal numbers of the calls made."""
    real, calls = signal.signal, []

    def signal_with_a_pending_ctrl_c(signum, handler):
        calls.append(signum)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(signum, handler)

    monkeypatch.setattr(atomic.signal, "signal", signal_with_a_pending_ctrl_c)
    return calls


def test_restore_handlers_puts_every_one_back_when_a_signal_comes_between_them(monkeypatch, own_handlers):
    for signum in TERMINATING_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    calls = interrupt_at_call(monkeypatch, 2)  # as SIGTERM's goes back, SIGINT's already back
    with pytest.raises(KeyboardInterrupt):
        restore_handlers(own_handlers)
    assert calls[:2] == [signal.SIGINT, signal.SIGTERM]
    assert {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS} == own_handlers


@pytest.mark.parametrize("number", [1, 2, 3])
def test_interrupts_entered_with_a_signal_on_the_way_in_leaves_the_handlers_as_they_were(monkeypatch, own_handlers,
                                                                                        number):
    interrupt_at_call(monkeypatch, number)
    with pytest.raises(KeyboardInterrupt):
        with Interrupts():
            pytest.fail("the body runs although entering was interrupted")
    assert {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS} == own_handlers


@pytest.mark.parametrize("number", [2, 3, 5, 6])  # 1-3: going in; 4-6: going back
def test_signals_held_never_leaves_its_holding_handlers_behind(monkeypatch, own_handlers, number):
    interrupt_at_call(monkeypatch, number)
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            pass
    # a holding handler left on SIGTERM would swallow every later SIGTERM
    assert {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS} == own_handlers


def test_ignore_signals_drops_a_signal_that_comes_as_it_swaps(monkeypatch):
    interrupt_at_call(monkeypatch, 1)
    ignore_signals()
    assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in TERMINATING_SIGNALS)


@pytest.mark.parametrize("number", [2, 3, 5])  # main's handlers going in (2, 3) or back (5: SIGINT's)
def test_main_interrupted_as_its_handlers_go_in_or_back_says_one_line_and_130(monkeypatch, capsys, own_handlers,
                                                                               number):
    monkeypatch.setattr(cli, "_main", lambda argv, interrupts: 0)
    interrupt_at_call(monkeypatch, number)
    try:
        code = cli.main(["report", "a", "--out", "b"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main: a traceback from the console script")
    assert code == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "ovsd3 report: interrupted; nothing was written\n"
    assert {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS} == own_handlers


# The command line parses inside an exec(), which receives the Ctrl-C, as a dataclass being made while ovsd3
# imports can; the interrupt is caught and reported, and the exit status must be 130, not death by SIGINT.
CTRL_C_INSIDE_EXEC = """
import runpy, signal, sys

import ovsd3.cli

parse = ovsd3.cli._parse

def parse_after_a_ctrl_c_inside_exec(argv):
    exec("signal.raise_signal(signal.SIGINT)", {"signal": signal})
    return parse(argv)

ovsd3.cli._parse = parse_after_a_ctrl_c_inside_exec
sys.argv = ["ovsd3", "report", "a", "--out", "b"]
runpy.run_module("ovsd3", run_name="__main__", alter_sys=True)
"""


def run_script(tmp_path: Path, name: str, script: str) -> subprocess.CompletedProcess:
    """``script`` saved as module ``name`` in ``tmp_path``, run as ``python -m name`` there with this ovsd3."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(script))
    source = Path(ovsd3.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(source)]))
    return subprocess.run([sys.executable, "-m", name], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_python_m_ovsd3_exits_130_after_a_ctrl_c_caught_from_inside_exec(tmp_path):
    done = run_script(tmp_path, "ctrl_c_inside_exec", CTRL_C_INSIDE_EXEC)
    assert (done.returncode, done.stderr) == (130, "ovsd3 report: interrupted; nothing was written\n")


class _Referent:
    """Something a weakref can follow (an object() cannot be)."""


def signal_in_a_weakref_callback(signum: int) -> None:
    """The signal comes while a weakref callback runs, as importlib's module-lock cleanup
    (``_get_module_lock.<locals>.cb``) does while ovsd3 imports: the handler runs there and raises, and Python,
    which cannot raise out of a callback, hands the exception to sys.unraisablehook and goes on."""
    referent = _Referent()
    reference = weakref.ref(referent, lambda reference: signal.raise_signal(signum))
    del referent  # the callback runs here
    assert reference() is None


def signal_a_library_swallows(signum: int) -> None:
    try:
        signal.raise_signal(signum)
    except KeyboardInterrupt:  # as a library's bare `except BaseException: pass` would
        pass


def write_report(out: Path) -> None:
    with AtomicOutput(out, command="report") as staging:
        (staging / "report.md").write_text("made after the user said stop")


def with_handler(monkeypatch, handler) -> None:
    """The command parsed as usual, then ``handler`` run instead of its own."""
    parse = cli._parse

    def parse_then_use_handler(argv):
        args = parse(argv)
        args.handler = handler
        return args

    monkeypatch.setattr(cli, "_parse", parse_then_use_handler)


ENDINGS = {signal.SIGINT: (130, "ovsd3 report: interrupted; nothing was written\n"),
           signal.SIGTERM: (143, "ovsd3 report: terminated (SIGTERM); nothing was written\n")}


@pytest.mark.parametrize("writes", [True, False], ids=["then-writes", "then-returns"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_python_swallows_in_a_weakref_callback_is_quiet_and_still_stops_the_command(
        monkeypatch, capsys, tmp_path, signum, writes):
    shown = []

    def hook(unraisable):  # what Python would print as "Exception ignored in ..." with a traceback
        shown.append(unraisable.exc_type)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    out = tmp_path / "out"

    def report_after_the_signal(args):
        signal_in_a_weakref_callback(signum)
        if writes:
            write_report(out)
        return 0

    with_handler(monkeypatch, report_after_the_signal)
    code = cli.main(["report", "a", "--out", str(out)])
    assert shown == []
    assert (code, capsys.readouterr().err) == ENDINGS[signum]
    assert list(tmp_path.iterdir()) == []
    assert sys.unraisablehook is hook  # put back as main ends, with the handlers


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_a_library_swallows_before_an_output_stops_its_commit(monkeypatch, capsys, tmp_path, signum):
    out = tmp_path / "out"

    def report_after_a_swallowed_signal(args):
        signal_a_library_swallows(signum)  # while the command loads: before the output's own Interrupts began
        write_report(out)
        return 0

    with_handler(monkeypatch, report_after_a_swallowed_signal)
    assert (cli.main(["report", "a", "--out", str(out)]), capsys.readouterr().err) == ENDINGS[signum]
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_commits_nothing_after_a_signal_swallowed_before_it_began(tmp_path):
    out = tmp_path / "out"
    with Interrupts():
        signal_a_library_swallows(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            write_report(out)
    assert list(tmp_path.iterdir()) == []


def test_run_writes_no_image_after_a_swallowed_signal(tmp_path):
    from PIL import Image

    from ovsd3.runtime.cli import save_new_png

    params = {"prompt": "a", "num_inference_steps": 1, "sampler": "euler", "guidance_scale": 1.0, "seed": 0,
              "width": 8, "height": 8, "model": "m"}
    with Interrupts():
        signal_a_library_swallows(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            save_new_png(Image.new("RGB", (8, 8)), tmp_path, params, "-0")
    assert list(tmp_path.iterdir()) == []


def test_other_unraisable_exceptions_are_still_shown(monkeypatch):
    shown = []

    def hook(unraisable):
        shown.append(unraisable.exc_type)

    monkeypatch.setattr(sys, "unraisablehook", hook)

    def failing_callback(args):
        referent = _Referent()
        reference = weakref.ref(referent, lambda reference: 1 / 0)
        del referent
        return 0 if reference() is None else 1

    with_handler(monkeypatch, failing_callback)
    assert cli.main(["report", "a", "--out", "b"]) == 0
    assert shown == [ZeroDivisionError] and sys.unraisablehook is hook


# python -m ovsd3 for real: Ctrl-C comes in a weakref callback after __main__'s handlers went in and before
# cli.main's did (so only __main__'s Interrupts records it), and the command then writes its output.
CTRL_C_IN_A_WEAKREF_CALLBACK = """
import signal, sys, runpy, weakref

import ovsd3.cli
from ovsd3.atomic import AtomicOutput

main, parse = ovsd3.cli.main, ovsd3.cli._parse

class Referent:
    pass

def main_after_a_ctrl_c_in_a_weakref_callback(argv=None):
    referent = Referent()
    reference = weakref.ref(referent, lambda reference: signal.raise_signal(signal.SIGINT))
    del referent
    return main(argv)

def report(args):
    with AtomicOutput(args.out, command="report") as staging:
        (staging / "report.md").write_text("made after the user said stop")
    return 0

def parse_then_report(argv):
    args = parse(argv)
    args.handler = report
    return args

ovsd3.cli.main, ovsd3.cli._parse = main_after_a_ctrl_c_in_a_weakref_callback, parse_then_report
sys.argv = ["ovsd3", "report", "a", "--out", "out"]
runpy.run_module("ovsd3", run_name="__main__", alter_sys=True)
"""


def test_python_m_ovsd3_after_a_ctrl_c_in_a_weakref_callback_says_one_line_writes_nothing_and_exits_130(tmp_path):
    done = run_script(tmp_path, "ctrl_c_in_a_weakref_callback", CTRL_C_IN_A_WEAKREF_CALLBACK)
    assert (done.returncode, done.stderr) == (130, "ovsd3 report: interrupted; nothing was written\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum, code, line", [
    (signal.SIGINT, cli.EXIT_INTERRUPTED, "ovsd3 quantize: interrupted; nothing was written"),
    (signal.SIGTERM, (128 + signal.SIGTERM), "ovsd3 quantize: terminated (SIGTERM); nothing was written"),
])
def test_an_interrupt_a_library_turns_into_its_own_error_is_still_an_interrupt(monkeypatch, capsys, tmp_path,
                                                                               signum, code, line):
    def library_call(args):  # as pydantic did, building its schema when Ctrl-C came: "SchemaError"
        try:
            signal.raise_signal(signum)
        except KeyboardInterrupt:
            raise RuntimeError("SchemaError: Error building `model` serializer") from None

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr("ovsd3.cli._run_quantize", library_call)
    assert cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")]) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert {number: signal.getsignal(number) for number in handlers} == handlers  # the caller's, as they were
