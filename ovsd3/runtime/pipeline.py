"""SD3 text-to-image and image-to-image on OpenVINO with numpy: no torch, diffusers or transformers.

    pipe = SD3Pipeline.load("sd3-ov", device="AUTO")
    result = pipe("a lighthouse in a storm", seed=42)
    result.images[0].save("lighthouse.png")

Sampling is a generator (``pipe.steps(job)``) that yields every step, so callers can show progress and
previews; ``pipe(...)`` runs it to the end and decodes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ovsd3 import __version__, layout
from ovsd3.errors import OvsdError
from ovsd3.runtime import images as image_io
from ovsd3.runtime.cache import CacheConfig, CacheStats, FirstBlockCache, StepCache
from ovsd3.runtime.devices import CompileOptions, DevicePlan, ModelCompiler, default_cache_dir
from ovsd3.runtime.scheduler import (FlowMatchSchedule, add_noise, euler_step, flash_step, img2img_start,
                                     predicted_clean)
from ovsd3.runtime.text import CLIP_MAX_LENGTH, PromptEmbeddings, TextEncoders
from ovsd3.runtime.transformer import Transformer

REQUIRED = (layout.TRANSFORMER, layout.CLIP_L, layout.CLIP_G, layout.VAE_DECODER)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OvsdError(f"cannot read {path}: {error}") from None


def check_folder(folder: Path) -> None:
    """A one-line error unless ``folder`` is an SD3 OpenVINO folder (ovsd3 or optimum-intel)."""
    if not folder.is_dir():
        raise OvsdError(f"model folder {folder} does not exist")
    if not (folder / layout.MODEL_INDEX).exists():
        raise OvsdError(f"{folder} is not an OpenVINO SD3 folder (no {layout.MODEL_INDEX})")
    class_name = _read_json(folder / layout.MODEL_INDEX).get("_class_name", "?")
    if not class_name.startswith("StableDiffusion3"):
        raise OvsdError(f"{folder} holds a {class_name}, not Stable Diffusion 3")
    if any((folder / layout.TRANSFORMER).glob("diffusion_pytorch_model*")):
        raise OvsdError(f"{folder} holds a PyTorch (diffusers) model, not OpenVINO IR: convert it first "
                        f"(ovsd3 convert {folder} OUT)")
    for component in REQUIRED:
        if not layout.model_xml(folder, component).exists():
            raise OvsdError(f"{folder} is missing component {component!r} ({layout.model_xml(folder, component)})")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if not (folder / tokenizer / layout.TOKENIZER_XML).exists():
            raise OvsdError(f"{folder} is missing its OpenVINO {tokenizer} ({tokenizer}/{layout.TOKENIZER_XML})")


def folder_record(folder: Path) -> layout.FolderRecord:
    """The folder's ovsd3.json, or for an optimum-intel folder one derived from it: its scheduler says
    whether it samples the Flash way (and so which defaults apply)."""
    record = layout.FolderRecord.load(folder)
    if record is not None:
        return record
    flash = FlowMatchSchedule.from_folder(folder).stochastic_sampling
    return layout.FolderRecord(source=str(folder), weight_format="unknown",
                               has_t5=layout.model_xml(folder, layout.T5).exists(),
                               defaults=layout.FLASH_DEFAULTS if flash else layout.GenerationDefaults())


def native_size(folder: Path) -> int:
    """The image size the model was made for (transformer sample_size x the VAE's downsampling)."""
    transformer = _read_json(Path(folder) / layout.TRANSFORMER / "config.json")
    vae = _read_json(Path(folder) / layout.VAE_DECODER / "config.json")
    return int(transformer.get("sample_size", 128)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


@dataclass(frozen=True)
class StaticShape:
    """Fixed sizes for devices that need them (NPU): every model is reshaped before compiling."""

    width: int
    height: int
    batch: int = 1  # images per call (prompts x images per prompt)
    guidance: bool = True  # classifier-free guidance doubles the transformer batch
    max_sequence_length: int = 256


@dataclass
class Step:
    """One finished sampling step."""

    index: int  # 0-based, among the steps run
    total: int
    sigma: float
    latents: np.ndarray  # after the step
    denoised: np.ndarray  # the clean-latent estimate at this step (for previews)


@dataclass
class Job:
    """A validated request with everything sampling needs."""

    params: dict
    prompts: list[str]
    embeds: PromptEmbeddings  # negatives first when guiding
    guidance_scale: float
    sigmas: np.ndarray  # the sigmas actually run, plus the final one
    latents: np.ndarray
    noise: Callable[[tuple], np.ndarray]
    stochastic: bool
    cache: CacheConfig = field(default_factory=CacheConfig)
    cache_stats: CacheStats | None = None  # filled in by sampling


@dataclass
class GenerationResult:
    images: list
    params: list[dict]
    timings: dict = field(default_factory=dict)
    cache_stats: CacheStats | None = None  # transformer calls run and skipped


class NumpyNoise:
    """Standard normal draws from numpy's default generator (PCG64): the same seed, the same noise."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def __call__(self, shape: tuple) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=np.float32)


class SD3Pipeline:
    def __init__(self, folder: Path, compiler: ModelCompiler, static: StaticShape | None = None):
        check_folder(folder)
        self.folder = folder
        self.static = static
        transformer_config = _read_json(folder / layout.TRANSFORMER / "config.json")
        vae_config = _read_json(folder / layout.VAE_DECODER / "config.json")
        self.latent_channels = int(transformer_config.get("in_channels", 16))
        self.vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.size_multiple = self.vae_scale_factor * int(transformer_config.get("patch_size", 2))
        self.default_size = native_size(folder)
        # The learned position embedding covers pos_embed_max_size patches a side: larger images cannot be drawn.
        self.max_size = int(transformer_config.get("pos_embed_max_size") or 0) * self.size_multiple or None
        self.scaling_factor = float(vae_config.get("scaling_factor", 1.5305))
        self.shift_factor = float(vae_config.get("shift_factor", 0.0609))
        self.schedule = FlowMatchSchedule.from_folder(folder)
        self.has_t5 = layout.model_xml(folder, layout.T5).exists() and (folder / "tokenizer_3").exists()
        self.defaults = folder_record(folder).defaults

        latent_size = None if static is None else (static.height // self.vae_scale_factor,
                                                   static.width // self.vae_scale_factor)
        self.text = TextEncoders(compiler, int(transformer_config["joint_attention_dim"]), self.has_t5,
                                 static_batch=None if static is None else static.batch,
                                 max_sequence_length=256 if static is None else static.max_sequence_length)
        transformer_batch = None if static is None else static.batch * (2 if static.guidance else 1)
        self.transformer = Transformer(compiler, int(transformer_config.get("patch_size", 2)), self.has_t5,
                                       None if static is None else {
            "hidden_states": [transformer_batch, self.latent_channels, *latent_size],
            "timestep": [transformer_batch],
            "encoder_hidden_states": [transformer_batch, CLIP_MAX_LENGTH + static.max_sequence_length,
                                      int(transformer_config["joint_attention_dim"])],
            "pooled_projections": [transformer_batch, int(transformer_config["pooled_projection_dim"])]})
        self.vae_decoder = compiler.compile(layout.VAE_DECODER, None if static is None else {
            "latent_sample": [static.batch, self.latent_channels, *latent_size]})
        self.vae_encoder = None
        if layout.model_xml(folder, layout.VAE_ENCODER).exists():
            self.vae_encoder = compiler.compile(layout.VAE_ENCODER, None if static is None else {
                "sample": [1, 3, static.height, static.width]})
        self.infer_seconds = {"text": 0.0, "vae": 0.0}

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "AUTO", static: StaticShape | None = None,
             cache_dir: Path | None | str = "default", precision: str | None = None) -> "SD3Pipeline":
        """``device``: an OpenVINO device for everything, or a plan such as ``transformer=GPU,text=CPU``.
        ``cache_dir``: OpenVINO's model cache (``None`` for none); a second start then skips compiling.
        ``precision``: ``"f32"`` to force full-precision execution."""
        folder = Path(folder)
        options = CompileOptions(plan=DevicePlan.parse(device),
                                 cache_dir=default_cache_dir() if cache_dir == "default" else
                                 (Path(cache_dir) if cache_dir is not None else None),
                                 precision=precision)
        return cls(folder, ModelCompiler(folder, options), static)

    # -- requests ---------------------------------------------------------------------------------------

    def prepare(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                num_inference_steps: int | None = None, guidance_scale: float | None = None,
                width: int | None = None, height: int | None = None, seed: int | None = None,
                num_images: int = 1, image=None, strength: float = 0.6, clip_skip: int | None = None,
                max_sequence_length: int = 256, latents: np.ndarray | None = None,
                noise: Callable[[tuple], np.ndarray] | None = None,
                cache: str | CacheConfig | None = None) -> Job:
        """Validate a request, encode its prompts and draw its starting latents.

        ``latents``: the initial noise (batch, 16, height/8, width/8), to compare with other
        implementations. ``noise``: where every other random draw comes from (default: numpy, ``seed``).
        ``cache``: step caching for this call (``"taylorseer"``, ``"first-block-cache:threshold=0.1"``, ...;
        see :mod:`ovsd3.runtime.cache`); default off.
        """
        cache = CacheConfig.parse(cache)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise OvsdError("no prompt given")
        steps = self.defaults.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        guidance = self.defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
        width = width or (self.static.width if self.static else self.default_size)
        height = height or (self.static.height if self.static else self.default_size)
        batch = len(prompts) * num_images
        self._check_request(steps, guidance, width, height, num_images, batch, image, strength, max_sequence_length)
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise OvsdError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
        seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
        noise = noise or NumpyNoise(seed)

        embeds = self._encode_prompts(prompts, negatives if guidance > 1.0 else None, num_images, clip_skip,
                                      max_sequence_length)
        sigmas = self.schedule.sigmas(steps)
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise OvsdError(f"latents have shape {tuple(latents.shape)}, this request needs {shape}")
        if image is not None:
            first = img2img_start(steps, strength)
            if first >= steps:
                raise OvsdError(f"strength {strength} with {steps} steps leaves no step to run")
            sigmas = sigmas[first:]
        start = self._start_latents(shape, latents, noise, image, width, height, float(sigmas[0]))
        params = dict(prompt=prompts[0], negative_prompt=negatives[0] if guidance > 1.0 else "",
                      num_inference_steps=steps, guidance_scale=guidance, width=width, height=height, seed=seed,
                      sampler="flash" if self.schedule.stochastic_sampling else "euler",
                      strength=strength if image is not None else None, model=self.folder.name,
                      cache=str(cache), ovsd3=__version__)
        return Job(params=params, prompts=prompts, embeds=embeds, guidance_scale=guidance, sigmas=sigmas,
                   latents=start, noise=noise, stochastic=self.schedule.stochastic_sampling, cache=cache)

    def _check_request(self, steps: int, guidance: float, width: int, height: int, num_images: int, batch: int,
                       image, strength: float, max_sequence_length: int) -> None:
        if steps < 1:
            raise OvsdError(f"steps must be at least 1 (got {steps})")
        if width <= 0 or height <= 0 or width % self.size_multiple or height % self.size_multiple:
            raise OvsdError(f"width and height must be positive multiples of {self.size_multiple} "
                            f"(got {width}x{height})")
        if self.max_size and max(width, height) > self.max_size:
            raise OvsdError(f"this model draws at most {self.max_size}x{self.max_size} (got {width}x{height})")
        if guidance < 0:
            raise OvsdError(f"guidance must not be negative (got {guidance})")
        if num_images < 1:
            raise OvsdError(f"number of images must be at least 1 (got {num_images})")
        if image is not None and not 0.0 <= strength <= 1.0:
            raise OvsdError(f"strength must be between 0 and 1 (got {strength})")
        if image is not None and self.vae_encoder is None:
            raise OvsdError(f"{self.folder} has no vae_encoder, which image-to-image needs")
        if self.static is not None and (width, height, batch, guidance > 1.0, max_sequence_length) != (
                self.static.width, self.static.height, self.static.batch, self.static.guidance,
                self.static.max_sequence_length):
            raise OvsdError(f"this pipeline was compiled for static {self.static.width}x{self.static.height}, "
                            f"{self.static.batch} image(s), guidance {'on' if self.static.guidance else 'off'}; "
                            f"the request differs")

    def _encode_prompts(self, prompts: list[str], negatives: list[str] | None, num_images: int,
                        clip_skip: int | None, max_sequence_length: int) -> PromptEmbeddings:
        """Each prompt's embeddings ``num_images`` times; with ``negatives`` (guidance) [negative, positive],
        as diffusers batches them."""
        text_before = self.text.infer_seconds
        embeds = self.text.encode(prompts, clip_skip=clip_skip, max_sequence_length=max_sequence_length)
        embeds = embeds.repeat(num_images)
        if negatives is not None:
            negative = self.text.encode(negatives, clip_skip=None, max_sequence_length=max_sequence_length)
            embeds = PromptEmbeddings.concat(negative.repeat(num_images), embeds)
        self.infer_seconds["text"] += self.text.infer_seconds - text_before
        return embeds

    def _start_latents(self, shape: tuple, latents: np.ndarray | None, noise, image, width: int, height: int,
                       first_sigma: float) -> np.ndarray:
        """Text-to-image: the initial noise. Image-to-image: the image's latents noised to the first sigma run
        (diffusers' scale_noise); its posterior sample is drawn before the noise, in diffusers' order."""
        clean = None
        if image is not None:
            clean = self._encode_image(image_io.load_image(image, width, height), noise)
        start_noise = noise(shape) if latents is None else np.asarray(latents, dtype=np.float32)
        if clean is None:
            return start_noise
        return add_noise(np.repeat(clean, shape[0] // clean.shape[0], axis=0), start_noise, first_sigma)

    def _encode_image(self, pixels: np.ndarray, noise) -> np.ndarray:
        """Image in [-1, 1] -> scaled latents, sampling the VAE posterior as diffusers does."""
        moments = self._infer("vae", self.vae_encoder, {"sample": pixels})
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * noise(mean.shape)
        return ((sample - self.shift_factor) * self.scaling_factor).astype(np.float32)

    # -- sampling ---------------------------------------------------------------------------------------

    def _infer(self, part: str, compiled, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One inference, its time counted under ``part`` (what is not counted is Python overhead)."""
        started = time.perf_counter()
        out = compiled(inputs)[0]
        self.infer_seconds[part] += time.perf_counter() - started
        return out

    def run_transformer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One transformer call (to watch every call, add an observer to ``self.transformer.observers``)."""
        return self.transformer(inputs)

    def _transformer_inputs(self, job: Job, latents: np.ndarray, timestep: float, guided: bool) -> dict:
        """The batch for one call: [negative, positive] when guiding, else the positive half alone."""
        embeds = job.embeds
        batch = latents.shape[0]
        prompt_embeds, pooled_embeds = embeds.prompt_embeds, embeds.pooled_embeds
        if job.guidance_scale > 1.0 and not guided:  # a guidance interval left this step out
            prompt_embeds, pooled_embeds = prompt_embeds[batch:], pooled_embeds[batch:]
        hidden = np.concatenate([latents, latents]) if guided else latents
        return {"hidden_states": hidden, "timestep": np.full((hidden.shape[0],), timestep, dtype=np.float32),
                "encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_embeds}

    def velocity(self, job: Job, cache: StepCache, index: int, sigma: float, timestep: float) -> np.ndarray:
        """The (guided) velocity at one step: computed, or forecast when the step cache skips the step."""
        interval = job.cache.guidance_interval
        guided = job.guidance_scale > 1.0 and (interval is None or interval.guides(sigma))
        if job.guidance_scale > 1.0 and not guided:
            cache.stats.unguided_steps += 1
        inputs = self._transformer_inputs(job, job.latents, timestep, guided)

        def combine(out: np.ndarray) -> np.ndarray:
            if not guided:
                return out
            uncond, cond = np.split(out, 2)
            return uncond + np.float32(job.guidance_scale) * (cond - uncond)

        def probe():
            signal, finish = self.transformer.probe(inputs)
            return signal, lambda: combine(finish())

        batch_share = 0.5 if job.guidance_scale > 1.0 and not guided else 1.0
        return cache.velocity(index, lambda: combine(self.run_transformer(inputs)), probe, batch_share)

    def steps(self, job: Job) -> Iterator[Step]:
        """Run the sampler, yielding after every step; ``job.latents`` holds the result at the end and
        ``job.cache_stats`` what the step cache skipped."""
        timesteps = self.schedule.timesteps(job.sigmas)
        total = len(timesteps)
        setting = job.cache.step_cache
        block_count = self.transformer.split.block_count if isinstance(setting, FirstBlockCache) else 1
        cache = StepCache(setting, total, block_count)
        job.cache_stats = cache.stats
        for index in range(total):
            sigma, sigma_next = float(job.sigmas[index]), float(job.sigmas[index + 1])
            velocity = self.velocity(job, cache, index, sigma, float(timesteps[index]))
            denoised = predicted_clean(job.latents, velocity, sigma)
            if job.stochastic:
                job.latents = flash_step(job.latents, velocity, sigma, sigma_next, job.noise(job.latents.shape))
            else:
                job.latents = euler_step(job.latents, velocity, sigma, sigma_next)
            yield Step(index, total, sigma, job.latents, denoised)

    def decode(self, latents: np.ndarray) -> list:
        pixels = self._infer("vae", self.vae_decoder,
                             {"latent_sample": latents / self.scaling_factor + self.shift_factor})
        return image_io.to_pil(pixels)

    def __call__(self, prompt: str | list[str], *, callback: Callable[[Step], None] | None = None,
                 **settings) -> GenerationResult:
        """Generate images; ``callback`` sees every step. Settings as in :meth:`prepare`."""
        started = time.perf_counter()
        infer_before = sum(self.infer_seconds.values()) + self.transformer.seconds
        job = self.prepare(prompt, **settings)
        for step in self.steps(job):
            if callback is not None:
                callback(step)
        images = self.decode(job.latents)
        total = time.perf_counter() - started
        infer = sum(self.infer_seconds.values()) + self.transformer.seconds - infer_before
        per_prompt = len(images) // len(job.prompts)
        per_image = [dict(job.params, prompt=job.prompts[index // per_prompt], image_index=index)
                     for index in range(len(images))]
        return GenerationResult(images=images, params=per_image,
                                timings={"total_seconds": total, "infer_seconds": infer,
                                         "python_seconds": total - infer},
                                cache_stats=job.cache_stats)
