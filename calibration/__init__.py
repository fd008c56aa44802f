"""The repository's prompt-set folder: ``make_prompts.py`` writes the sets into ``ovsd3/calibration/``, where
the package (and its wheel) carries them. This module only lets code run from a checkout keep importing them as
``calibration``; the wheel does not install it."""

from ovsd3.calibration import calibration_prompts, heldout_prompts

__all__ = ["calibration_prompts", "heldout_prompts"]
