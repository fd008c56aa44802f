"""Numerical agreement between two arrays (numpy only, used by convert, quantize and reports)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, computed in float64.

    ``data_range`` defaults to the reference's peak-to-peak span, which suits activations of any scale.
    For images in [0, 1] pass 1.0, for uint8 images 255.0 (they are cast to float first, never compared
    as uint8, where differences would wrap around).
    """
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    if not np.isfinite(test).all():
        return float("-inf")
    if data_range is None:
        data_range = float(reference.max() - reference.min()) if reference.size else 0.0
    mse = float(np.mean((reference - test) ** 2))
    if mse == 0.0:
        return float("inf")
    if data_range == 0.0:
        return float("-inf")
    return 10.0 * np.log10(data_range**2 / mse)


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    diff = np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(test, dtype=np.float64))
    return float(diff.max()) if diff.size else 0.0


@dataclass(frozen=True)
class Agreement:
    """How closely one output of a converted model follows the original."""

    output: str
    max_abs_error: float
    psnr: float

    @classmethod
    def of(cls, output: str, reference: np.ndarray, test: np.ndarray) -> "Agreement":
        return cls(output, max_abs_error(reference, test), psnr(reference, test))

    def __str__(self) -> str:
        return f"max abs error {self.max_abs_error:.3g}, PSNR {self.psnr:.1f} dB"


def worst(agreements: list[Agreement]) -> Agreement:
    """The least faithful of several outputs (lowest PSNR)."""
    return min(agreements, key=lambda a: a.psnr)
