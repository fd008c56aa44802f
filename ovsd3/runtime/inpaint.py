"""Inpainting as diffusers' ``StableDiffusion3InpaintPipeline`` does it: redraw only where the mask is white.

The mask is read as diffusers' mask processor reads it (resized with Lanczos in its own mode, then grey, then
binarised at 0.5: white, 1, is redrawn; black, 0, is kept) and taken at latent resolution by nearest
sampling (every 8th pixel). After every sampler step the kept region is put back: the image's own latents
noised to the next sigma with the same noise the start was drawn with (clean after the last step), so the
kept region ends exactly at the image's latents.

One deliberate difference: diffusers 0.39 decodes inpainting latents without the VAE's shift factor (its issue
#13611); ovsd3 decodes them as text-to-image and image-to-image do, with it.

A mask with transparency follows OpenAI's images/edits meaning instead: the fully transparent pixels
(alpha 0) are redrawn. See :func:`openai_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovsd3.errors import InvalidRequest
from ovsd3.runtime.images import open_image


def _pil_mask(mask, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def _array_mask(mask, width: int, height: int) -> np.ndarray:
    """A (H, W), (1, H, W), (H, W, 1) or (1, 1, H, W) array of values in [0, 1], resized by nearest sampling."""
    array = np.asarray(mask, dtype=np.float32)
    if array.ndim in (3, 4) and array.shape[0] == 1 and (array.ndim == 3 or array.shape[1] == 1):
        array = array.reshape(array.shape[-2:])  # (1, H, W) or (1, 1, H, W)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W, 1)
    if array.ndim != 2:
        raise InvalidRequest(f"mask_image must be one grey mask (H, W) with values in [0, 1], got shape "
                             f"{np.shape(mask)}")
    rows = (np.arange(height) * array.shape[0] // height)
    columns = (np.arange(width) * array.shape[1] // width)
    return array[rows][:, columns]


MASK_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # what reads as grey the way diffusers reads it


def _size_of(image) -> tuple[int, int] | None:
    """(width, height) of an image given as a path, a PIL image or an HWC / CHW array; None if unknown."""
    if hasattr(image, "size") and isinstance(getattr(image, "size"), tuple):
        return image.size
    if isinstance(image, (str, Path)):
        from PIL import Image

        try:
            with Image.open(image) as opened:
                return opened.size
        except Exception:  # noqa: BLE001  (the image's own reading says what is wrong with it)
            return None
    return None


def load_mask(mask, width: int, height: int, image=None) -> np.ndarray:
    """A mask image (a path, a PIL image or an array) -> (1, 1, height, width) of 0 (keep) and 1 (redraw).
    A PIL mask must be as large as ``image`` (when that is a picture) and in a grey-readable mode."""
    from PIL import Image

    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask")  # with the input images' pixel bound
    if isinstance(mask, Image.Image):
        if mask.mode not in MASK_MODES:
            raise InvalidRequest(f"mask_image has mode {mask.mode}: give a grey (L), black-and-white (1), RGB or "
                                 "RGBA mask")
        image_size = _size_of(image) if image is not None else None
        if image_size is not None and mask.size != image_size:
            raise InvalidRequest(f"mask_image is {mask.size[0]}x{mask.size[1]} but the image is "
                                 f"{image_size[0]}x{image_size[1]}: they must be the same size")
        grey = _pil_mask(mask, width, height)
    else:
        grey = _array_mask(mask, width, height)
    return (grey >= 0.5).astype(np.float32)[None, None]


def openai_mask(mask):
    """OpenAI's images/edits mask (redraw where fully transparent) as a diffusers mask (redraw where white);
    a mask without transparency is already one (OpenVINO Model Server and openvino.genai: white is redrawn)."""
    from PIL import Image

    if "A" not in mask.getbands() or mask.getchannel("A").getextrema()[0] == 255:
        return mask
    return Image.fromarray(np.where(np.asarray(mask.getchannel("A")) == 0, 255, 0).astype(np.uint8), "L")


@dataclass
class MaskBlend:
    """What puts the kept region back after each step."""

    mask: np.ndarray  # (batch or 1, 1, h, w) at latent resolution: 1 redraw, 0 keep
    image_latents: np.ndarray  # (batch, 16, h, w), the start image's scaled latents
    noise: np.ndarray  # the noise the start latents were drawn with

    @classmethod
    def of(cls, mask: np.ndarray, vae_scale_factor: int, image_latents: np.ndarray, noise: np.ndarray):
        latent_mask = mask[:, :, ::vae_scale_factor, ::vae_scale_factor]  # torch's nearest at an exact 1/8
        if latent_mask.shape[-2:] != image_latents.shape[-2:]:
            raise InvalidRequest(f"mask {mask.shape[-2:]} does not fit latents {image_latents.shape[-2:]}")
        return cls(latent_mask.astype(np.float32), image_latents, noise)

    def __call__(self, latents: np.ndarray, sigma_next: float) -> np.ndarray:
        sigma = np.float32(sigma_next)
        kept = sigma * self.noise + (np.float32(1.0) - sigma) * self.image_latents
        return ((np.float32(1.0) - self.mask) * kept + self.mask * latents).astype(np.float32)
