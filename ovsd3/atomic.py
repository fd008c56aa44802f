"""Output folders that appear whole or not at all, and never in place of what the user brought.

Everything is written to a hidden staging folder beside the target and renamed into place at the end.
An exception, Ctrl-C or SIGTERM removes the staging folder and any parent folders this run created; after a
SIGKILL the staging folder stays behind (nothing can run then) but the target never exists half-written, and
the next run into the same target clears such leftovers (or puts back a replaced folder that a kill left
aside). An interrupt that a library swallows or turns into its own error still stops the commit: the command
ends interrupted, not with a folder made after the user said stop.

Signals: :class:`Interrupts` makes SIGINT raise KeyboardInterrupt and SIGTERM/SIGHUP raise :class:`Terminated`
(a KeyboardInterrupt too, so every cleanup that handles Ctrl-C handles them); the command line holds it from its
first instruction on. A signal whose exception never got through (a library caught it, or Python swallowed it as
"unraisable" in a weakref callback) is still recorded: :func:`interrupt_recorded` says so before anything is
published.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from ovsd3.errors import OvsdError

# A full disk, a read-only file system or a permission refused while writing: the user's environment, told in
# one line, not an internal error.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
LOW_DISK_BYTES = 16 * 2**20  # a write that failed with less than this left failed for want of space
EXIT_CHILD_INTERRUPTED = 0  # a forked helper ends silently on Ctrl-C: its parent reports the interrupt


TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled as Ctrl-C is (cleanup, nothing published), reported with its own exit code."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_code_of(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a command ended by it: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)


def interrupted_line(command: str | None, stop: KeyboardInterrupt) -> str:
    """The one line that ends an interrupted command: "ovsd3 quantize: interrupted; nothing was written"."""
    how = f"terminated ({signal.Signals(stop.signum).name})" if isinstance(stop, Terminated) else "interrupted"
    # run keeps the images it finished (and its preview); the other commands write whole folders or nothing
    written = "" if command in ("run", "serve", None) else "; nothing was written"
    return f"ovsd3{' ' + command if command else ''}: {how}{written}"


class Interrupts:
    """``with Interrupts() as interrupts:`` SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP raise
    :class:`Terminated`, in this (main) thread, and the signal is remembered (``received``): a library that
    swallows the exception or turns it into its own error does not hide that the user said stop. A signal that
    the process was started with ignored (``nohup``, ``cmd &``) stays ignored; the handlers found are put back
    at the end. ``sys.unraisablehook`` goes in and back with the handlers (see :meth:`_unraisable`)."""

    def __init__(self):
        self.received: int | None = None
        self._owner_pid = os.getpid()
        self._previous: dict[int, object] = {}
        self._outer: Interrupts | None = None  # the one whose handlers these replaced (main's, __main__'s)
        self._replaced_hook = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            try:
                self._replaced_hook = sys.unraisablehook
                sys.unraisablehook = self._unraisable
                for signum in TERMINATING_SIGNALS:
                    if signal.getsignal(signum) is not signal.SIG_IGN:
                        self._previous[signum] = signal.signal(signum, self._handle)
                        self._outer = self._outer or _owner(self._previous[signum])
            except KeyboardInterrupt:  # a signal while they went in: `with` calls no __exit__, so put them back
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            restore_handlers(self._previous)
        finally:  # the hook last: a signal raised as the handlers go back is still this one's to keep quiet
            self._previous.clear()
            if self._replaced_hook is not None:
                sys.unraisablehook, self._replaced_hook = self._replaced_hook, None

    def _handle(self, signum, frame):
        if os.getpid() != self._owner_pid:  # a forked helper (OpenVINO's telemetry sender): leave quietly
            os._exit(EXIT_CHILD_INTERRUPTED)
        self.received = signum
        raise self.stop()

    def _unraisable(self, unraisable) -> None:
        """sys.unraisablehook. Python cannot raise on an exception that leaves a weakref callback or a __del__
        (importlib's module-lock cleanup, while ovsd3 imports, is one): it prints "Exception ignored in ..." with
        a traceback and goes on. A KeyboardInterrupt there is one that a handler recorded (:meth:`recorded`,
        which stops the command before it publishes anything), so it is quiet: the command's one line says it.
        Anything else is shown as before."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.recorded() is not None:
            return
        (self._replaced_hook or sys.__unraisablehook__)(unraisable)

    def stop(self) -> KeyboardInterrupt:
        """The exception for the signal received (KeyboardInterrupt for Ctrl-C)."""
        return KeyboardInterrupt() if self.received in (None, signal.SIGINT) else Terminated(self.received)

    def recorded(self) -> KeyboardInterrupt | None:
        """The exception for a signal that this Interrupts, or one it was entered within, received, whether or
        not that exception got through (a library may have caught it, Python may have swallowed it); None if no
        signal came."""
        interrupts: Interrupts | None = self
        while interrupts is not None and interrupts.received is None:
            interrupts = interrupts._outer
        return None if interrupts is None else interrupts.stop()


def _owner(handler: object) -> Interrupts | None:
    """The Interrupts whose handler ``handler`` is, if it is one."""
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, Interrupts) else None


def interrupt_recorded() -> KeyboardInterrupt | None:
    """:meth:`Interrupts.recorded` of the Interrupts that holds the handlers now, for code that has none at hand
    (run's image writes); None if no signal came or ovsd3's handlers are not in place."""
    for signum in TERMINATING_SIGNALS:
        owner = _owner(signal.getsignal(signum))
        if owner is not None:
            return owner.recorded()
    return None


def restore_handlers(previous: dict[int, object]) -> None:
    """Put every handler in ``previous`` back, even if a signal comes meanwhile. signal.signal() runs the handler
    of a signal that is pending before it swaps, so one that raises (Interrupts') would leave the handlers after
    it swapped for good (signals_held's, which swallow SIGTERM); the first interrupt is raised once all are back."""
    stop: KeyboardInterrupt | None = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except KeyboardInterrupt as raised:  # raised before this handler was swapped: swap it still
                stop = stop or raised
    if stop is not None:
        raise stop


def ignore_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP ignored from now on (a command that has ended, saying how): a signal that comes
    meanwhile is dropped, not raised (main thread only; elsewhere nothing)."""
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(KeyboardInterrupt):  # a signal pending as the first one went
            restore_handlers(dict.fromkeys(TERMINATING_SIGNALS, signal.SIG_IGN))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while cleaning up, so a second Ctrl-C cannot leave half a cleanup; a signal
    that came meanwhile is delivered to the handler in place when the block ends. (Python-level, not a signal
    mask: a mask holds one thread only, and OpenVINO's threads would take the signal instead.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous: dict[int, object] = {}
    try:  # a signal while the handlers go in raises here, and those already swapped go back
        for signum in TERMINATING_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda signum, frame: came.append(signum))
        yield
    finally:
        restore_handlers(previous)
        if came:
            signal.raise_signal(came[0])


def _started_after(pid: int, moment: float) -> bool | None:
    """Whether process ``pid`` started after ``moment`` (a time.time()), from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") > moment + 1.0  # stat's field 22: start time
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether the process that made a leftover named after ``pid`` still runs: not if there is no such process,
    if it is a zombie (killed, not yet reaped), or if the process now holding that pid started after ``since``
    (the leftover's modification time: the pid was reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _zombie(pid):
        return False
    return not (since is not None and _started_after(pid, since))


def _dead_runs_leftover(path: Path, pid: int) -> bool:
    try:
        since = path.lstat().st_mtime
    except OSError:
        return False
    return not _pid_alive(pid, since)


def dead_leftovers(folder: Path, name: str) -> list[Path]:
    """What runs that are over (killed) left in ``folder`` under names that ``name`` (a regular expression with a
    ``pid`` group, matching whole names, such as ``\\.out\\.partial-(?P<pid>\\d+)``) says are theirs."""
    pattern = re.compile(name)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    return [path for path in entries
            if (match := pattern.fullmatch(path.name)) and _dead_runs_leftover(path, int(match["pid"]))]


def remove(path: Path) -> None:
    """A file, link or folder, whichever it is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_dead_leftovers(folder: Path, name: str) -> list[Path]:
    """Remove what :func:`dead_leftovers` finds; returns what went."""
    found = dead_leftovers(folder, name)
    for leftover in found:
        remove(leftover)
    return found


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A private temporary folder named ``PREFIX-PID-xxxx``, removed at the end (Ctrl-C and SIGTERM too); the
    folders of runs killed before they could remove theirs are removed first."""
    root = Path(tempfile.gettempdir())
    clear_dead_leftovers(root, re.escape(prefix) + r"-(?P<pid>\d+)-\w+")
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    try:
        yield scratch
    finally:
        with signals_held():
            shutil.rmtree(scratch, ignore_errors=True)


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


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


def check_cache_apart(cache: Path, label: str, *, inputs: Iterable[Path | str | None],
                      outputs: Iterable[Path | str | None] = ()) -> None:
    """A cache is written to, so it is an output too: refuse one that is, lies inside or contains an input or
    another output of the command, whether it exists yet or not (``label`` names the option, as --calib-cache)."""
    cache = Path(cache).expanduser()
    if cache.exists() and not cache.is_dir():
        raise OvsdError(f"{label} {cache} exists and is not a folder")
    others = [(source, "input") for source in inputs] + [(target, "output") for target in outputs]
    for other, kind in others:
        if other is None or (kind == "input" and not Path(other).expanduser().exists()):
            continue  # a hub id, or a file that the command checks itself
        relation = overlap(cache, Path(other).expanduser())
        if relation:
            raise OvsdError(f"{label} {cache} {relation} the {kind} {other}: a cache is written to, so choose a "
                            "folder apart from the inputs and outputs (nothing was written)")


@contextlib.contextmanager
def cleaned_up_on_failure(folder: Path, byproducts: Iterable[Path] = ()) -> Iterator[None]:
    """On an exception (Ctrl-C and SIGTERM too), remove the ``byproducts`` (files such as a preview, which the
    command rewrites in place) and then ``folder`` and those of its parents that did not exist on entry, where
    they are empty: what a failed command created on the way."""
    missing = missing_folders(folder)
    try:
        yield
    except BaseException:
        with signals_held():
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
    ``overwrite`` replaces only a folder that the same command made and that holds nothing but what it writes
    (``writes``: patterns of relative paths, default :func:`ovsd3.layout.output_files`), never one the user
    brought or added to; the folder replaced is moved aside and put back if the replacement fails."""

    def __init__(self, target: str | Path, *, command: str, overwrite: bool = False,
                 inputs: Iterable[Path | str | None] = (), writes: Iterable[str] | None = None):
        from ovsd3.layout import output_files

        self.target = Path(target).expanduser().absolute()
        self.command = command
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        self.writes = tuple(output_files(command) if writes is None else writes)
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self._interrupts = Interrupts()  # remembers a signal that came while writing
        self._created_parents: list[Path] = []

    def check(self) -> None:
        """Refuse early (before any slow work) what would fail or destroy something at the end. Leftovers of
        killed runs into the same target are cleared first, whatever this run comes to."""
        if self.target.is_symlink():
            raise OvsdError(f"output {self.target} is a symbolic link: name a real folder")
        check_apart(self.target, self.inputs)
        self._clear_leftovers()
        if self.target.exists():
            self._check_replaceable()
        parent = nearest_existing(self.target.parent)
        if not parent.is_dir():
            raise OvsdError(f"cannot create output folder {self.target.parent}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OvsdError(f"output folder {parent} is not writable")

    def _check_replaceable(self) -> None:
        from ovsd3.layout import command_line, made_by, unexpected_file

        if not self.target.is_dir():
            raise OvsdError(f"output {self.target} exists and is not a folder")
        if not self.overwrite:
            raise OvsdError(f"output {self.target} already exists (pass --overwrite to replace it)")
        ours = command_line(self.command)
        maker = made_by(self.target)
        if maker != self.command and any(self.target.iterdir()):
            made = f"was written by `{command_line(maker)}`" if maker else "was not written by ovsd3"
            raise OvsdError(f"output {self.target} {made}: --overwrite replaces only an earlier `{ours}` output "
                            "(nothing was replaced)")
        stray = unexpected_file(self.target, self.writes)
        if stray is not None:
            raise OvsdError(f"output {self.target} holds {stray}, which `{ours}` does not write: --overwrite "
                            f"replaces only a folder holding nothing but an earlier `{ours}` output; move {stray} "
                            "away or choose another folder (nothing was replaced)")

    def _make_parents(self) -> None:
        for folder in reversed(missing_folders(self.target.parent)):
            folder.mkdir()
            self._created_parents.append(folder)

    def _clear_leftovers(self) -> None:
        """A killed run's staging folder goes; a folder that a kill left aside while replacing it (between the two
        renames of :meth:`_commit`) is put back where the target is missing, and goes where it is not."""
        name = re.escape(f".{self.target.name}.")
        for leftover in dead_leftovers(self.target.parent, name + r"old-(?P<pid>\d+)"):
            if not self.target.exists() and not self.target.is_symlink():
                os.rename(leftover, self.target)
            else:
                remove(leftover)
        clear_dead_leftovers(self.target.parent, name + r"partial-(?P<pid>\d+)")

    def __enter__(self) -> Path:
        self.check()
        try:
            self._make_parents()
            self.staging.mkdir()
        except OSError as error:
            self._remove_created_parents()
            raise OvsdError(f"cannot write in {self.target.parent}: {error.strerror}") from None
        self._interrupts.__enter__()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            # recorded(), not received: a signal swallowed before this output began (while the command loaded)
            # stops it as much as one that came while it was written
            if exc_type is None and self._interrupts.recorded() is None:
                try:
                    return self._commit()
                except BaseException as error:  # the folder replaced is back in place: say why, leave nothing
                    self._discard(error)
                    raise
            self._discard(exc)
        finally:
            self._interrupts.__exit__(None, None, None)

    def _discard(self, exc: BaseException | None) -> None:
        """Remove what this run made; raise, instead of ``exc``, the interrupt that a library swallowed or a
        one-line error for a full disk or a refused write."""
        with signals_held():
            disk_full = _disk_full(self.staging)  # before the staging folder frees its space
            shutil.rmtree(self.staging, ignore_errors=True)
            self._remove_created_parents()
        stop = self._interrupts.recorded()
        if stop is not None and not isinstance(exc, KeyboardInterrupt):
            raise stop from None  # swallowed, or turned into another error by a library
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            raise OvsdError(f"cannot write {self.target}: {exc.strerror} (nothing was written)") from None
        if disk_full and isinstance(exc, Exception) and not isinstance(exc, OvsdError):
            # OpenVINO's writers say "iostream error", not "no space left"
            raise OvsdError(f"the disk holding {self.target.parent} is full: nothing was written") from None

    def _remove_created_parents(self) -> None:
        for folder in reversed(self._created_parents):
            try:
                folder.rmdir()  # only if still empty: another process may have put something there
            except OSError:
                break
        self._created_parents.clear()

    def _refuse_commit(self, why: str) -> None:
        raise OvsdError(f"output {self.target} {why} while `ovsd3 {self.command}` worked; nothing was replaced")

    def _commit(self) -> None:
        with signals_held():  # the two renames and the restore below are one step to Ctrl-C
            if not (self.target.exists() or self.target.is_symlink()):
                os.rename(self.staging, self.target)
                return
            if not self.overwrite or self.target.is_symlink():
                self._refuse_commit("appeared")
            try:
                self._check_replaceable()  # again: the user may have saved something in it meanwhile
            except OvsdError as error:
                self._refuse_commit(f"changed ({error})")
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
            try:
                os.rename(self.staging, self.target)
            except BaseException:
                os.rename(old, self.target)  # the folder replaced comes back
                raise
        shutil.rmtree(old, ignore_errors=True)
