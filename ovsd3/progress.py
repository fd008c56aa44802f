"""A one-line progress bar with time left, on stderr (no dependency beyond the standard library)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, stream=None, width: int = 30, unit: str = "step"):
        self.unit = unit
        self.stream = stream or sys.stderr  # looked up now: callers may have replaced sys.stderr
        self.width, self.started = width, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / done if done else 0.0
        filled = int(self.width * done / total)
        self.stream.write(f"\r  [{'#' * filled}{'.' * (self.width - filled)}] {self.unit} {done}/{total}, "
                          f"{per_step:.2f} s/{self.unit}, {per_step * (total - done):.0f} s left ")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()
