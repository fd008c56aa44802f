"""The request bodies of ``/v3/images/generations`` and ``/v3/images/edits``: OpenVINO Model Server's image
generation request and OpenAI's, read into one :class:`~ovsd3.serve.jobs.GenerationRequest`.

- OVMS's fields, with its meaning: ``model``, ``prompt``, ``prompt_2``, ``prompt_3``, ``negative_prompt`` (``_2``,
  ``_3``), ``size`` ("WxH" or "auto") or ``width`` and ``height``, ``n`` or ``num_images_per_prompt`` (not both),
  ``response_format`` (b64_json only), ``num_inference_steps``, ``guidance_scale``, ``strength`` (edits;
  text-to-image runs at 1.0), ``rng_seed`` (``seed`` is ovsd3's older name for it), ``max_sequence_length``.
- OpenAI's: ``output_format`` (png, jpeg, webp) and ``output_compression`` (0-100, jpeg and webp) are honoured;
  ``quality``, ``style``, ``user``, ``background``, ``moderation``, ``partial_images`` and (edits)
  ``input_fidelity`` are checked against OpenAI's values and otherwise ignored.
- ovsd3's own: ``cache`` (step caching), ``noise`` ("torch" or "numpy"), ``preview_every`` (jobs).

Any other field is refused (400), as a typo should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ovsd3.runtime.cache import CacheConfig, CacheSettingError
from ovsd3.serve.jobs import GenerationRequest


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_images: int = 8  # n per call
    max_side: int = 2048
    min_side: int = 16
    max_steps: int = 100
    max_guidance: float = 30.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096  # checked from the header, before decoding (image bombs)
    retry_after_seconds: int = 5


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerSettings:
    """What a body needs to know about the server to become a request."""

    limits: Limits
    size_multiple: int
    default_cache: str | None = None
    default_noise: str = "torch"


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a mistake worth hearing about

    prompt: str
    model: str | None = None
    prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt: str | None = None
    negative_prompt_2: str | None = None
    negative_prompt_3: str | None = None
    n: int | None = None
    num_images_per_prompt: int | None = None
    size: str | None = None
    width: int | None = None
    height: int | None = None
    response_format: str = "b64_json"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    rng_seed: int | None = Field(None, ge=0, lt=2**64)
    seed: int | None = Field(None, ge=0, lt=2**64)
    max_sequence_length: int | None = Field(None, ge=1, le=512)
    # OpenAI's
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    stream: bool | None = None
    # ovsd3's
    preview_every: int = Field(1, ge=0)
    cache: str | None = Field(None, max_length=200)
    noise: Literal["torch", "numpy"] | None = None
    # diffusers' skip-layer guidance (SD3.5)
    skip_guidance_layers: list[int] | None = Field(None, max_length=64)
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2

    def to_request(self, server: ServerSettings, *, previews: bool = True, **extra) -> GenerationRequest:
        """Check the body against the server's limits; ``previews``: False where nobody would see them."""
        limits = server.limits
        self._check_text(limits)
        self._check_numbers(limits)
        width, height = self._size(limits, server.size_multiple)
        try:
            cache = str(CacheConfig.parse(self.cache if self.cache is not None else server.default_cache))
        except CacheSettingError as problem:
            raise BadRequest(f"cache: {problem}") from None
        seed = self.rng_seed if self.rng_seed is not None else self.seed
        return GenerationRequest(
            prompt=self.prompt, prompt_2=self.prompt_2, prompt_3=self.prompt_3, negative_prompt=self.negative_prompt,
            negative_prompt_2=self.negative_prompt_2, negative_prompt_3=self.negative_prompt_3,
            n=self.n or self.num_images_per_prompt or 1, width=width, height=height,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale, seed=seed,
            max_sequence_length=self.max_sequence_length or 256, noise=self.noise or server.default_noise,
            preview_every=self.preview_every if previews else 0, cache=cache, output_format=self.output_format,
            output_compression=self.output_compression, skip_guidance_layers=self.skip_guidance_layers,
            skip_layer_guidance_scale=self.skip_layer_guidance_scale,
            skip_layer_guidance_start=self.skip_layer_guidance_start,
            skip_layer_guidance_stop=self.skip_layer_guidance_stop, **extra)

    def _check_text(self, limits: Limits) -> None:
        for name in ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            text = getattr(self, name)
            if text is not None and len(text) > limits.max_prompt_chars:
                raise BadRequest(f"{name}: longer than {limits.max_prompt_chars} characters")
        if not self.prompt:
            raise BadRequest("prompt: must not be empty")
        if self.response_format != "b64_json":
            raise BadRequest(f"response_format: only b64_json is supported (got {self.response_format!r}; images "
                             f"are not stored for URLs)")
        if self.stream:
            raise BadRequest("stream: not supported here; follow a job's events at /v1/jobs/{id}/events instead")

    def _check_numbers(self, limits: Limits) -> None:
        if self.n is not None and self.num_images_per_prompt is not None:
            raise BadRequest("n and num_images_per_prompt: give one (they are the same setting)")
        images = self.n or self.num_images_per_prompt
        if images is not None and not 1 <= images <= limits.max_images:
            raise BadRequest(f"{'n' if self.n else 'num_images_per_prompt'}: must be between 1 and "
                             f"{limits.max_images} (got {images})")
        if self.num_inference_steps is not None and not 1 <= self.num_inference_steps <= limits.max_steps:
            raise BadRequest(f"num_inference_steps: must be between 1 and {limits.max_steps} "
                             f"(got {self.num_inference_steps})")
        if self.guidance_scale is not None and not 0.0 <= self.guidance_scale <= limits.max_guidance:
            raise BadRequest(f"guidance_scale: must be between 0 and {limits.max_guidance}")
        if self.rng_seed is not None and self.seed is not None and self.rng_seed != self.seed:
            raise BadRequest("rng_seed and seed disagree (seed is ovsd3's older name for rng_seed)")
        if self.preview_every > limits.max_steps:
            raise BadRequest(f"preview_every: must be at most {limits.max_steps}")
        if self.strength is not None and self.strength != 1.0:
            raise BadRequest("strength: text-to-image runs at 1.0; send an image to /v3/images/edits to use it")

    def _size(self, limits: Limits, multiple: int) -> tuple[int | None, int | None]:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise BadRequest("size and width/height: give one or the other")
        if self.width is not None or self.height is not None:
            if self.width is None or self.height is None:
                raise BadRequest("width and height: give both")
            return check_sides(self.width, self.height, limits, multiple, f"{self.width}x{self.height}")
        return parse_size(self.size, limits, multiple)


class EditBody(GenerationBody):
    """The multipart fields of an edit (text, which pydantic converts as it validates), less the image."""

    strength: float = Field(0.6, ge=0.0, le=1.0)  # SD3's image-to-image default, as openvino.genai's
    quality: Literal["standard", "low", "medium", "high", "auto"] | None = None  # no "hd" for edits
    input_fidelity: Literal["high", "low"] | None = None
    style: None = None  # not an edit field in OpenAI's API
    moderation: None = None

    def _check_numbers(self, limits: Limits) -> None:
        strength, self.strength = self.strength, None  # generations' rule (1.0 only) does not apply here
        try:
            super()._check_numbers(limits)
        finally:
            self.strength = strength


def parse_size(size: str | None, limits: Limits, multiple: int) -> tuple[int | None, int | None]:
    """"WxH" (or "auto"/None: the model's own size) -> (width, height)."""
    if size in (None, "", "auto"):
        return None, None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise BadRequest(f"size must look like 512x512 (got {size!r})") from None
    return check_sides(width, height, limits, multiple, size)


def check_sides(width: int, height: int, limits: Limits, multiple: int, size: str) -> tuple[int, int]:
    for side in (width, height):
        if not limits.min_side <= side <= limits.max_side or side % multiple:
            raise BadRequest(f"size sides must be multiples of {multiple} between {limits.min_side} and "
                             f"{limits.max_side} (got {size})")
    return width, height
