"""openvino.genai's ``Text2ImagePipeline`` / ``Image2ImagePipeline`` / ``InpaintingPipeline`` ``generate`` call on
an SD3Pipeline.

    image_tensor = pipe.generate("a cat", width=512, height=512, num_inference_steps=28, rng_seed=42)
    Image.fromarray(image_tensor.data[0]).save("cat.png")

With genai's property names, defaults and rules (``ImageGenerationConfig``): ``rng_seed`` 42 unless given, a
``generator`` (``openvino_genai.TorchGenerator``, ``CppStdGenerator``, or anything with ``randn_tensor(shape)``)
instead of the seed, a ``callback(step, num_steps, latent)`` whose True return stops generation (an empty tensor
is returned then), ``None`` for a property refused, negative prompts refused without guidance, and the result an
``openvino.Tensor`` of uint8 images (batch, height, width, 3). Properties genai does not know are ignored, as
genai ignores them.
"""

from __future__ import annotations

import numpy as np

from ovsd3.errors import InvalidRequest

# genai's property -> the SD3Pipeline keyword it sets
PROPERTIES = {name: name for name in (
    "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "num_images_per_prompt",
    "guidance_scale", "height", "width", "num_inference_steps", "max_sequence_length", "strength")}
PROPERTIES["rng_seed"] = "seed"
DEFAULT_RNG_SEED = 42  # ImageGenerationConfig's


class _Stopped(Exception):
    pass


def generation_settings(properties: dict) -> dict:
    """genai properties -> SD3Pipeline keywords (unknown properties ignored, None refused, genai's checks)."""
    for name, value in properties.items():
        if value is None:
            raise InvalidRequest(f'Property "{name}" can\'t be None.')
    settings = {PROPERTIES[name]: value for name, value in properties.items() if name in PROPERTIES}
    if settings.get("max_sequence_length", -1) == -1:
        settings.pop("max_sequence_length", None)
    for side in ("height", "width"):
        if settings.get(side, -1) == -1:
            settings.pop(side, None)
    guidance = settings.get("guidance_scale")
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
    return settings


def generate(pipe, prompt: str, image=None, mask_image=None, **properties):
    """Run ``pipe`` as genai's generate; returns an ``openvino.Tensor`` (uint8, NHWC). ``mask_image`` (white is
    redrawn) makes it genai's InpaintingPipeline call."""
    import openvino as ov

    settings = generation_settings(properties)
    settings.setdefault("num_inference_steps", pipe.defaults.num_inference_steps)  # genai's default, images too
    if mask_image is not None:
        settings["mask_image"] = _image_of(mask_image)
    if image is not None:
        settings["image"] = _image_of(image)
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


def _image_of(image):
    """genai takes the start image as a uint8 tensor (1, H, W, 3); PIL images are accepted too."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    pixels = np.asarray(getattr(image, "data", image), dtype=np.uint8)
    return Image.fromarray(pixels[0] if pixels.ndim == 4 else pixels)
