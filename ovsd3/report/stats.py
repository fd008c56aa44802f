"""Medians and spreads of repeated timings."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Spread:
    """A median with the range around it; machines are noisy, so never one figure alone."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values) -> "Spread":
        values = [float(value) for value in values]
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @classmethod
    def from_json(cls, data: dict) -> "Spread":
        return cls(data["median"], data["min"], data["max"], data["n"])

    @property
    def relative_range(self) -> float:
        """(max - min) / median: 0.05 means the runs lay within 5% of each other."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict:
        return dict(asdict(self), relative_range=self.relative_range)

    def __str__(self) -> str:
        return f"{self.median:.3f} s ({self.min:.3f}-{self.max:.3f}, n={self.n})"


def timed_batches(task: dict, call: Callable[[int, int, int], object]) -> dict[str, list[float]]:
    """``call(batch, steps, seed)`` for every batch in ``task["batches"]``: one 1-step warm-up (first-call
    allocations are not what a user pays per image), then ``task["repeats"]`` timed calls of ``task["steps"]``.
    The same loop times ovsd3 and each peer, so their figures compare."""
    results = {}
    for batch in task["batches"]:
        call(batch, 1, 0)
        seconds = []
        for repeat in range(task["repeats"]):
            started = time.perf_counter()
            call(batch, task["steps"], repeat)
            seconds.append(time.perf_counter() - started)
        results[str(batch)] = seconds
    return results
