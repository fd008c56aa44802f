"""Timing several models against each other on one machine."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternating_medians(models: dict[str, Callable], inputs, repeats: int) -> dict[str, float]:
    """Median seconds of a call of each model, calls alternating so a busy spell hits every model alike."""
    for model in models.values():
        model(inputs)  # the first call repacks weights
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            model(inputs)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}
