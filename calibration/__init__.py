"""The project's own prompt sets for calibration and for the quantization quality gate.

``prompts.txt``: 400 descriptive captions of the kind conceptual_captions holds (calibration).
``heldout_prompts.txt``: 24 more, disjoint from those (the quality gate's prompts).
Both are written by ``make_prompts.py`` in this folder.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def _read(name: str) -> list[str]:
    return [line.strip() for line in (HERE / name).read_text().splitlines() if line.strip()]


def calibration_prompts() -> list[str]:
    return _read("prompts.txt")


def heldout_prompts() -> list[str]:
    return _read("heldout_prompts.txt")
