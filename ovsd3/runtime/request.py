"""One generation request, in the keywords of diffusers' ``StableDiffusion3Pipeline`` and with their meaning.

    pipe(prompt, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=None,
         guidance_scale=None, negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
         num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
         pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
         clip_skip=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=["latents"],
         max_sequence_length=256)

``mask_image`` and ``padding_mask_crop`` (with ``image``: inpainting, as ``StableDiffusion3InpaintPipeline``),
``skip_guidance_layers``
and ``skip_layer_guidance_scale`` / ``_start`` / ``_stop`` (skip-layer guidance),
plus ovsd3's own: ``image`` and ``strength`` (image-to-image), ``seed`` and ``noise`` (where random numbers
come from without a torch generator), ``cache`` (step caching) and ``callback`` (sees every :class:`Step`).
ControlNet: ``control_image``, ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``,
``controlnet_pooled_projections`` and, for an inpainting ControlNet, ``control_mask``
(:mod:`ovsd3.runtime.controlnet`). ``num_images`` is the older name of ``num_images_per_prompt``. Arrays may be numpy arrays or anything
``numpy.asarray`` reads (CPU torch tensors too). Invalid values raise :class:`InvalidRequest`, a ``ValueError``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np

from ovsd3.errors import InvalidRequest, reason_of
from ovsd3.layout import MAX_GUIDANCE, MAX_STEPS  # noqa: F401 (re-exported: the runtime's callers import them here)
from ovsd3.runtime.cache import CacheConfig
from ovsd3.runtime.controlnet import ControlSettings
from ovsd3.runtime.images import image_input
from ovsd3.runtime.inpaint import MAX_PADDING_MASK_CROP

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")  # diffusers' _callback_tensor_inputs
OUTPUT_TYPES = ("pil", "np", "latent")
# Bounds said before any work: beyond them a typo would grow until the machine kills the process. Steps and
# guidance are layout's, which a folder's defaults keep too. Beyond 100, guidance only adds noise and overflows
# (1e308 is inf in float32: a black image); diffusers takes any float, and 7 is its default.
MAX_IMAGES = 64  # prompts x images per prompt, in one batch
MAX_SEQUENCE_LENGTH = 512  # T5's limit, as diffusers checks it
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit, as torch.Generator.manual_seed and openvino.genai take them
# The largest side asked for before the model's own limit is known: 8192 is the input images' bound
# (MAX_INPUT_PIXELS) and far past any SD3 position embedding (3072 for SD3 Medium and SD3.5)
MAX_SIDE = 8192
# Given embeddings are as long as SD3's encoders make them: CLIP's 77 tokens and T5's at most 512
MAX_EMBEDDING_TOKENS = 77 + MAX_SEQUENCE_LENGTH


def as_prompt_list(prompt: str | list[str] | None, name: str) -> list[str] | None:
    if prompt is None:
        return prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list):
        for text in prompt:
            _check_text(text, name)
        return prompt
    raise InvalidRequest(f"`{name}` has to be of type `str` or `list` but is {type(prompt)}")


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"`{name}` has to be of type `str` or `list` of `str`, but holds {type(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, as Python decodes a command line or a file
        raise InvalidRequest(f"`{name}` is not valid UTF-8 text") from None


def shown(value) -> str:
    """A value as an error message quotes it: short, one line (an array by its type and shape)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def integer(value, name: str) -> int:
    """An integer keyword: an int or numpy integer, or a float with no fraction (diffusers passes 512.0 on);
    never a bool, never 64.5 drawn as 64."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidRequest(f"{name} must be an integer (got {value!r})")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise InvalidRequest(f"{name} must be a whole number (got {shown(value)})")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidRequest(f"{name} must be an integer (got {shown(value)})") from None


def _as_float(value, name: str) -> float:
    """Any real number but a bool (True is not a guidance of 1), as a float; NaN and inf stay for the caller."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidRequest(f"{name} must be a number (got {shown(value)})")
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range
        return math.inf


def real(value, name: str) -> float:
    """A number keyword, finite (NaN and inf draw black or noisy images)."""
    number = _as_float(value, name)
    if not math.isfinite(number):
        raise InvalidRequest(f"{name} must be a finite number (got {value})")
    return number


def as_array(value, name: str, ndim: int | None = None) -> np.ndarray | None:
    """A float32 array of finite numbers (numpy, a CPU torch tensor, nested lists), of ``ndim`` dimensions when
    given, none of them empty."""
    if value is None:
        return None
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":  # bools, complex, strings, objects: not what a model reads
            raise TypeError(f"its values are {array.dtype}")
        array = array.astype(np.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidRequest(f"`{name}` is not an array of numbers ({reason_of(error)})") from None
    if ndim is not None and array.ndim != ndim:
        raise InvalidRequest(f"`{name}` must have {ndim} dimensions, got shape {array.shape}")
    if not array.size:
        raise InvalidRequest(f"`{name}` is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise InvalidRequest(f"`{name}` holds NaN or infinite values")
    return array


# keyword -> (lowest, highest): integers checked for type and range before any work
INTEGER_RANGES = {"height": (1, MAX_SIDE), "width": (1, MAX_SIDE), "num_inference_steps": (1, MAX_STEPS),
                  "num_images_per_prompt": (1, MAX_IMAGES), "num_images": (1, MAX_IMAGES), "clip_skip": (0, None),
                  "max_sequence_length": (1, MAX_SEQUENCE_LENGTH), "seed": (0, MAX_SEED),
                  "padding_mask_crop": (0, MAX_PADDING_MASK_CROP)}
# keyword -> (lowest, highest), both included
NUMBER_RANGES = {"guidance_scale": (0.0, MAX_GUIDANCE), "strength": (0.0, 1.0),
                 "skip_layer_guidance_scale": (0.0, MAX_GUIDANCE), "skip_layer_guidance_start": (0.0, 1.0),
                 "skip_layer_guidance_stop": (0.0, 1.0)}
# keyword -> its array's dimensions
ARRAY_DIMENSIONS = {"latents": 4, "prompt_embeds": 3, "negative_prompt_embeds": 3, "pooled_prompt_embeds": 2,
                    "negative_pooled_prompt_embeds": 2, "masked_image_latents": None}


def _range_error(name: str, value, low, high) -> str:
    """The one line for an integer out of range, in the words the command line uses for the same bound."""
    if name in ("width", "height"):
        return f"width and height must be positive multiples of 16 up to {MAX_SIDE} ({name} got {value})"
    if name == "clip_skip":
        return f"clip_skip must not be negative (got {value})"
    if name == "max_sequence_length":
        return (f"`max_sequence_length` cannot be greater than {MAX_SEQUENCE_LENGTH} but is {value}" if value > high
                else f"max_sequence_length must be at least 1 (got {value})")
    if name == "seed":
        return f"seed must be between 0 and 2**64 - 1 (got {value})"
    if name in ("num_images_per_prompt", "num_images"):
        return f"number of images ({name}) must be at least 1, and prompts x images at most {MAX_IMAGES} " \
               f"(got {value})"
    return f"{name} must be between {low} and {high} (got {value})"


def _number_error(name: str, value, low: float, high: float) -> str:
    if name == "guidance_scale":  # the command line's words for --guidance
        return f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (guidance_scale got {value})"
    if name == "strength":
        return f"strength must be between 0 and 1 (got {value})"
    return f"{name} must be a number from {low:g} to {high:g} (got {value})"


def checked_integer(value, name: str) -> int:
    """``value`` as the integer keyword ``name`` takes it, in INTEGER_RANGES' bounds."""
    number = integer(value, name)
    low, high = INTEGER_RANGES[name]
    if (low is not None and number < low) or (high is not None and number > high):
        raise InvalidRequest(_range_error(name, number, low, high))
    return number


def checked_number(value, name: str) -> float:
    """``value`` as the number keyword ``name`` takes it, finite and in NUMBER_RANGES' bounds."""
    number = _as_float(value, name)
    low, high = NUMBER_RANGES[name]
    if not low <= number <= high:  # NaN too
        raise InvalidRequest(_number_error(name, number, low, high))
    return number


@dataclass
class Request:
    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    prompt_3: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None  # None: the folder's default (28, or 4 for Flash)
    guidance_scale: float | None = None  # None: the folder's default (7, or 0 for Flash)
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    negative_prompt_3: str | list[str] | None = None
    num_images_per_prompt: int | None = None
    generator: Any = None  # a torch.Generator (or a list, one per image), read without importing torch
    latents: Any = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    pooled_prompt_embeds: Any = None
    negative_pooled_prompt_embeds: Any = None
    output_type: str = "pil"
    return_dict: bool = True
    clip_skip: int | None = None
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])
    max_sequence_length: int = 256
    image: Any = None
    strength: float = 0.6
    mask_image: Any = None  # inpainting (diffusers' StableDiffusion3InpaintPipeline): white is redrawn
    masked_image_latents: Any = None  # accepted as diffusers does; its SD3 (16-channel) transformer ignores them
    padding_mask_crop: int | None = None
    skip_guidance_layers: list[int] | None = None  # skip-layer guidance (SD3.5 Medium: [7, 8, 9])
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_stop: float = 0.2
    skip_layer_guidance_start: float = 0.01
    seed: int | None = None
    noise: Any = None  # a callable noise(shape), or the name of a source ("torch", "numpy")
    cache: Any = None
    callback: Callable | None = None
    num_images: int | None = None  # the older name of num_images_per_prompt
    # ControlNet (diffusers' StableDiffusion3ControlNetPipeline; ovsd3.runtime.controlnet): one image per ControlNet
    control_image: Any = None
    control_mask: Any = None  # an inpainting ControlNet's mask (StableDiffusion3ControlNetInpaintingPipeline)
    controlnet_conditioning_scale: Any = 1.0  # a number, or one per ControlNet
    control_guidance_start: Any = 0.0
    control_guidance_end: Any = 1.0
    controlnet_pooled_projections: Any = None

    @classmethod
    def of(cls, prompt=None, **settings) -> "Request":
        """A request from a call's keywords: an unknown keyword is refused in one line, as a TypeError would
        name it, with the nearest known keyword when there is one (a typo is not silently ignored)."""
        known = [item.name for item in fields(cls)]
        for name in settings:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                raise InvalidRequest(f"got an unexpected keyword argument {name!r}"
                                     + (f" (did you mean {near[0]!r}?)" if near else ""))
        return cls(prompt=prompt, **settings)

    def __post_init__(self):
        self._check_numbers()
        self._check_kinds()
        for name in ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            as_prompt_list(getattr(self, name), name)  # type check only: diffusers' `or` rules need the originals
        for name, ndim in ARRAY_DIMENSIONS.items():
            setattr(self, name, as_array(getattr(self, name), name, ndim))
        self.image = image_input(self.image, "image")
        self.mask_image = image_input(self.mask_image, "mask_image", mask=True)
        self._check_given_text()
        self._check_given_embeddings()
        self._check_options()
        ControlSettings.of(self)  # the control keywords' types and bounds; their fit to the folder comes later

    def _check_numbers(self) -> None:
        """Every integer and number keyword: its type, finiteness and bounds, before anything is allocated."""
        optional = {item.name for item in fields(self) if item.default is None}
        for name in INTEGER_RANGES:
            if getattr(self, name) is not None or name not in optional:
                setattr(self, name, checked_integer(getattr(self, name), name))
        for name in NUMBER_RANGES:
            if getattr(self, name) is not None or name not in optional:
                setattr(self, name, checked_number(getattr(self, name), name))
        if self.num_images is not None and self.num_images_per_prompt is not None \
                and self.num_images != self.num_images_per_prompt:
            raise InvalidRequest("num_images and num_images_per_prompt disagree (num_images is its older name)")
        given = self.num_images_per_prompt if self.num_images_per_prompt is not None else self.num_images
        self.num_images_per_prompt = 1 if given is None else given

    def _check_kinds(self) -> None:
        """The keywords that take a string, a flag, a function or a list of names."""
        if not isinstance(self.output_type, str) or self.output_type not in OUTPUT_TYPES:
            raise InvalidRequest(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {shown(self.output_type)}"
                                 f"; ovsd3 runs without torch, so there is no 'pt')")
        if not isinstance(self.return_dict, (bool, np.bool_)):
            raise InvalidRequest(f"return_dict must be True or False (got {shown(self.return_dict)})")
        for name in ("callback_on_step_end", "callback"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise InvalidRequest(f"{name} must be a function (got {shown(getattr(self, name))})")
        if self.noise is not None and not callable(self.noise) and not isinstance(self.noise, str):
            raise InvalidRequest(f"noise must be a source's name or a function noise(shape) (got {shown(self.noise)})")
        inputs = self.callback_on_step_end_tensor_inputs
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(name, str) for name in inputs):
            raise InvalidRequest(f"`callback_on_step_end_tensor_inputs` must be a list of names, such as ['latents'] "
                                 f"(got {shown(inputs)})")
        CacheConfig.parse(self.cache)  # a spec string, a CacheConfig or None; refused here, before any work

    def _check_given_text(self) -> None:
        """diffusers' check_inputs for prompts and embeddings: one of each pair, never both."""
        for name in ("prompt", "prompt_2", "prompt_3"):
            if getattr(self, name) is not None and self.prompt_embeds is not None:
                raise InvalidRequest(f"cannot forward both `{name}` and `prompt_embeds`: give only one of the two")
        if self.prompt is None and self.prompt_embeds is None:
            raise InvalidRequest("provide either `prompt` or `prompt_embeds`")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("no prompt given (an empty list)")
        for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            if getattr(self, name) is not None and self.negative_prompt_embeds is not None:
                raise InvalidRequest(f"cannot forward both `{name}` and `negative_prompt_embeds`: give only one")
        if self.prompt_embeds is not None and self.pooled_prompt_embeds is None:
            raise InvalidRequest("if `prompt_embeds` are provided, `pooled_prompt_embeds` also have to be passed")
        if self.negative_prompt_embeds is not None and self.negative_pooled_prompt_embeds is None:
            raise InvalidRequest("if `negative_prompt_embeds` are provided, `negative_pooled_prompt_embeds` also "
                                 "have to be passed")
        if self.prompt_embeds is not None and self.negative_prompt_embeds is not None \
                and self.prompt_embeds.shape != self.negative_prompt_embeds.shape:
            raise InvalidRequest(f"`prompt_embeds` {self.prompt_embeds.shape} and `negative_prompt_embeds` "
                                 f"{self.negative_prompt_embeds.shape} must have the same shape")

    def _check_given_embeddings(self) -> None:
        """Given embeddings agree with each other (their widths against the model are the pipeline's check), and
        the batch they make stays within MAX_IMAGES."""
        embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        if embeds is not None:
            if embeds.shape[1] > MAX_EMBEDDING_TOKENS:
                raise InvalidRequest(f"`prompt_embeds` has {embeds.shape[1]} tokens, more than the "
                                     f"{MAX_EMBEDDING_TOKENS} SD3's text encoders make")
            if pooled is not None and pooled.shape[0] != embeds.shape[0]:
                raise InvalidRequest(f"`pooled_prompt_embeds` {pooled.shape} and `prompt_embeds` {embeds.shape} "
                                     "must have the same batch size")
        negative_pooled = self.negative_pooled_prompt_embeds
        if pooled is not None and negative_pooled is not None and negative_pooled.shape != pooled.shape:
            raise InvalidRequest(f"`pooled_prompt_embeds` {pooled.shape} and `negative_pooled_prompt_embeds` "
                                 f"{negative_pooled.shape} must have the same shape")
        if self.batch_size * self.num_images_per_prompt > MAX_IMAGES:
            raise InvalidRequest(f"prompts x images must be at most {MAX_IMAGES} (got {self.batch_size} x "
                                 f"{self.num_images_per_prompt}, num_images_per_prompt)")

    def _check_options(self) -> None:
        unknown = [name for name in self.callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise InvalidRequest(f"`callback_on_step_end_tensor_inputs` has to be in {list(CALLBACK_TENSOR_INPUTS)}, "
                                 f"but found {unknown}")
        if self.mask_image is not None and self.image is None:
            raise InvalidRequest("mask_image needs an `image` to inpaint")
        if self.padding_mask_crop is not None and self.mask_image is None:
            raise InvalidRequest("padding_mask_crop crops around mask_image: give an image and a mask_image, or "
                                 "leave padding_mask_crop out")
        if self.padding_mask_crop is not None and self.output_type == "latent":
            raise InvalidRequest("padding_mask_crop pastes the redrawn crop back onto the image, which latents "
                                 "cannot show: use output_type 'pil' or 'np'")
        self._check_skip_layer_guidance()

    def _check_skip_layer_guidance(self) -> None:
        """The layers' type and sign (their range is the pipeline's check, which knows the blocks); the scale,
        start and stop were checked as numbers."""
        if self.skip_layer_guidance_start > self.skip_layer_guidance_stop:
            raise InvalidRequest(f"skip_layer_guidance_start and _stop must satisfy 0 <= start <= stop <= 1 (got "
                                 f"{self.skip_layer_guidance_start} and {self.skip_layer_guidance_stop})")
        if self.skip_guidance_layers is None:
            return
        layers = self.skip_guidance_layers
        if not isinstance(layers, (list, tuple)) or \
                not all(isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) for layer in layers):
            raise InvalidRequest(f"skip_guidance_layers must be a list of block indices, such as [7, 8, 9] "
                                 f"(got {shown(layers)})")
        if layers and min(layers) < 0:
            raise InvalidRequest(f"skip_guidance_layers are 0-based block indices (got {shown(list(layers))})")

    @property
    def batch_size(self) -> int:
        """Prompts (or given embeddings) in the request, before num_images_per_prompt."""
        if self.prompt is not None:
            return len(as_prompt_list(self.prompt, "prompt"))
        return int(self.prompt_embeds.shape[0])

    def prompts(self) -> tuple[list[str], list[str], list[str]] | None:
        """The prompts for CLIP-L, CLIP-G and T5 (prompt_2 and prompt_3 default to prompt), or None when the
        request brings its embeddings."""
        if self.prompt_embeds is not None:
            return None
        prompt = as_prompt_list(self.prompt, "prompt")
        return prompt, *(self._matched(as_prompt_list(other or self.prompt, name), name, len(prompt))
                         for other, name in ((self.prompt_2, "prompt_2"), (self.prompt_3, "prompt_3")))

    def negative_prompts(self) -> tuple[list[str], list[str], list[str]] | None:
        """diffusers' negatives: "" by default, negative_prompt_2/3 defaulting to negative_prompt, a single
        string repeated for every prompt; None when the request brings negative embeddings."""
        if self.negative_prompt_embeds is not None:
            return None
        negative = self.negative_prompt or ""
        chosen = (negative, self.negative_prompt_2 or negative, self.negative_prompt_3 or negative)
        names = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")
        return tuple(self._matched([text] * self.batch_size if isinstance(text, str) else list(text), name,
                                   self.batch_size) for text, name in zip(chosen, names))

    @staticmethod
    def _matched(prompts: list[str], name: str, batch_size: int) -> list[str]:
        if len(prompts) != batch_size:
            raise InvalidRequest(f"`{name}` has batch size {len(prompts)}, but `prompt` has batch size {batch_size}")
        return prompts
