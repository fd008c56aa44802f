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


def _array_mask(mask, width: int, height: int, name: str = "mask_image") -> np.ndarray:
    """A (H, W), (1, H, W), (H, W, 1) or (1, 1, H, W) array of values in [0, 1], resized by nearest sampling."""
    array = np.asarray(mask, dtype=np.float32)
    if array.ndim in (3, 4) and array.shape[0] == 1 and (array.ndim == 3 or array.shape[1] == 1):
        array = array.reshape(array.shape[-2:])  # (1, H, W) or (1, 1, H, W)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W, 1)
    if array.ndim != 2:
        raise InvalidRequest(f"{name} must be one grey mask (H, W) with values in [0, 1], got shape "
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


def load_mask(mask, width: int, height: int, image=None, name: str = "mask_image") -> np.ndarray:
    """A mask image (a path, a PIL image or an array) -> (1, 1, height, width) of 0 (keep) and 1 (redraw).
    A PIL mask must be as large as ``image`` (when that is a picture) and in a grey-readable mode. ``name``:
    the keyword the errors name (mask_image, or ControlNet's control_mask)."""
    from PIL import Image

    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask" if name == "mask_image" else name)  # with the input images' pixel bound
    if isinstance(mask, Image.Image):
        if mask.mode not in MASK_MODES:
            raise InvalidRequest(f"{name} has mode {mask.mode}: give a grey (L), black-and-white (1), RGB or "
                                 "RGBA mask")
        image_size = _size_of(image) if image is not None else None
        if image_size is not None and mask.size != image_size:
            raise InvalidRequest(f"{name} is {mask.size[0]}x{mask.size[1]} but the image is "
                                 f"{image_size[0]}x{image_size[1]}: they must be the same size")
        grey = _pil_mask(mask, width, height)
    else:
        grey = _array_mask(mask, width, height, name)
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


# The largest padding_mask_crop: twice the largest input side, so any padding that reaches past a whole image
# can be said; beyond it a number is a typo, refused before work.
MAX_PADDING_MASK_CROP = 16384


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' ``VaeImageProcessor.get_crop_region``: the box (x1, y1, x2, y2) around every non-black pixel of
    ``mask`` (a PIL image), grown by ``pad`` on each side within the picture, then widened (or heightened) to
    the generation's aspect ratio ``width / height``, kept inside the picture where it fits."""
    grey = np.asarray(mask.convert("L"))
    rows, columns = np.flatnonzero(grey.any(axis=1)), np.flatnonzero(grey.any(axis=0))
    if not rows.size:
        raise InvalidRequest("padding_mask_crop crops around the mask's white region, and mask_image is all "
                             "black (nothing to redraw)")
    full_height, full_width = grey.shape
    x1, y1 = max(int(columns[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(columns[-1]) + 1 + pad, full_width), min(int(rows[-1]) + 1 + pad, full_height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widened(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), full_height)
    else:
        x1, x2 = _widened(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), full_width)
    return x1, y1, x2, y2


def _widened(low: int, high: int, grow: int, limit: int) -> tuple[int, int]:
    """One side of the box grown by ``grow``, half before and half after, shifted back inside 0..limit
    (diffusers' arithmetic, int() truncation included)."""
    low -= grow // 2
    high += grow - grow // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def _resize_and_fill(image, width: int, height: int):
    """diffusers' ``VaeImageProcessor._resize_and_fill`` (resize_mode "fill"): the picture scaled to fit inside
    width x height keeping its aspect ratio, centred, the empty bands filled by stretching its edge rows or
    columns. Returns an RGB image."""
    from PIL import Image

    ratio, source_ratio = width / height, image.width / image.height
    source_width = width if ratio < source_ratio else image.width * height // image.height
    source_height = height if ratio >= source_ratio else image.height * width // image.width
    resized = image.resize((source_width, source_height), resample=Image.LANCZOS)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - source_width // 2, height // 2 - source_height // 2))
    if ratio < source_ratio:
        band = height // 2 - source_height // 2
        if band > 0:
            result.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            result.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                         box=(0, band + source_height))
    elif ratio > source_ratio:
        band = width // 2 - source_width // 2
        if band > 0:
            result.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            result.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                         box=(band + source_width, 0))
    return result


def _resize_and_crop(image, width: int, height: int):
    """diffusers' ``VaeImageProcessor._resize_and_crop`` (resize_mode "crop"): scaled to cover width x height
    keeping its aspect ratio, centred, the excess cut off."""
    from PIL import Image

    ratio, source_ratio = width / height, image.width / image.height
    source_width = width if ratio > source_ratio else image.width * height // image.height
    source_height = height if ratio <= source_ratio else image.height * width // image.width
    resized = image.resize((source_width, source_height), resample=Image.LANCZOS)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - source_width // 2, height // 2 - source_height // 2))
    return result


def _picture(source, name: str):
    """A path or PIL image as a PIL image; padding_mask_crop takes pictures, as diffusers' processors crop only
    those."""
    from PIL import Image

    if isinstance(source, (str, Path)):
        return open_image(source, "mask" if name == "mask_image" else "image")
    if isinstance(source, Image.Image):
        return source
    raise InvalidRequest(f"padding_mask_crop needs {name} as a picture (a file's path or a PIL image), as "
                         f"diffusers' does; got an array")


@dataclass(frozen=True)
class MaskCrop:
    """diffusers' ``padding_mask_crop``: only a box around the mask (grown by the padding, then to the
    generation's aspect ratio) is redrawn, at the generation's size; the result is scaled back into the box and
    pasted onto the original picture through the mask (``VaeImageProcessor.apply_overlay``), so the output
    has the original picture's size and its pixels wherever the mask is black."""

    original: object  # the PIL image as given
    mask: object  # the PIL mask as given
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in the original picture

    @classmethod
    def of(cls, image, mask, width: int, height: int, pad: int) -> "MaskCrop":
        original, mask = _picture(image, "image"), _picture(mask, "mask_image")
        if mask.size != original.size:
            raise InvalidRequest(f"mask_image is {mask.size[0]}x{mask.size[1]} but the image is "
                                 f"{original.size[0]}x{original.size[1]}: they must be the same size")
        return cls(original, mask, crop_region(mask, width, height, pad))

    def image(self, width: int, height: int):
        """The start picture for generation: the box, filled out to width x height (diffusers' "fill")."""
        return _resize_and_fill(self.original.crop(self.box), width, height)

    def mask_image(self, width: int, height: int):
        """The mask for generation, cropped and filled as the picture is (RGB, read as grey by load_mask)."""
        return _resize_and_fill(self.mask.crop(self.box), width, height)

    def paste(self, generated):
        """One generated PIL image put back: scaled into the box (diffusers' "crop"), under the original
        picture wherever the mask is not white (partly where grey: the mask is not binarised here)."""
        from PIL import Image, ImageOps

        width, height = self.original.size
        kept = Image.new("RGBa", (width, height))
        kept.paste(self.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.mask.convert("L")))
        x1, y1, x2, y2 = self.box
        base = Image.new("RGBA", (width, height))
        base.paste(_resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
        result = base.convert("RGB").convert("RGBA")
        result.alpha_composite(kept.convert("RGBA"))
        return result.convert("RGB")
