"""One generation request, in the keywords of diffusers' ``StableDiffusion3Pipeline`` and with their meaning.

    pipe(prompt, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=None,
         guidance_scale=None, negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
         num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
         pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
         clip_skip=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=["latents"],
         max_sequence_length=256)

``mask_image`` (with ``image``: inpainting, as ``StableDiffusion3InpaintPipeline``), ``skip_guidance_layers``
and ``skip_layer_guidance_scale`` / ``_start`` / ``_stop`` (skip-layer guidance),
plus ovsd3's own: ``image`` and ``strength`` (image-to-image), ``seed`` and ``noise`` (where random numbers
come from without a torch generator), ``cache`` (step caching) and ``callback`` (sees every :class:`Step`).
``num_images`` is the older name of ``num_images_per_prompt``. Arrays may be numpy arrays or anything
``numpy.asarray`` reads (CPU torch tensors too). Invalid values raise :class:`InvalidRequest`, a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ovsd3.errors import InvalidRequest

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")  # diffusers' _callback_tensor_inputs
OUTPUT_TYPES = ("pil", "np", "latent")
# Bounds said before any work: beyond them a typo would grow until the machine kills the process.
MAX_STEPS = 1000
MAX_IMAGES = 64  # prompts x images per prompt, in one batch
MAX_SEQUENCE_LENGTH = 512  # T5's limit, as diffusers checks it
# Beyond this, guidance only adds noise and overflows (1e308 is inf in float32: a black image); diffusers
# takes any float, and 7 is its default
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit, as torch.Generator.manual_seed and openvino.genai take them


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


def as_array(value, name: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"`{name}` is not an array of numbers ({error})") from None


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

    def __post_init__(self):
        if self.num_images is not None and self.num_images_per_prompt is not None \
                and self.num_images != self.num_images_per_prompt:
            raise InvalidRequest("num_images and num_images_per_prompt disagree (num_images is its older name)")
        given = self.num_images_per_prompt if self.num_images_per_prompt is not None else self.num_images
        self.num_images_per_prompt = 1 if given is None else int(given)
        for name in ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            as_prompt_list(getattr(self, name), name)  # type check only: diffusers' `or` rules need the originals
        for name in ("latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds"):
            setattr(self, name, as_array(getattr(self, name), name))
        self._check_given_text()
        self._check_options()

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

    def _check_options(self) -> None:
        if self.max_sequence_length is not None and self.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise InvalidRequest(f"`max_sequence_length` cannot be greater than {MAX_SEQUENCE_LENGTH} but is "
                                 f"{self.max_sequence_length}")
        unknown = [name for name in self.callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise InvalidRequest(f"`callback_on_step_end_tensor_inputs` has to be in {list(CALLBACK_TENSOR_INPUTS)}, "
                                 f"but found {unknown}")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidRequest(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {self.output_type!r}; "
                                 f"ovsd3 runs without torch, so there is no 'pt')")
        if self.clip_skip is not None and self.clip_skip < 0:
            raise InvalidRequest(f"clip_skip must not be negative (got {self.clip_skip})")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise InvalidRequest(f"max_sequence_length must be at least 1 (got {self.max_sequence_length})")
        if self.mask_image is not None and self.image is None:
            raise InvalidRequest("mask_image needs an `image` to inpaint")
        if self.padding_mask_crop is not None:
            raise InvalidRequest("padding_mask_crop is not supported: ovsd3 redraws the masked region at the "
                                 "image's size")
        self._check_skip_layer_guidance()
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE:  # nan too
            raise InvalidRequest(f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {self.guidance_scale})")
        if self.seed is not None and not 0 <= int(self.seed) <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and 2**64 - 1 (got {self.seed})")
        if self.num_images_per_prompt < 1:
            raise InvalidRequest(f"number of images must be at least 1 (got {self.num_images_per_prompt})")

    def _check_skip_layer_guidance(self) -> None:
        if self.skip_guidance_layers is None:
            return
        layers = self.skip_guidance_layers
        if not isinstance(layers, (list, tuple)) or \
                not all(isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) for layer in layers):
            raise InvalidRequest(f"skip_guidance_layers must be a list of block indices, such as [7, 8, 9] "
                                 f"(got {layers!r})")
        if layers and min(layers) < 0:
            raise InvalidRequest(f"skip_guidance_layers are 0-based block indices (got {list(layers)})")
        if not 0 <= self.skip_layer_guidance_scale <= MAX_GUIDANCE:
            raise InvalidRequest(f"skip_layer_guidance_scale must be a number from 0 to {MAX_GUIDANCE:g} "
                                 f"(got {self.skip_layer_guidance_scale})")
        if not 0 <= self.skip_layer_guidance_start <= self.skip_layer_guidance_stop <= 1:
            raise InvalidRequest(f"skip_layer_guidance_start and _stop must satisfy 0 <= start <= stop <= 1 (got "
                                 f"{self.skip_layer_guidance_start} and {self.skip_layer_guidance_stop})")

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
