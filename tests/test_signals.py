"""A signal at the moments a handler swap or Python itself makes awkward, made deterministic.

CPython runs a pending signal's handler as ``signal.signal()`` starts, before it swaps; a patched ``signal.signal``
that raises KeyboardInterrupt on a chosen call stands for a Ctrl-C that came just then. The process-level case
(a KeyboardInterrupt caught after it left code run by exec(), which CPython up to 3.13 turns into death by SIGINT
at exit) runs ``python -m`` for real, the signal raised inside an exec() at a chosen point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ovsd3
from ovsd3 import atomic, cli
from ovsd3.atomic import TERMINATING_SIGNALS, Interrupts, ignore_signals, restore_handlers, signals_held


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


def test_python_m_ovsd3_exits_130_after_a_ctrl_c_caught_from_inside_exec(tmp_path):
    (tmp_path / "ctrl_c_inside_exec.py").write_text(textwrap.dedent(CTRL_C_INSIDE_EXEC))
    source = Path(ovsd3.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(source)]))
    done = subprocess.run([sys.executable, "-m", "ctrl_c_inside_exec"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stderr) == (130, "ovsd3 report: interrupted; nothing was written\n")
