"""Reading input images and writing PNGs that carry their generation parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ovsd3.errors import InvalidRequest

# An input image is resized to at most the model's largest size; decoding one far beyond that (an image bomb:
# a small file that unpacks to gigabytes) is refused from the header.
MAX_INPUT_PIXELS = 8192 * 8192


def open_image(path: str | Path, what: str = "image"):
    """The picture file at ``path``, read whole, refused from its header beyond MAX_INPUT_PIXELS (``what``
    names it in the one-line error: an image, a mask)."""
    from PIL import Image, UnidentifiedImageError

    limit = f"more than {MAX_INPUT_PIXELS // 2**20} megapixels: scale it down first"
    try:
        with Image.open(path) as opened:  # reads the header only: the size is known before decoding
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise InvalidRequest(f"{what} {path} is {opened.width}x{opened.height}, {limit}")
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError:  # Pillow's own limit, beyond ours, refused before ours is checked
        raise InvalidRequest(f"{what} {path} is {limit}") from None
    except (OSError, UnidentifiedImageError) as error:
        raise InvalidRequest(f"cannot read {what} {path}: {error}") from None


def load_image(source, width: int, height: int) -> np.ndarray:
    """An image file (or PIL image) as a (1, 3, height, width) array in [-1, 1], as diffusers preprocesses it."""
    from PIL import Image

    image = (open_image(source) if isinstance(source, (str, Path)) else source).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def to_numpy(images: np.ndarray) -> np.ndarray:
    """(batch, 3, H, W) decoder output in [-1, 1] -> (batch, H, W, 3) in [0, 1] (diffusers' output_type="np")."""
    return np.clip(images / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def to_pil(images: np.ndarray):
    """(batch, 3, H, W) decoder output in [-1, 1] -> PIL images (diffusers' postprocessing)."""
    from PIL import Image

    pixels = to_numpy(images)
    return [Image.fromarray((pixel * 255.0).round().astype(np.uint8)) for pixel in pixels]


def parameters_text(params: dict) -> str:
    """The 'parameters' text chunk in the form most image tools read."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(f"Steps: {params['num_inference_steps']}, Sampler: {params['sampler']}, "
                 f"CFG scale: {params['guidance_scale']}, Seed: {params['seed']}, "
                 f"Size: {params['width']}x{params['height']}, Model: {params['model']}"
                 + (f", Cache: {params['cache']}" if params.get("cache", "off") != "off" else ""))
    return "\n".join(lines)


def save_png(image, path: Path, params: dict) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ovsd3", json.dumps(params, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path
