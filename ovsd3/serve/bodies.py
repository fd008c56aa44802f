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
- diffusers': skip-layer guidance's fields; on edits with a mask, ``padding_mask_crop``.
- diffusers' ControlNet keywords, for a folder converted with ``--controlnet``: ``control_image`` (base64 in JSON,
  a string or one per ControlNet; files of that name on ``/v3/images/edits``), ``controlnet_conditioning_scale``,
  ``control_guidance_start`` and ``control_guidance_end`` (a number, or one per ControlNet); for an inpainting
  ControlNet, ``control_mask`` (base64 in JSON, a file of that name on edits; white is redrawn). Each control
  image and the control mask is held to the upload limits (bytes and pixels); an edit takes at most
  ``max_control_images`` control images and one control mask.

Any other field is refused (400), as a typo should be.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ovsd3.runtime.cache import CacheConfig, CacheSettingError
from ovsd3.runtime.inpaint import MAX_PADDING_MASK_CROP
from ovsd3.serve.jobs import GenerationRequest


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_images: int = 8  # n per call (OpenAI takes 1-10, OVMS's graph default max_num_images_per_prompt is 8)
    max_side: int = 2048
    min_side: int = 16
    max_steps: int = 100
    max_guidance: float = 30.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096  # checked from the header, before decoding (image bombs)
    max_json_bytes: int = 1024 * 1024  # a JSON body: six 2,000-character prompts fit many times over
    max_field_bytes: int = 64 * 1024  # one text field of an edit's multipart form
    max_form_fields: int = 64  # text fields of an edit (its body has about 35 names)
    max_control_images: int = 2  # control_image files of an edit or images of a body, each an upload
    # (and at most one control_mask, an upload too)
    retry_after_seconds: int = 5

    @property
    def max_form_bytes(self) -> int:
        """A whole edit: the image, the mask, the control images and control mask at their limit, and the text
        fields."""
        return (3 + self.max_control_images) * self.max_upload_bytes + self.max_form_fields * self.max_field_bytes

    @property
    def max_files(self) -> int:
        """The file parts of an edit: image, mask, control images, control mask."""
        return 3 + self.max_control_images


LIMITS = Limits()  # the defaults, which the request schema (and so /openapi.json) states


def _not_a_bool(value):
    """JSON's true/false are not numbers (pydantic's lax mode would take true as 1)."""
    if isinstance(value, bool):
        raise ValueError("a number is expected, not true/false")
    return value


def whole(**bounds):
    """A whole number within ``bounds`` (pydantic's ge, le, lt), stated in the schema; true/false refused."""
    return Annotated[int, Field(**bounds), BeforeValidator(_not_a_bool)]


def finite(**bounds):
    """A finite number within ``bounds``: NaN and Infinity (which Python's JSON reads) are refused."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_not_a_bool)]


Prompt = Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
Images = whole(ge=1, le=LIMITS.max_images)
Side = whole(ge=LIMITS.min_side, le=LIMITS.max_side)
Seed = whole(ge=0, lt=2**64)
Fraction = finite(ge=0.0, le=1.0)
MAX_LAYER_GUIDANCE = 100.0  # as SD3Pipeline's (ovsd3.runtime.request.MAX_GUIDANCE)
MAX_CONTROL_SCALE = 100.0  # as SD3Pipeline's (ovsd3.runtime.controlnet.MAX_SCALE)
ControlScale = finite(ge=0.0, le=MAX_CONTROL_SCALE)
MAX_BLOCK = 999  # far above any SD3 transformer's blocks (SD3.5 Large: 38); the model's own count is checked later


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Unavailable(Exception):
    """The service cannot take work now (the broker cannot be reached): the caller answers 503."""


@dataclass(frozen=True)
class ServerSettings:
    """What a body needs to know about the server to become a request."""

    limits: Limits
    size_multiple: int
    default_cache: str | None = None
    default_noise: str = "torch"


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a mistake worth hearing about

    prompt: Prompt
    model: str | None = Field(None, max_length=256)
    prompt_2: Prompt | None = None
    prompt_3: Prompt | None = None
    negative_prompt: Prompt | None = None
    negative_prompt_2: Prompt | None = None
    negative_prompt_3: Prompt | None = None
    n: Images | None = None
    num_images_per_prompt: Images | None = None
    size: str | None = Field(None, max_length=32)
    width: Side | None = None
    height: Side | None = None
    response_format: str = Field("b64_json", max_length=32)
    num_inference_steps: whole(ge=1, le=LIMITS.max_steps) | None = None
    guidance_scale: finite(ge=0.0, le=LIMITS.max_guidance) | None = None
    strength: Fraction | None = None
    rng_seed: Seed | None = None
    seed: Seed | None = None
    max_sequence_length: whole(ge=1, le=512) | None = None
    # OpenAI's
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: whole(ge=0, le=100) | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = Field(None, max_length=256)
    partial_images: whole(ge=0, le=3) | None = None
    stream: bool | None = None
    # ovsd3's
    preview_every: whole(ge=0, le=LIMITS.max_steps) = 1
    cache: str | None = Field(None, max_length=200)
    noise: Literal["torch", "numpy"] | None = None
    # diffusers' skip-layer guidance (SD3.5)
    skip_guidance_layers: list[whole(ge=0, le=MAX_BLOCK)] | None = Field(None, max_length=64)
    skip_layer_guidance_scale: finite(ge=0.0, le=MAX_LAYER_GUIDANCE) = 2.8
    skip_layer_guidance_start: Fraction = 0.01
    skip_layer_guidance_stop: Fraction = 0.2
    # diffusers' ControlNet keywords (a folder converted with --controlnet); one value, or one per ControlNet
    control_image: str | list[str] | None = Field(None, description="base64 PNG/JPEG/WebP, one per ControlNet")
    control_mask: str | None = Field(None, description="base64 PNG/JPEG/WebP: an inpainting ControlNet's mask, "
                                                       "white where its control_image is redrawn")
    controlnet_conditioning_scale: ControlScale | Annotated[list[ControlScale], Field(min_length=1,
                                                                                     max_length=8)] = 1.0
    control_guidance_start: Fraction | Annotated[list[Fraction], Field(min_length=1, max_length=8)] = 0.0
    control_guidance_end: Fraction | Annotated[list[Fraction], Field(min_length=1, max_length=8)] = 1.0

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
        extra.update(self._control(limits, extra.pop("control_image", None), extra.pop("control_mask", None)))
        return GenerationRequest(
            prompt=self.prompt, prompt_2=self.prompt_2, prompt_3=self.prompt_3, negative_prompt=self.negative_prompt,
            negative_prompt_2=self.negative_prompt_2, negative_prompt_3=self.negative_prompt_3,
            n=self._images() or 1, width=width, height=height,
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
        images = self._images()
        if images is not None and not 1 <= images <= limits.max_images:  # 0 is a number, not "not given"
            raise BadRequest(f"{'n' if self.n is not None else 'num_images_per_prompt'}: must be between 1 and "
                             f"{limits.max_images} (got {images})")
        if self.num_inference_steps is not None and not 1 <= self.num_inference_steps <= limits.max_steps:
            raise BadRequest(f"num_inference_steps: must be between 1 and {limits.max_steps} "
                             f"(got {self.num_inference_steps})")
        if self.guidance_scale is not None and not 0.0 <= self.guidance_scale <= limits.max_guidance:
            raise BadRequest(f"guidance_scale: must be between 0 and {limits.max_guidance:g}")
        if not self.skip_layer_guidance_start <= self.skip_layer_guidance_stop:
            raise BadRequest("skip_layer_guidance_start: must not be after skip_layer_guidance_stop")
        if self.rng_seed is not None and self.seed is not None and self.rng_seed != self.seed:
            raise BadRequest("rng_seed and seed disagree (seed is ovsd3's older name for rng_seed)")
        if self.preview_every > limits.max_steps:
            raise BadRequest(f"preview_every: must be at most {limits.max_steps}")
        if self.strength is not None and self.strength != 1.0:
            raise BadRequest("strength: text-to-image runs at 1.0; send an image to /v3/images/edits to use it")

    def _control(self, limits: Limits, uploads: list[bytes] | None, mask_upload: bytes | None = None) -> dict:
        """The control keywords for the request: ``uploads`` and ``mask_upload`` (an edit's files) or the
        body's base64 images, each checked as an upload; keywords without an image refused."""
        images = uploads if uploads is not None else self._decoded_control_images(limits)
        mask = mask_upload if mask_upload is not None else self._decoded_control_mask(limits)
        if not images:
            given = ["control_mask"] if mask is not None else []
            given += [name for name, default in CONTROL_DEFAULTS.items() if getattr(self, name) != default]
            if given:
                raise BadRequest(f"{given[0]}: needs a control_image")
            return {}
        if len(images) > limits.max_control_images:
            raise BadRequest(f"control_image: at most {limits.max_control_images} per request (got {len(images)})")
        return {"control_image": images, "control_mask": mask,
                **{name: getattr(self, name) for name in CONTROL_DEFAULTS}}

    def _decoded_control_mask(self, limits: Limits) -> bytes | None:
        return None if self.control_mask is None else decoded_upload(self.control_mask, limits, "control_mask")

    def _decoded_control_images(self, limits: Limits) -> list[bytes]:
        if self.control_image is None:
            return []
        listed = isinstance(self.control_image, list)
        texts = self.control_image if listed else [self.control_image]
        if not texts:
            raise BadRequest("control_image: an empty list (give one image per ControlNet)")
        if len(texts) > limits.max_control_images:
            raise BadRequest(f"control_image: at most {limits.max_control_images} per request (got {len(texts)})")
        return [decoded_upload(text, limits, f"control_image[{index}]" if listed else "control_image")
                for index, text in enumerate(texts)]

    def _images(self) -> int | None:
        return self.n if self.n is not None else self.num_images_per_prompt

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

    strength: Fraction = 0.6  # SD3's image-to-image default, as openvino.genai's
    quality: Literal["standard", "low", "medium", "high", "auto"] | None = None  # no "hd" for edits
    input_fidelity: Literal["high", "low"] | None = None
    style: None = None  # not an edit field in OpenAI's API
    moderation: None = None
    padding_mask_crop: whole(ge=0, le=MAX_PADDING_MASK_CROP) | None = None  # diffusers' inpainting crop

    def to_request(self, server: ServerSettings, *, previews: bool = True, **extra) -> GenerationRequest:
        if self.padding_mask_crop is not None and extra.get("mask") is None:
            raise BadRequest("padding_mask_crop: it crops around the mask; send a 'mask' file with it")
        return super().to_request(server, previews=previews, padding_mask_crop=self.padding_mask_crop, **extra)

    def _check_numbers(self, limits: Limits) -> None:
        strength, self.strength = self.strength, None  # generations' rule (1.0 only) does not apply here
        try:
            super()._check_numbers(limits)
        finally:
            self.strength = strength


CONTROL_DEFAULTS = {"controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0, "control_guidance_end": 1.0}


def decoded_upload(text: str, limits: Limits, name: str) -> bytes:
    """A base64 image of a JSON body (``name`` the field; a data: URL too), held to the upload limits."""
    if len(text) > (limits.max_upload_bytes + 2) // 3 * 4 + 4:  # before decoding it
        raise BadRequest(f"{name}: larger than {limits.max_upload_bytes} bytes", status=413)
    try:
        data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}: not base64 (give the image file's bytes in base64)") from None
    check_image(data, limits, name)
    return data


def check_image(data: bytes, limits: Limits, name: str = "image") -> None:
    """An uploaded image (``name`` the field): within the upload limits, and one Pillow reads; from its header,
    before it is decoded (image bombs)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_upload_bytes:
        raise BadRequest(f"{name}: larger than {limits.max_upload_bytes} bytes", status=413)
    max_pixels = limits.max_upload_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise BadRequest(f"{name}: {width}x{height} is more than {max_pixels} pixels")
            image.verify()
    except Image.DecompressionBombError:
        raise BadRequest(f"{name}: more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise BadRequest(f"{name}: not a PNG/JPEG/WebP image Pillow can read") from None


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
