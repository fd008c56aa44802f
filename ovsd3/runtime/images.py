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


IMAGE_FORMS = ("a picture file's path, a PIL image, a numpy array (H, W, 3) or (1, H, W, 3) or a torch tensor "
               "(3, H, W) or (1, 3, H, W) with values in [0, 1] (or [-1, 1])")
MASK_FORMS = ("a picture file's path, a PIL image, or an array or tensor (H, W), (1, H, W), (H, W, 1) or (1, 1, H, W) "
              "with values in [0, 1]")


def image_input(value, name: str, mask: bool = False):
    """``image=`` / ``mask_image=`` as diffusers' image processors take them: a path or a PIL image as it is, an
    array or a CPU torch tensor checked (numbers, finite, in range, an image's shape) and given back as a
    numpy array: a start image (H, W, 3) in [0, 1], a mask as it came. A list of one is that one. Anything
    else is refused naming the keyword."""
    from PIL import Image

    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, Image.Image) and not (value.width and value.height):
        raise InvalidRequest(f"{name} is an empty picture ({value.width}x{value.height})")
    if value is None or isinstance(value, (str, Path, Image.Image)):
        return value
    if not (isinstance(value, np.ndarray) or _is_torch_tensor(value)):
        forms = MASK_FORMS if mask else IMAGE_FORMS
        raise InvalidRequest(f"{name} must be {forms} (got {_kind_of(value)})")
    array = _finite_pixels(value, name)
    return _mask_array(array, name) if mask else _image_array(array, name, channels_first=_is_torch_tensor(value))


def _is_torch_tensor(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _kind_of(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}: pass one image"
    return f"{type(value).__name__} {str(value)[:40]!r}" if isinstance(value, (int, float, bytes)) \
        else type(value).__name__


def _finite_pixels(value, name: str) -> np.ndarray:
    """The values of an array or tensor as float32, refused when not real numbers or not finite."""
    try:
        array = np.asarray(value.detach().cpu().float().numpy() if _is_torch_tensor(value) else value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidRequest(f"{name} cannot be read as an array ({error})") from None
    if array.dtype.kind == "b":  # a boolean mask: True redraws
        array = array.astype(np.float32)
    if array.dtype.kind not in "fiu":
        raise InvalidRequest(f"{name} must hold numbers (got an array of {array.dtype})")
    if array.dtype.kind != "f" and array.size and array.max() > 1:
        raise InvalidRequest(f"{name} is an array of {array.dtype} up to {array.max()}: arrays hold values in "
                             f"[0, 1] (divide by 255, or pass a PIL image)")
    array = array.astype(np.float32)
    if not array.size or not np.isfinite(array).all():
        raise InvalidRequest(f"{name} is empty or holds NaN or infinite values (shape {array.shape})")
    return array


def _image_array(array: np.ndarray, name: str, channels_first: bool) -> np.ndarray:
    """(H, W, 3) in [0, 1] from an HWC / NHWC array or a CHW / NCHW tensor of one image in [0, 1] or [-1, 1]."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and channels_first:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InvalidRequest(f"{name} must be one RGB image, {IMAGE_FORMS.split(', ', 1)[1]}; got shape "
                             f"{array.shape if not channels_first else 'of a tensor ' + str(array.shape)}")
    _check_pixel_count(array.shape[0], array.shape[1], name)
    if array.min() < -1.0 or array.max() > 1.0:
        raise InvalidRequest(f"{name} values must be in [0, 1] (or [-1, 1]); got {array.min():g} to {array.max():g}")
    if array.min() < 0.0:  # diffusers reads an array with negative values as already normalised to [-1, 1]
        array = (array + 1.0) / 2.0
    return np.ascontiguousarray(array, dtype=np.float32)


def _mask_array(array: np.ndarray, name: str) -> np.ndarray:
    """A mask's values in [0, 1] and its size bounded; its layout is read when it is resized (inpaint)."""
    if array.ndim not in (2, 3, 4):
        raise InvalidRequest(f"{name} must be one grey mask (H, W) with values in [0, 1], got shape {array.shape}")
    _check_pixel_count(array.shape[-2], array.shape[-1], name)
    if array.min() < 0.0 or array.max() > 1.0:
        raise InvalidRequest(f"{name} values must be in [0, 1]; got {array.min():g} to {array.max():g}")
    return array


def _check_pixel_count(height: int, width: int, name: str) -> None:
    if height * width > MAX_INPUT_PIXELS:
        raise InvalidRequest(f"{name} is {width}x{height}, more than {MAX_INPUT_PIXELS // 2**20} megapixels: "
                             "scale it down first")


def load_image(source, width: int, height: int) -> np.ndarray:
    """An image file, PIL image or checked (H, W, 3) array in [0, 1] (:func:`image_input`) as a
    (1, 3, height, width) array in [-1, 1], as diffusers preprocesses it (arrays resized by nearest sampling,
    as its processor resizes them)."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        rows = np.arange(height) * source.shape[0] // height
        columns = np.arange(width) * source.shape[1] // width
        array = source[rows][:, columns]
    else:
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
