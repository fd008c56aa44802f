"""Medians and spreads of repeated timings."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


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

    @property
    def relative_range(self) -> float:
        """(max - min) / median: 0.05 means the runs lay within 5% of each other."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict:
        return dict(asdict(self), relative_range=self.relative_range)

    def __str__(self) -> str:
        return f"{self.median:.3f} s ({self.min:.3f}-{self.max:.3f}, n={self.n})"
