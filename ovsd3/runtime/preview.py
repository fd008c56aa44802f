"""Cheap previews while sampling: a linear map from SD3's 16 latent channels to RGB.

The factors are ComfyUI's published SD3 latent-to-RGB projection (they apply to latents in the model's
scaled space, which is what the sampler holds). A preview costs one small matrix product, no VAE.
"""

from __future__ import annotations

import numpy as np

SD3_LATENT_RGB_FACTORS = np.array([
    [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
], dtype=np.float32)
SD3_LATENT_RGB_BIAS = np.array([0.2394, 0.2135, 0.1925], dtype=np.float32)


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """(batch, 16, h, w) latents -> (batch, h, w, 3) uint8 images at latent resolution."""
    rgb = np.einsum("bchw,cr->bhwr", latents.astype(np.float32), SD3_LATENT_RGB_FACTORS) + SD3_LATENT_RGB_BIAS
    return (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def preview_images(latents: np.ndarray, scale: int = 8):
    """PIL images of the preview, upscaled to about the output size."""
    from PIL import Image

    return [Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
            for rgb in latents_to_rgb(latents)]
