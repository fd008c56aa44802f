"""Output folders that appear whole or not at all.

Everything is written to a hidden staging folder beside the target and renamed into place at the end.
An exception, Ctrl-C or SIGTERM removes the staging folder; after a SIGKILL it stays behind (nothing can
run then) but the target never exists half-written, and the next run clears such leftovers.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

from ovsd3.errors import OvsdError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_terminated(signum, frame):
    raise SystemExit(128 + signum)


class AtomicOutput:
    """``with AtomicOutput(target, overwrite) as staging:`` write into ``staging``; kept only on success."""

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self._previous_handlers: dict[int, object] = {}

    def check(self) -> None:
        """Refuse early (before any slow work) what would fail at the end."""
        if self.target.exists() and not self.overwrite:
            raise OvsdError(f"output {self.target} already exists (pass --overwrite to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise OvsdError(f"output {self.target} exists and is not a folder")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OvsdError(f"cannot create output folder {parent}: {error.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OvsdError(f"output folder {parent} is not writable")

    def _clear_leftovers(self) -> None:
        for leftover in self.target.parent.glob(f".{self.target.name}.partial-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)

    def __enter__(self) -> Path:
        self.check()
        self._clear_leftovers()
        try:
            self.staging.mkdir()
        except OSError as error:
            raise OvsdError(f"cannot write in {self.target.parent}: {error.strerror}") from None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[signum] = signal.signal(signum, _raise_terminated)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()

    def _commit(self) -> None:
        old = None
        if self.target.exists():
            if not self.overwrite:  # appeared while we worked
                shutil.rmtree(self.staging, ignore_errors=True)
                raise OvsdError(f"output {self.target} appeared while converting; nothing was replaced")
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.staging, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
