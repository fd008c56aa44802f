"""SD3 ControlNet on OpenVINO, with diffusers' ``StableDiffusion3ControlNetPipeline`` keywords and meaning.

    pipe(prompt, control_image=edges, controlnet_conditioning_scale=0.7)         # a folder with one ControlNet
    pipe(prompt, control_image=[edges, depth], controlnet_conditioning_scale=[0.7, 0.4])      # with two

- ``control_image``: one image per ControlNet of the folder (``controlnet/``, ``controlnet_1/``, ...), a list
  for several; preprocessed and VAE-encoded as diffusers does (its posterior sampled, ``(latents - shift) *
  scaling``, the shift left out for ControlNets with ``force_zeros_for_pooled_projection`` as diffusers does),
  one row per image and both halves under classifier-free guidance.
- ``controlnet_conditioning_scale`` (float or one per ControlNet, 0 to MAX_SCALE), ``control_guidance_start``
  and ``control_guidance_end`` (fractions of the steps, float or one per ControlNet): at step i of n, ControlNet
  c counts when neither ``i/n < start`` nor ``(i+1)/n > end``.
- ``controlnet_pooled_projections``: the ControlNets' pooled input (zeros for those with
  ``force_zeros_for_pooled_projection``; the prompt's pooled embeddings when not given).
- ``control_mask`` (diffusers' ``StableDiffusion3ControlNetInpaintingPipeline``, for inpainting ControlNets such
  as alimama-creative/SD3-Controlnet-Inpainting: ``extra_conditioning_channels`` 1): white is to be redrawn. A
  net with that one extra channel takes ``[masked latents, 1 - mask]``: its control image with -1 wherever the
  mask is above 0.5, encoded with the VAE shift always applied (one posterior sample per image, the same for both
  halves of guidance), and the mask taken at latent resolution by nearest sampling; its pooled input is zeros
  unless ``controlnet_pooled_projections`` is given. One mask serves every such net of the folder; nets without
  extra channels keep the plain path.

Each step runs every ControlNet (the step cache skips or runs them with the transformer), maps each one's block
samples to the transformer's blocks with diffusers' rule (block k takes sample ``int(k / (blocks / samples))``),
sums them scaled, and runs the transformer variant that takes them (``ovsd3/ir/controlnet.py``). A step where
every scale is 0 (outside the guidance window, or scale 0) runs the plain transformer: the same picture as
without control. Requests without ``control_image`` never compile a ControlNet.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ovsd3.errors import InvalidRequest
from ovsd3.runtime.devices import InferRequests, OnUse

MAX_SCALE = 100.0  # as guidance: far beyond any use (ControlNets are trained at 1), NaN and overflow refused
CONTROL_KEYWORDS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
DEFAULTS = {"controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0, "control_guidance_end": 1.0}


def _numbers(value, name: str, low: float, high: float) -> tuple[float, ...] | float:
    """A number, or a non-empty list of them, each finite and within [low, high]; a list stays a tuple."""
    items = list(value) if isinstance(value, (list, tuple)) else None
    if items is not None and not items:
        raise InvalidRequest(f"{name} is an empty list (give a number, or one per ControlNet)")
    checked = []
    for item in (items if items is not None else [value]):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real):
            raise InvalidRequest(f"{name} must be a number or a list of numbers (got {type(item).__name__})")
        number = float(item)
        if not low <= number <= high:  # NaN too
            raise InvalidRequest(f"{name} must be from {low:g} to {high:g} (got {number})")
        checked.append(number)
    return tuple(checked) if items is not None else checked[0]


@dataclass(frozen=True)
class ControlSettings:
    """The request's control keywords, checked for what needs no folder: types, finiteness, bounds, windows."""

    images: tuple  # each as ovsd3.runtime.images.image_input gives it back
    scale: float | tuple[float, ...]
    start: float | tuple[float, ...]
    end: float | tuple[float, ...]
    pooled: np.ndarray | None
    mask: object = None  # control_mask as image_input gives it back; None without

    @classmethod
    def of(cls, request) -> "ControlSettings | None":
        from ovsd3.runtime.images import image_input
        from ovsd3.runtime.request import as_array

        pooled = as_array(request.controlnet_pooled_projections, "controlnet_pooled_projections", 2)
        values = {name: _numbers(getattr(request, name), name, 0.0, MAX_SCALE if name.endswith("scale") else 1.0)
                  for name in CONTROL_KEYWORDS}
        mask = image_input(request.control_mask, "control_mask", mask=True)
        if request.control_image is None:
            given = ["control_mask"] if mask is not None else []
            given += [name for name in CONTROL_KEYWORDS if values[name] != DEFAULTS[name]]
            given += ["controlnet_pooled_projections"] if pooled is not None else []
            if given:
                raise InvalidRequest(f"{given[0]} needs a control_image")
            return None
        listed = isinstance(request.control_image, (list, tuple))
        images = list(request.control_image) if listed else [request.control_image]
        if not images:
            raise InvalidRequest("control_image is an empty list (give one image per ControlNet)")
        checked = tuple(image_input(image, f"control_image[{index}]" if listed else "control_image")
                        for index, image in enumerate(images))
        settings = cls(checked, values["controlnet_conditioning_scale"], values["control_guidance_start"],
                       values["control_guidance_end"], pooled, mask)
        settings._check_windows()
        return settings

    def _check_windows(self) -> None:
        starts, ends = self.per_net(self.start, "control_guidance_start", None), \
            self.per_net(self.end, "control_guidance_end", None)
        if len(starts) != len(ends) and min(len(starts), len(ends)) > 1:
            raise InvalidRequest(f"control_guidance_start has {len(starts)} values and control_guidance_end "
                                 f"{len(ends)}: give the same number")
        for start, end in zip(starts * len(ends) if len(starts) == 1 else starts,
                              ends * len(starts) if len(ends) == 1 else ends):
            if start >= end:
                raise InvalidRequest(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")

    @staticmethod
    def per_net(value, name: str, count: int | None) -> list[float]:
        """One value per ControlNet: a number for all, or a list of exactly ``count``."""
        if not isinstance(value, tuple):
            return [value] * (count or 1)
        if count is not None and len(value) != count:
            raise InvalidRequest(f"{name} has {len(value)} values for {count} ControlNet(s): give one number, or "
                                 f"one per ControlNet")
        return list(value)


class ControlNet:
    """One compiled ControlNet (compiled on first use), its inputs checked before they run."""

    def __init__(self, compiler, component: str, config: dict, requests: InferRequests | None = None):
        self.component, self.config = component, config
        self.compiled = OnUse(lambda: compiler.compile(component), compile_now=False)
        self.requests = requests or InferRequests()
        self.input_names = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections"] + \
            (["encoder_hidden_states"] if config.get("joint_attention_dim") is not None else [])
        self.samples = int(config["num_layers"])

    @property
    def force_zeros(self) -> bool:
        return bool(self.config.get("force_zeros_for_pooled_projection", True))

    @property
    def extra_channels(self) -> int:
        return int(self.config.get("extra_conditioning_channels", 0))

    @property
    def takes_mask(self) -> bool:
        """An inpainting ControlNet: its one extra conditioning channel is the (inverted) control_mask."""
        return self.extra_channels == 1

    def clone(self, requests: InferRequests) -> "ControlNet":
        twin = object.__new__(ControlNet)
        twin.__dict__.update(self.__dict__, requests=requests)
        return twin

    def release(self) -> None:
        self.compiled.release()

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Its block samples, unscaled, in order."""
        batch = inputs["hidden_states"].shape[0]
        if inputs["controlnet_cond"].shape[0] != batch or inputs["controlnet_cond"].shape[2:] != \
                inputs["hidden_states"].shape[2:]:
            raise InvalidRequest(f"{self.component}: control latents {inputs['controlnet_cond'].shape} do not match "
                                 f"the latents {inputs['hidden_states'].shape}")
        result = self.requests(self.compiled.get(), {name: inputs[name] for name in self.input_names})
        return [np.asarray(result[index]) for index in range(self.samples)]


def keep(step: int, steps: int, start: float, end: float) -> float:
    """diffusers' controlnet_keep: 1 while step i of n is inside [start, end], else 0."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


def block_residuals(samples_per_net: list[list[np.ndarray]], scales: list[float], block_count: int) -> dict:
    """Each block's residual (all blocks but the last): the nets' samples mapped with diffusers' rule, scaled,
    summed."""
    from ovsd3.ir.controlnet import residual_name

    residuals = {}
    for block in range(block_count - 1):
        total = None
        for samples, scale in zip(samples_per_net, scales):
            if scale == 0.0:
                continue
            interval = block_count / len(samples)
            part = samples[int(block / interval)] * np.float32(scale)
            total = part if total is None else total + part
        residuals[residual_name(block)] = total
    return residuals


@dataclass
class ControlJob:
    """What sampling needs for control: the nets, their control latents (the transformer's full batch: both
    halves when guiding) and per-net scale and window."""

    nets: list[ControlNet]
    latents: list[np.ndarray]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    pooled: np.ndarray | None  # given controlnet_pooled_projections, the transformer's full batch
    zero_pooled: list[bool] | None = None  # per net: its pooled input is zeros (None: zeros for all)
    seconds: float = 0.0

    def step_scales(self, step: int, steps: int) -> list[float]:
        return [scale * keep(step, steps, start, end)
                for scale, start, end in zip(self.scales, self.starts, self.ends)]

    def residuals(self, inputs: dict, step: int, steps: int, block_count: int) -> dict | None:
        """The transformer's residual inputs at this step, or None where no ControlNet counts (the plain
        transformer then runs: zeros would give the same)."""
        import time

        scales = self.step_scales(step, steps)
        if not any(scales):
            return None
        rows = inputs["hidden_states"].shape[0]  # the conditional half alone where a guidance interval drops CFG
        started = time.perf_counter()
        samples = []
        zeros = self.zero_pooled or [True] * len(self.nets)
        for net, latents, scale, zero_pooled in zip(self.nets, self.latents, scales, zeros):
            if scale == 0.0:
                samples.append(None)
                continue
            pooled = inputs["pooled_projections"] if self.pooled is None else self.pooled[-rows:]
            samples.append(net({**inputs, "controlnet_cond": latents[-rows:],
                                "pooled_projections": np.zeros_like(pooled) if zero_pooled else pooled}))
        self.seconds += time.perf_counter() - started
        return block_residuals(samples, scales, block_count)


def _check_fit(pipe, settings: ControlSettings, rows: int, batch: int) -> None:
    """What the folder decides: that it has ControlNets, one image and value per net, inputs they can take."""
    nets = pipe.controlnets
    if not nets:
        raise InvalidRequest(f"control_image given, but {pipe.folder} has no ControlNet (convert with "
                             f"ovsd3 convert --controlnet)")
    if len(settings.images) != len(nets):
        raise InvalidRequest(f"control_image has {len(settings.images)} image(s) for {len(nets)} ControlNet(s) in "
                             f"{pipe.folder}: give one per ControlNet")
    for name, value in (("controlnet_conditioning_scale", settings.scale), ("control_guidance_start",
                                                                            settings.start),
                        ("control_guidance_end", settings.end)):
        ControlSettings.per_net(value, name, len(nets))
    _check_mask_fit(nets, pipe.folder, settings.mask)
    if pipe.static is not None:
        raise InvalidRequest("ControlNet is not available with static shapes (--static)")
    if pipe.vae_encoder is None:
        raise InvalidRequest(f"{pipe.folder} has no vae_encoder, which control_image needs")
    pooled = settings.pooled
    if pooled is not None and (pooled.shape[1] != pipe.pooled_projection_dim or pooled.shape[0] not in (rows, batch)):
        raise InvalidRequest(f"controlnet_pooled_projections must be ({rows}, {pipe.pooled_projection_dim}) (or "
                             f"({batch}, ...) for both halves of guidance), got {pooled.shape}")


def _check_mask_fit(nets: list[ControlNet], folder, mask) -> None:
    """Inpainting ControlNets (one extra conditioning channel) need control_mask; a mask needs one of them."""
    for net in nets:
        if net.extra_channels not in (0, 1):
            raise InvalidRequest(f"{net.component} takes {net.extra_channels} extra conditioning channels: ovsd3 "
                                 f"feeds one extra channel, the mask (an inpainting ControlNet's control_mask)")
    takers = [net for net in nets if net.takes_mask]
    if takers and mask is None:
        raise InvalidRequest(f"{takers[0].component} is an inpainting ControlNet (one extra conditioning channel): "
                             f"give control_mask, white where its control_image is to be redrawn")
    if mask is not None and not takers:
        raise InvalidRequest(f"control_mask given, but no ControlNet of {folder} takes a mask (an inpainting "
                             f"ControlNet has extra_conditioning_channels 1)")


def _encoded(pipe, image, rows: int, width: int, height: int, noise, shift: float) -> np.ndarray:
    """One control image as diffusers encodes it: its rows' posterior samples drawn at once, then shifted and
    scaled."""
    from ovsd3.runtime import images as image_io

    return _encoded_pixels(pipe, image_io.load_image(image, width, height), rows, noise, shift)


def _encoded_pixels(pipe, pixels: np.ndarray, rows: int, noise, shift: float) -> np.ndarray:
    moments = pipe._infer("vae", pipe.vae_encoder, {"sample": pixels})
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    sample = mean + std * noise((rows, *mean.shape[1:]))
    return ((sample - np.float32(shift)) * np.float32(pipe.scaling_factor)).astype(np.float32)


def _masked(pipe, image, mask: np.ndarray, rows: int, guided: bool, width: int, height: int,
            noise) -> np.ndarray:
    """An inpainting ControlNet's input as diffusers' prepare_image_with_mask makes it: the control image with
    -1 where the mask is above 0.5, encoded (``rows`` posterior samples, the VAE shift always applied), then
    ``1 - mask`` at latent resolution as the last channel; repeated for the unconditional half when guiding."""
    from ovsd3.runtime import images as image_io

    pixels = np.where(mask > 0.5, np.float32(-1.0), image_io.load_image(image, width, height))
    latents = _encoded_pixels(pipe, pixels.astype(np.float32), rows, noise, pipe.shift_factor)
    factor = pipe.vae_scale_factor
    kept = np.float32(1.0) - mask[:, :, ::factor, ::factor]  # torch's nearest at an exact 1/factor
    if kept.shape[-2:] != latents.shape[-2:]:
        raise InvalidRequest(f"control_mask {mask.shape[-2:]} does not fit the control latents "
                             f"{latents.shape[-2:]}")
    control = np.concatenate([latents, np.broadcast_to(kept, (rows, 1, *kept.shape[-2:]))], axis=1)
    return np.concatenate([control, control]) if guided else control


def prepare_control(pipe, settings: ControlSettings, rows: int, guided: bool, width: int, height: int,
                    noise) -> ControlJob:
    """The request's ControlJob: every image encoded for the transformer's batch (``rows`` images, twice
    that when guiding), in the folder's order (the order diffusers draws their posteriors in). As in diffusers,
    the first plain ControlNet's ``force_zeros_for_pooled_projection`` decides for all plain ones whether the
    VAE shift is applied and whether their pooled input is zeros; inpainting ones (``_masked``) always take the
    shift, and zeros unless controlnet_pooled_projections is given."""
    from ovsd3.runtime.inpaint import load_mask

    nets, batch = pipe.controlnets, rows * (2 if guided else 1)
    _check_fit(pipe, settings, rows, batch)
    plain = [net for net in nets if not net.takes_mask]
    plain_zeros = plain[0].force_zeros if plain else True
    mask = None if settings.mask is None else load_mask(settings.mask, width, height, name="control_mask")
    latents = [_masked(pipe, image, mask, rows, guided, width, height, noise) if net.takes_mask else
               _encoded(pipe, image, batch, width, height, noise, 0.0 if plain_zeros else pipe.shift_factor)
               for net, image in zip(nets, settings.images)]
    pooled = settings.pooled
    if pooled is not None and pooled.shape[0] != batch:
        pooled = np.concatenate([pooled, pooled])
    zero_pooled = [pooled is None if net.takes_mask else plain_zeros for net in nets]
    count = len(nets)
    return ControlJob([net for net in nets], latents,
                      ControlSettings.per_net(settings.scale, "controlnet_conditioning_scale", count),
                      ControlSettings.per_net(settings.start, "control_guidance_start", count),
                      ControlSettings.per_net(settings.end, "control_guidance_end", count),
                      pooled, zero_pooled=zero_pooled)


def control_noise(request, seed: int, noise, step_noise):
    """Where the control images' posterior samples come from. With a torch generator: torch's global generator,
    as diffusers draws them (the Flash sampler's stream when it has one, which it draws from next); with a
    noise function, that function; else a stream of the request's source of its own (seed + 1), so that a
    control image never moves the starting noise: scale 0 draws the picture of no control."""
    from ovsd3.runtime.noise import DEFAULT_NOISE, global_torch_noise, noise_source

    if request.generator is not None:
        return step_noise or global_torch_noise() or noise
    if callable(request.noise):
        return noise
    return noise_source(request.noise or DEFAULT_NOISE, (seed + 1) % 2**64)
