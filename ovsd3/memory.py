"""Keeping a process's memory to what its work needs (Linux; elsewhere these do nothing).

OpenVINO reads an IR by mapping its .bin file. The CPU plugin then repacks the weights into its own layout
(bf16 or blocked) in the first inference, and keeps the mapping: every weight page it read stays resident
next to the repacked copy, so a model counts twice in the process's RSS (SD3.5 Medium's transformer: 5.6 GiB
repacked + 4.2 GiB mapped after one call). Those pages are clean file cache the process no longer needs;
``trimmed_mappings`` tells the kernel so (madvise DONTNEED) while the repacking runs. The pages move from the
process to the page cache, reclaimable; if OpenVINO reads one again it is faulted back in from the file, so
what is computed never changes. Only shared read-only mappings are touched: their pages are the page cache
itself, so dropping them cannot lose anything (a private one may hold relocated pages of a library).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

MADV_DONTNEED = 4
# Weight files only: a mapping this big and read-only is a model's weights, not a library's data.
MIN_MAPPING_BYTES = 16 * 2**20
TRIM_INTERVAL_SECONDS = 1.0


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def read_only_mappings(min_bytes: int = MIN_MAPPING_BYTES) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's shared, read-only file mappings of at least ``min_bytes``."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[1] != "r--s" or not fields[5].startswith("/"):
                    continue
                start, end = (int(value, 16) for value in fields[0].split("-"))
                if end - start >= min_bytes:
                    found.append((start, end, fields[5].rstrip("\n")))
    except OSError:
        pass
    return found


def trim_mappings() -> int:
    """Drop the resident pages of read-only weight mappings from this process; returns the bytes advised."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for start, end, _ in read_only_mappings():
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised


@contextmanager
def trimmed_mappings(interval: float = TRIM_INTERVAL_SECONDS) -> Iterator[None]:
    """Trim the weight mappings every ``interval`` seconds while the block runs (repacking, NNCF reading a
    model's constants), and once more at its end."""
    if _libc() is None:
        yield
        return
    done = threading.Event()

    def trim_until_done() -> None:
        while not done.wait(interval):
            trim_mappings()

    worker = threading.Thread(target=trim_until_done, name="ovsd3-trim", daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()
        trim_mappings()


def release_freed() -> None:
    """Collect garbage and give the allocator's free memory back to the system (glibc keeps freed blocks of a
    released model otherwise, and the next model is allocated beside them)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes() -> dict[str, int]:
    """This process's resident memory: ``anon`` (allocated) and ``file`` (mapped files), in bytes."""
    sizes = {"anon": 0, "file": 0}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:")):
                    sizes["anon" if line.startswith("RssAnon") else "file"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return sizes


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo figure (``MemTotal``, ``MemAvailable``, ...) in bytes; 0 where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def total_memory_bytes() -> int:
    """The machine's memory, 0 where unknown."""
    return meminfo_bytes("MemTotal")
