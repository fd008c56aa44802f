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


def _box_mean(image: np.ndarray, window: int) -> np.ndarray:
    """Mean over every window x window patch (valid positions only), via summed-area tables."""
    table = np.pad(image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (table[window:, window:] - table[:-window, window:] - table[window:, :-window]
            + table[:-window, :-window]) / float(window * window)


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0, window: int = 7) -> float:
    """Structural similarity of two (H, W) or (H, W, C) images, averaged over channels.

    Wang et al. 2004 with a uniform 7x7 window and the usual constants (K1 0.01, K2 0.03), computed in
    float64 (so uint8 inputs never wrap), as scikit-image computes it by default.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(test, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = window * window
    scores = []
    for channel in range(x.shape[-1]):
        a, b = x[..., channel], y[..., channel]
        mean_a, mean_b = _box_mean(a, window), _box_mean(b, window)
        # Sample (not population) covariances, as scikit-image uses.
        var_a = (_box_mean(a * a, window) - mean_a**2) * n / (n - 1)
        var_b = (_box_mean(b * b, window) - mean_b**2) * n / (n - 1)
        cov = (_box_mean(a * b, window) - mean_a * mean_b) * n / (n - 1)
        numerator = (2 * mean_a * mean_b + c1) * (2 * cov + c2)
        denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
        scores.append(float(np.mean(numerator / denominator)))
    return float(np.mean(scores))
