"""Medians and spreads of repeated timings."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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


def timed_generations(task: dict, load: Callable[[], object], warm_up: Callable[[object], None],
                      draw: Callable[[object, str, int], tuple[object, dict]]) -> tuple[object, dict]:
    """``load()`` a pipeline (a first start without a model cache), ``warm_up(pipe)`` (one 1-step image: the
    first inference of a compiled model allocates its buffers, which no later generation pays), then
    ``draw(pipe, prompt, seed) -> (image, timings)`` for each of ``task``'s prompts, each picture saved under
    ``task["image_dir"]``. The same loop measures ovsd3 and openvino.genai for `ovsd3 report`."""
    started = time.perf_counter()
    pipe = load()
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    warm_up(pipe)
    first_image_seconds = time.perf_counter() - started
    image_dir = Path(task["image_dir"])
    image_dir.mkdir(parents=True, exist_ok=True)
    generations, images = [], []
    for index, (prompt, seed) in enumerate(zip(task["prompts"], task["seeds"])):
        image, timings = draw(pipe, prompt, seed)
        path = image_dir / f"{index:02d}.png"
        image.save(path)
        images.append(str(path))
        generations.append(timings)
    return pipe, {"load_seconds": load_seconds, "first_image_seconds": first_image_seconds,
                  "generations": generations, "images": images}
