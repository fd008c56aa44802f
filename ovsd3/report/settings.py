"""The generation settings `ovsd3 report` and `ovsd3 benchmark` run with, bounded before any work: a typo such
as --steps 1000000000 or --batch 100000 would otherwise run for days or fill memory."""

from __future__ import annotations

from ovsd3.errors import OvsdError
from ovsd3.layout import ModelFolder
from ovsd3.runtime.request import MAX_GUIDANCE, MAX_IMAGES, MAX_SEQUENCE_LENGTH, MAX_STEPS

MAX_REPEATS = 100
MAX_PROMPTS = 1000


def check_settings(settings: dict, model: ModelFolder) -> None:
    """``settings``: steps, guidance_scale, width, height, max_sequence_length, as the measuring children take."""
    if not 1 <= settings["steps"] <= MAX_STEPS:
        raise OvsdError(f"--steps must be between 1 and {MAX_STEPS} (got {settings['steps']})")
    if not 0 <= settings["guidance_scale"] <= MAX_GUIDANCE:  # nan too
        raise OvsdError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {settings['guidance_scale']})")
    size = settings["width"]
    if size <= 0 or size % 16:
        raise OvsdError(f"--size must be a positive multiple of 16 (got {size})")
    if model.max_size and size > model.max_size:
        raise OvsdError(f"--size {size} is more than {model.path} draws ({model.max_size})")
    if not 1 <= settings["max_sequence_length"] <= MAX_SEQUENCE_LENGTH:
        raise OvsdError(f"--max-sequence-length must be between 1 and {MAX_SEQUENCE_LENGTH} "
                        f"(got {settings['max_sequence_length']})")


def check_count(name: str, value: int, most: int) -> None:
    if not 1 <= value <= most:
        raise OvsdError(f"{name} must be between 1 and {most} (got {value})")


def check_batches(batches: list[int]) -> None:
    check_count("batch sizes", max(batches), MAX_IMAGES)
