"""openvino.genai's ``Text2ImagePipeline`` / ``Image2ImagePipeline`` / ``InpaintingPipeline`` ``generate`` call on
an SD3Pipeline.

    image_tensor = pipe.generate("a cat", width=512, height=512, num_inference_steps=28, rng_seed=42)
    Image.fromarray(image_tensor.data[0]).save("cat.png")

With genai's property names, defaults and rules (``ImageGenerationConfig``): ``rng_seed`` 42 unless given, a
``generator`` (``openvino_genai.TorchGenerator``, ``CppStdGenerator``, or anything with ``randn_tensor(shape)``)
instead of the seed, a ``callback(step, num_steps, latent)`` whose True return stops generation (an empty tensor
is returned then), ``None`` for a property refused, negative prompts refused without guidance, and the result an
``openvino.Tensor`` of uint8 images (batch, height, width, 3). ``taylorseer_config`` (genai's
``TaylorSeerCacheConfig``) runs ovsd3's TaylorSeer with its settings.

Two deliberate differences, both refusals where genai would draw something else than asked: a property that
genai does not know either (``foo=3``, a typo such as ``num_inference_step``) is refused naming it, where
genai 2026.4 ignores it; and ``adapters`` is refused (load them with ``SD3Pipeline.load(adapters=...)``), where
ignoring it would draw without them. Values are checked as the Python call checks them: ``width=64.5`` is
refused, where genai draws 64.
"""

from __future__ import annotations

import difflib
import numbers

import numpy as np

from ovsd3.errors import InvalidRequest
from ovsd3.runtime.cache import CacheConfig, TaylorSeer
from ovsd3.runtime.images import MAX_INPUT_PIXELS
from ovsd3.runtime.request import real

# genai's property -> the SD3Pipeline keyword it sets
PROPERTIES = {name: name for name in (
    "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "num_images_per_prompt",
    "guidance_scale", "height", "width", "num_inference_steps", "max_sequence_length", "strength")}
PROPERTIES["rng_seed"] = "seed"
HANDLED = ("generator", "callback", "taylorseer_config")  # genai's properties read here, not passed on
NOT_SUPPORTED = {"adapters": "load LoRA adapters with SD3Pipeline.load(folder, adapters=[(path, weight)]) or "
                             "set_adapters",
                 "generation_config": "pass its properties as keywords"}
DEFAULT_RNG_SEED = 42  # ImageGenerationConfig's


class _Stopped(Exception):
    pass


def generation_settings(properties: dict) -> dict:
    """genai properties -> SD3Pipeline keywords (unknown properties refused, None refused, genai's checks)."""
    for name, value in properties.items():
        _check_known(name)
        if value is None:
            raise InvalidRequest(f'Property "{name}" can\'t be None.')
    settings = {PROPERTIES[name]: value for name, value in properties.items() if name in PROPERTIES}
    for name in ("max_sequence_length", "height", "width"):  # genai's -1: the model's default
        if _is_minus_one(settings.get(name)):
            settings.pop(name)
    guidance = real(settings["guidance_scale"], "guidance_scale") if "guidance_scale" in settings else None
    negatives = [name for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3") if name in settings]
    if guidance is not None and guidance <= 1.0 and negatives:
        raise InvalidRequest("Guidance scale <= 1.0 ignores negative prompt")
    generator = properties.get("generator")
    if generator is not None:
        if not hasattr(generator, "randn_tensor"):
            raise InvalidRequest("generator must be an openvino_genai Generator (with randn_tensor)")
        import openvino as ov

        settings["noise"] = lambda shape: np.array(generator.randn_tensor(ov.Shape(list(shape))).data,
                                                   dtype=np.float32)
    else:
        settings.setdefault("seed", DEFAULT_RNG_SEED)
    if "taylorseer_config" in properties:
        settings["cache"] = _taylorseer(properties["taylorseer_config"])
    return settings


def _is_minus_one(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == -1


def _check_known(name: str) -> None:
    if name in NOT_SUPPORTED:
        raise InvalidRequest(f"generate() property {name!r} is not supported here: {NOT_SUPPORTED[name]}")
    if name not in PROPERTIES and name not in HANDLED:
        known = sorted([*PROPERTIES, *HANDLED])
        near = difflib.get_close_matches(name, known, n=1)
        raise InvalidRequest(f"generate() got an unknown property {name!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else f" (properties: {', '.join(known)})"))


def _taylorseer(config) -> CacheConfig:
    """genai's TaylorSeerCacheConfig as ovsd3's TaylorSeer (the same schedule and settings)."""
    try:
        setting = TaylorSeer(cache_interval=config.cache_interval,
                             disable_cache_before_step=config.disable_cache_before_step,
                             disable_cache_after_step=config.disable_cache_after_step)
    except AttributeError:
        raise InvalidRequest(f"taylorseer_config must be an openvino_genai.TaylorSeerCacheConfig (got "
                             f"{type(config).__name__})") from None
    return CacheConfig(step_cache=setting)


def generate(pipe, prompt: str, image=None, mask_image=None, **properties):
    """Run ``pipe`` as genai's generate; returns an ``openvino.Tensor`` (uint8, NHWC). ``mask_image`` (white is
    redrawn) makes it genai's InpaintingPipeline call."""
    import openvino as ov

    settings = generation_settings(properties)
    settings.setdefault("num_inference_steps", pipe.defaults.num_inference_steps)  # genai's default, images too
    if mask_image is not None:
        settings["mask_image"] = _image_of(mask_image, "mask_image")
    if image is not None:
        settings["image"] = _image_of(image, "image")
    elif settings.get("strength", 1.0) != 1.0:
        raise InvalidRequest("strength must be 1.0 for text to image")
    callback = properties.get("callback")

    def on_step(step):
        if callback(step.index, step.total, ov.Tensor(step.latents)):
            raise _Stopped

    try:
        result = pipe(prompt, output_type="np", callback=on_step if callback else None, **settings)
    except _Stopped:
        return ov.Tensor(np.zeros((0,), dtype=np.uint8))
    return ov.Tensor(np.ascontiguousarray((result.images * 255.0).round().astype(np.uint8)))


def _image_of(image, name: str):
    """genai takes the start image and the mask as uint8 tensors (1, H, W, 3) (a mask also (1, H, W, 1) or
    (1, H, W)); PIL images are accepted too. Anything else is refused naming ``name``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    given = getattr(image, "data", image)
    if not isinstance(given, np.ndarray) or given.dtype != np.uint8:
        what = type(image).__name__ + (f" of {given.dtype}" if hasattr(given, "dtype") else "")
        raise InvalidRequest(f"{name} must be an openvino.Tensor of uint8 pixels (1, H, W, 3) or a PIL image "
                             f"(got {what})")
    pixels = given[0] if given.ndim == 4 and given.shape[0] == 1 else given
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)) or not pixels.size:
        raise InvalidRequest(f"{name} must hold one image (1, H, W, 3), got shape {given.shape}")
    if pixels.shape[0] * pixels.shape[1] > MAX_INPUT_PIXELS:
        raise InvalidRequest(f"{name} is {pixels.shape[1]}x{pixels.shape[0]}, more than "
                             f"{MAX_INPUT_PIXELS // 2**20} megapixels")
    return Image.fromarray(np.ascontiguousarray(pixels))
