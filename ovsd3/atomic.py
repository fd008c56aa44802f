"""Output folders that appear whole or not at all, and never in place of what the user brought.

Everything is written to a hidden staging folder beside the target and renamed into place at the end.
An exception, Ctrl-C or SIGTERM removes the staging folder and any parent folders this run created; after a
SIGKILL the staging folder stays behind (nothing can run then) but the target never exists half-written, and
the next run clears such leftovers. An interrupt that a library swallows or turns into its own error still
stops the commit: the command ends interrupted, not with a folder made after the user said stop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

from ovsd3.errors import OvsdError

# A full disk, a read-only file system or a permission refused while writing: the user's environment, told in
# one line, not an internal error.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
LOW_DISK_BYTES = 16 * 2**20  # a write that failed with less than this left failed for want of space
EXIT_CHILD_INTERRUPTED = 0  # a forked helper ends silently on Ctrl-C: its parent reports the interrupt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


def _raise_terminated(signum, frame):
    raise SystemExit(128 + signum)


def overlap(target: Path, source: Path) -> str | None:
    """How ``target`` overlaps ``source`` ("is", "lies inside", "contains"), both resolved; None if apart."""
    target, source = target.resolve(), source.resolve()
    if target == source:
        return "is"
    if source in target.parents:
        return "lies inside"
    if target in source.parents:
        return "contains"
    return None


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first (what writing into it would create)."""
    folder = Path(folder).expanduser().absolute()
    return [path for path in (folder, *folder.parents) if not path.exists()]


def nearest_existing(folder: Path) -> Path:
    """``folder`` or its nearest parent that exists."""
    folder = Path(folder).expanduser().absolute()
    return next(path for path in (folder, *folder.parents) if path.exists())


def check_apart(target: Path, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output that is, lies inside or contains one of the inputs (models, prompt files, images)."""
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub id, or a file that the command checks itself
        relation = overlap(Path(target).expanduser(), Path(source).expanduser())
        if relation:
            raise OvsdError(f"output {target} {relation} the input {source}: choose a folder apart from the inputs "
                            "(nothing was written)")


@contextlib.contextmanager
def cleaned_up_on_failure(folder: Path, byproducts: Iterable[Path] = ()) -> Iterator[None]:
    """On an exception (Ctrl-C too), remove the ``byproducts`` (files such as a preview, which the command
    rewrites in place) and then ``folder`` and those of its parents that did not exist on entry, where they
    are empty: what a failed command created on the way."""
    missing = missing_folders(folder)
    try:
        yield
    except BaseException:
        for byproduct in byproducts:
            Path(byproduct).unlink(missing_ok=True)
        for path in missing:
            try:
                path.rmdir()
            except OSError:
                break
        raise


class AtomicOutput:
    """``with AtomicOutput(target, command=..., overwrite=..., inputs=...) as staging:`` write into
    ``staging``; kept only on success. ``command`` names what writes it (see :func:`ovsd3.layout.made_by`):
    ``overwrite`` replaces only a folder that the same command made, never one the user brought."""

    def __init__(self, target: str | Path, *, command: str, overwrite: bool = False,
                 inputs: Iterable[Path | str | None] = ()):
        self.target = Path(target).expanduser().absolute()
        self.command = command
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self.interrupted = False
        self._created_parents: list[Path] = []
        self._previous_handlers: dict[int, object] = {}
        self._owner_pid = os.getpid()

    def check(self) -> None:
        """Refuse early (before any slow work) what would fail or destroy something at the end."""
        if self.target.is_symlink():
            raise OvsdError(f"output {self.target} is a symbolic link: name a real folder")
        check_apart(self.target, self.inputs)
        if self.target.exists():
            self._check_replaceable()
        parent = nearest_existing(self.target.parent)
        if not parent.is_dir():
            raise OvsdError(f"cannot create output folder {self.target.parent}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OvsdError(f"output folder {parent} is not writable")

    def _check_replaceable(self) -> None:
        from ovsd3.layout import made_by

        if not self.target.is_dir():
            raise OvsdError(f"output {self.target} exists and is not a folder")
        if not self.overwrite:
            raise OvsdError(f"output {self.target} already exists (pass --overwrite to replace it)")
        maker = made_by(self.target)
        if maker != self.command and any(self.target.iterdir()):
            made = f"was written by `ovsd3 {maker}`" if maker else "was not written by ovsd3"
            raise OvsdError(f"output {self.target} {made}: --overwrite replaces only an earlier "
                            f"`ovsd3 {self.command}` output (nothing was replaced)")

    def _make_parents(self) -> None:
        for folder in reversed(missing_folders(self.target.parent)):
            folder.mkdir()
            self._created_parents.append(folder)

    def _clear_leftovers(self) -> None:
        for leftover in self.target.parent.glob(f".{self.target.name}.partial-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)

    def _on_interrupt(self, signum, frame):
        if os.getpid() != self._owner_pid:  # a forked helper (OpenVINO's telemetry sender): leave quietly
            os._exit(EXIT_CHILD_INTERRUPTED)
        self.interrupted = True
        raise KeyboardInterrupt

    def __enter__(self) -> Path:
        self.check()
        try:
            self._make_parents()
            self._clear_leftovers()
            self.staging.mkdir()
        except OSError as error:
            self._remove_created_parents()
            raise OvsdError(f"cannot write in {self.target.parent}: {error.strerror}") from None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[signum] = signal.signal(signum, _raise_terminated)
            self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.interrupted:
                self._commit()
                return
            disk_full = _disk_full(self.staging)  # before the staging folder frees its space
            shutil.rmtree(self.staging, ignore_errors=True)
            self._remove_created_parents()
            if self.interrupted and exc_type is not KeyboardInterrupt:  # swallowed, or turned into another error
                raise KeyboardInterrupt from None
            if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
                raise OvsdError(f"cannot write {self.target}: {exc.strerror} (nothing was written)") from None
            if disk_full and isinstance(exc, Exception) and not isinstance(exc, OvsdError):
                # OpenVINO's writers say "iostream error", not "no space left"
                raise OvsdError(f"the disk holding {self.target.parent} is full: nothing was written") from None
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _remove_created_parents(self) -> None:
        for folder in reversed(self._created_parents):
            try:
                folder.rmdir()  # only if still empty: another process may have put something there
            except OSError:
                break
        self._created_parents.clear()

    def _commit(self) -> None:
        old = None
        if self.target.exists() or self.target.is_symlink():
            if not self.overwrite or self.target.is_symlink():  # appeared while we worked
                shutil.rmtree(self.staging, ignore_errors=True)
                raise OvsdError(f"output {self.target} appeared while ovsd3 {self.command} worked; nothing was "
                                "replaced")
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.staging, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
