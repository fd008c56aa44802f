"""The generation settings `ovsd3 report` and `ovsd3 benchmark` run with, bounded before any work: a typo such
as --steps 1000000000 or --batch 100000 would otherwise run for days or fill memory."""

from __future__ import annotations

import numbers

from ovsd3.errors import OvsdError
from ovsd3.layout import ModelFolder
from ovsd3.runtime.request import MAX_GUIDANCE, MAX_IMAGES, MAX_SEQUENCE_LENGTH, MAX_SIDE, MAX_STEPS

MAX_REPEATS = 100
MAX_PROMPTS = 1000


def image_size(size: int | None, width: int | None, height: int | None, model: ModelFolder) -> tuple[int, int]:
    """(width, height) from ``--size N`` (the square shorthand) or ``--width``/``--height`` (each defaulting to the
    model's native size, as `ovsd3 run`), checked against what the model draws, as the runtime checks them."""
    if size is not None and (width is not None or height is not None):
        raise OvsdError("--size is the square shorthand for --width and --height: give --size, or --width and/or "
                        "--height, not both")
    named = {"--size": size} if size is not None else {"--width": width, "--height": height}
    sides = {name: _side(name, value, model) for name, value in named.items() if value is not None}
    if "--size" in sides:
        return sides["--size"], sides["--size"]
    native = model.native_size
    return sides.get("--width", native), sides.get("--height", native)


def _side(name: str, value, model: ModelFolder) -> int:
    """``value`` of option ``name`` as the runtime would check it: a multiple of what the model needs, in reach."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # the Python API's 64.0 or "64"
        raise OvsdError(f"{name} must be a whole number (got {value!r})")
    value = int(value)
    multiple = model.vae_scale_factor * model.patch_size  # a latent pixel per VAE factor, a patch per patch_size
    most = model.max_size or MAX_SIDE  # the position embedding's reach; MAX_SIDE when the config does not say
    if value <= 0 or value % multiple:
        raise OvsdError(f"{name} must be a positive multiple of {multiple} (got {value})")
    if value > most:
        raise OvsdError(f"{name} {value} is more than {model.path} draws ({most})")
    return value


def check_settings(settings: dict) -> None:
    """``settings``: steps, guidance_scale, width, height (checked by :func:`image_size`), max_sequence_length, as
    the measuring children take them."""
    if not 1 <= settings["steps"] <= MAX_STEPS:
        raise OvsdError(f"--steps must be between 1 and {MAX_STEPS} (got {settings['steps']})")
    if not 0 <= settings["guidance_scale"] <= MAX_GUIDANCE:  # nan too
        raise OvsdError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {settings['guidance_scale']})")
    if not 1 <= settings["max_sequence_length"] <= MAX_SEQUENCE_LENGTH:
        raise OvsdError(f"--max-sequence-length must be between 1 and {MAX_SEQUENCE_LENGTH} "
                        f"(got {settings['max_sequence_length']})")


def check_count(name: str, value: int, most: int) -> None:
    if not 1 <= value <= most:
        raise OvsdError(f"{name} must be between 1 and {most} (got {value})")


def check_batches(batches: list[int]) -> None:
    check_count("batch sizes", max(batches), MAX_IMAGES)
