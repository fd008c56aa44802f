"""ovsd3's own prompt sets, shipped as package data: calibration and the quantization quality gate.

``prompts.txt``: 400 descriptive captions of the kind conceptual_captions holds (calibration).
``heldout_prompts.txt``: 24 more, disjoint from those (the quality gate's prompts).
Both are written by the repository's ``calibration/make_prompts.py``; they live here, inside the package, so
an installed wheel carries them without a top-level package of its own.
"""

from __future__ import annotations

from importlib.resources import files

CALIBRATION_FILE = "prompts.txt"
HELDOUT_FILE = "heldout_prompts.txt"


def _read(name: str) -> list[str]:
    text = files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def calibration_prompts() -> list[str]:
    return _read(CALIBRATION_FILE)


def heldout_prompts() -> list[str]:
    return _read(HELDOUT_FILE)
