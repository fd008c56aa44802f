"""Start `ovsd3 serve` in a child process on a free loopback port (tests and benchmarks drive it over HTTP)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(folder: Path, *options: str, start_timeout: float = 120.0) -> Iterator[str]:
    """Yield the base URL once /health answers; stop the server on the way out."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ovsd3.cli", "serve", str(folder), "--port", str(port),
                                *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process, start_timeout)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(base: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once ``base``/health answers 200; RuntimeError if ``process`` (its stdout piped) exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ovsd3 serve exited: {process.stdout.read().strip()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"ovsd3 serve did not answer within {timeout:.0f} s")
        time.sleep(0.2)
