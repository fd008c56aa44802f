"""SD3 text-to-image and image-to-image on OpenVINO with numpy: no torch, diffusers or transformers.

    pipe = SD3Pipeline.load("sd3-ov", device="AUTO")
    result = pipe("a lighthouse in a storm", seed=42)
    result.images[0].save("lighthouse.png")

Sampling is a generator (``pipe.steps(job)``) that yields every step, so callers can show progress and
previews; ``pipe(...)`` runs it to the end and decodes.
"""

from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ovsd3 import __version__, layout
from ovsd3.errors import InvalidRequest, OvsdError
from ovsd3.memory import release_freed, total_memory_bytes
from ovsd3.runtime import images as image_io
from ovsd3.runtime.adapters import LoraAdapter, parse_lora_mode
from ovsd3.runtime.cache import SKIP_LAYER_SHARE, CacheConfig, CacheStats, FirstBlockCache, StepCache
from ovsd3.runtime.controlnet import ControlJob, ControlNet, ControlSettings, control_noise, prepare_control
from ovsd3.runtime.devices import (CompileOptions, DevicePlan, InferRequests, ModelCompiler, OnUse,
                                   default_cache_dir)
from ovsd3.runtime.guidance import SkipLayerGuidance
from ovsd3.runtime.inpaint import MaskBlend, MaskCrop, load_mask
from ovsd3.runtime.noise import (DEFAULT_NOISE, NumpyNoise, generator_noise, global_torch_noise,  # noqa: F401
                                 noise_source)
from ovsd3.runtime.request import MAX_GUIDANCE, MAX_STEPS, Request, as_array
from ovsd3.runtime.scheduler import (FlowMatchSchedule, add_noise, euler_step, flash_step, img2img_start,
                                     predicted_clean)
from ovsd3.runtime.text import CLIP_MAX_LENGTH, PromptEmbeddings, TextEncoders
from ovsd3.runtime.transformer import Transformer


# Above this share of the machine's memory, a folder's models are offloaded (compiled one at a time) by the
# commands that load it: SD3.5 Large in fp16 is 18 GB without T5 and 27.6 GB with it, and a compiled model
# holds its weights repacked (bf16 on most CPUs), so all of it at once does not fit in 24 GB; its INT8 folder
# with T5 (11.5 GB) fits, but not with the 8 GiB of activations a dynamic-shape transformer holds at 1024x1024.
OFFLOAD_SHARE = 0.4


def offload_advised(folder: Path) -> bool:
    """Whether loading every model of ``folder`` at once would take more than OFFLOAD_SHARE of this machine."""
    total = total_memory_bytes()
    return bool(total) and layout.weight_bytes(folder) > OFFLOAD_SHARE * total


MAX_CONCURRENCY = 64  # pipelines generating at once from one set of compiled models (ovsd3 serve's --workers bound)
SHAPES_KEPT = 3  # transformer compilations a concurrent pipeline keeps, one per recent call shape
IMAGE_TO_IMAGE_STEPS = 50  # diffusers' default for its SD3 image-to-image and inpainting pipelines


@dataclass(frozen=True)
class StaticShape:
    """Fixed sizes for devices that need them (NPU): every model is reshaped before compiling."""

    width: int
    height: int
    batch: int = 1  # images per call (prompts x images per prompt)
    prompts: int | None = None  # prompts per call, the text encoders' batch; None: ``batch`` (one image each)
    guidance: bool = True  # classifier-free guidance doubles the transformer batch
    max_sequence_length: int = 256


@dataclass
class Step:
    """One finished sampling step."""

    index: int  # 0-based, among the steps run
    total: int
    sigma: float
    timestep: float  # the transformer's timestep input (diffusers' `t`)
    latents: np.ndarray  # after the step
    denoised: np.ndarray  # the clean-latent estimate at this step (for previews)


@dataclass
class Job:
    """A validated request with everything sampling needs."""

    params: dict
    prompts: list[str]  # one per image batch row before num_images_per_prompt ("" for given embeddings)
    embeds: PromptEmbeddings  # negatives first when guiding
    guidance_scale: float
    sigmas: np.ndarray  # the sigmas actually run, plus the final one
    latents: np.ndarray
    noise: Callable[[tuple], np.ndarray]
    stochastic: bool
    step_noise: Callable[[tuple], np.ndarray] | None = None  # the Flash sampler's, when not ``noise`` (diffusers)
    cache: CacheConfig = field(default_factory=CacheConfig)
    cache_stats: CacheStats | None = None  # filled in by sampling
    blend: MaskBlend | None = None  # inpainting
    crop: MaskCrop | None = None  # inpainting's padding_mask_crop: the redrawn box goes back onto the picture
    skip_layer_guidance: SkipLayerGuidance | None = None
    control: ControlJob | None = None  # ControlNets (ovsd3.runtime.controlnet)

    @property
    def rows(self) -> int:
        """Images the job draws (its latents' batch)."""
        return len(self.latents)

    @staticmethod
    def together(jobs: list[Job]) -> Job:
        """Prepared text-to-image jobs of one size, schedule, guidance and cache as one batched job: each keeps
        its own embeddings, starting latents and noise stream, so each draws what it would alone (up to the
        rounding of a larger batch). Its latents are the jobs' in order (``split`` hands them back)."""
        if len(jobs) == 1:
            return jobs[0]
        first = jobs[0]
        if any(job.blend is not None or job.crop is not None or job.skip_layer_guidance is not None
               or job.control is not None for job in jobs):
            raise ValueError("inpainting, skip-layer guidance and ControlNet jobs are drawn alone")
        guided = first.guidance_scale > 1.0
        halves = [np.split(job.embeds.prompt_embeds, 2) if guided else [job.embeds.prompt_embeds] for job in jobs]
        pooled = [np.split(job.embeds.pooled_embeds, 2) if guided else [job.embeds.pooled_embeds] for job in jobs]
        embeds = PromptEmbeddings(np.concatenate([part[half] for half in range(len(halves[0])) for part in halves]),
                                  np.concatenate([part[half] for half in range(len(pooled[0])) for part in pooled]))

        def rows_of(noises: list[Callable]) -> Callable[[tuple], np.ndarray]:
            return lambda shape: np.concatenate([noise((job.rows, *shape[1:])) for noise, job in zip(noises, jobs)])

        step_noises = [job.step_noise or job.noise for job in jobs]
        return replace(first, prompts=[prompt for job in jobs for prompt in job.prompts], embeds=embeds,
                       latents=np.concatenate([job.latents for job in jobs]), noise=rows_of([j.noise for j in jobs]),
                       step_noise=rows_of(step_noises) if any(job.step_noise for job in jobs) else None)

    @staticmethod
    def split(rows: np.ndarray, jobs: list[Job]) -> list[np.ndarray]:
        """A batched job's rows (latents, denoised, images) back per job."""
        return np.split(rows, np.cumsum([job.rows for job in jobs])[:-1]) if len(jobs) > 1 else [rows]


@dataclass
class GenerationResult:
    images: list
    params: list[dict]
    timings: dict = field(default_factory=dict)
    cache_stats: CacheStats | None = None  # transformer calls run and skipped


class SD3Pipeline:
    """Diffusers' ``StableDiffusion3Pipeline`` call on OpenVINO (see :mod:`ovsd3.runtime.request`)."""

    def __init__(self, folder: Path, compiler: ModelCompiler, static: StaticShape | None = None,
                 adapters=None, offload: bool = False, lora_mode: str | None = None):
        model = layout.ModelFolder.open(folder)
        self.folder, self.static = model.path, static
        self.latent_channels = int(model.transformer_config.get("in_channels", 16))
        self.joint_attention_dim = int(model.transformer_config["joint_attention_dim"])
        self.pooled_projection_dim = int(model.transformer_config["pooled_projection_dim"])
        self.vae_scale_factor = model.vae_scale_factor
        self.size_multiple = self.vae_scale_factor * model.patch_size
        self.default_size = model.native_size
        self.max_size = model.max_size
        self.block_count = model.block_count
        self.scaling_factor = float(model.vae_config.get("scaling_factor", 1.5305))
        self.shift_factor = float(model.vae_config.get("shift_factor", 0.0609))
        self.schedule = FlowMatchSchedule.from_folder(folder)
        self.has_t5 = model.has_t5
        self.defaults = model.record.defaults
        self._compiler, self._patch_size = compiler, model.patch_size
        self._requests = InferRequests()  # this pipeline's own; a clone has others (see clone)
        self._family = weakref.WeakSet([self])  # this pipeline and its clones, which share its compiled models
        self.adapters: tuple[LoraAdapter, ...] = ()
        self.lora_mode = parse_lora_mode(lora_mode)
        self._adapter_edit = None
        self._use_adapters(adapters)
        self.offload = offload
        self._compile(compiler, model)
        self._reset_call_state()

    def _reset_call_state(self) -> None:
        """What one pipeline object changes while it generates: timings and diffusers' views of the call."""
        self.infer_seconds = {"text": 0.0, "vae": 0.0}
        self._guidance_scale, self._clip_skip, self._num_timesteps, self._interrupt = None, None, 0, False

    def clone(self) -> "SD3Pipeline":
        """A pipeline that shares this one's compiled models (one copy of the weights), tokenizers, folder
        record and LoRA adapters, with infer requests, timings and call state of its own: a pipeline and its
        clones may generate at once in different threads (one pipeline object must not be used by two threads
        at once). openvino.genai's ``Text2ImagePipeline.clone()``. Load with ``concurrency`` set to the number
        of pipelines that will generate at once, so that their calls share the cores rather than oversubscribe
        them. Not with model offload: it compiles each component per call, so there is nothing to share."""
        if self.offload:
            raise OvsdError("clone() shares compiled models, and with model offload nothing stays compiled: load "
                            "another pipeline instead")
        twin = copy.copy(self)
        twin._requests = InferRequests()
        twin.text = self.text.clone(twin._requests)
        twin.transformer = self.transformer.clone(twin._requests)
        twin.controlnets = [net.clone(twin._requests) for net in self.controlnets]
        twin._reset_call_state()
        self._family.add(twin)
        return twin

    def _check_alone(self, action: str) -> None:
        """Refuse what would change the compiled models (or the IR edits) that clones share."""
        if len(self._family) > 1:
            raise OvsdError(f"{action} would change the compiled models this pipeline shares with its "
                            f"{len(self._family) - 1} clone(s) (or source): load a separate pipeline for it")

    def _compile(self, compiler: ModelCompiler, model: layout.ModelFolder) -> None:
        static = self.static
        latent_size = None if static is None else (static.height // self.vae_scale_factor,
                                                   static.width // self.vae_scale_factor)
        compile_now = not self.offload  # offloading compiles each component when its phase starts
        self.text = TextEncoders(compiler, self.joint_attention_dim, self.has_t5,
                                 static_batch=None if static is None else static.prompts or static.batch,
                                 max_sequence_length=256 if static is None else static.max_sequence_length,
                                 compile_now=compile_now, requests=self._requests)
        transformer_batch = None if static is None else static.batch * (2 if static.guidance else 1)
        self._transformer_shapes = None if static is None else {
            "hidden_states": [transformer_batch, self.latent_channels, *latent_size],
            "timestep": [transformer_batch],
            "encoder_hidden_states": [transformer_batch, CLIP_MAX_LENGTH + static.max_sequence_length,
                                      self.joint_attention_dim],
            "pooled_projections": [transformer_batch, int(model.transformer_config["pooled_projection_dim"])]}
        self.transformer = self._new_transformer()
        # compiled when a request first gives a control_image: requests without control pay nothing for them
        self.controlnets = [ControlNet(compiler, layout.controlnet_component(index), config, self._requests)
                            for index, config in enumerate(model.controlnet_configs)]
        self.vae_decoder = OnUse(lambda: compiler.compile(layout.VAE_DECODER, None if static is None else {
            "latent_sample": [static.batch, self.latent_channels, *latent_size]}), compile_now)
        self.vae_encoder = None
        if model.has(layout.VAE_ENCODER):
            self.vae_encoder = OnUse(lambda: compiler.compile(layout.VAE_ENCODER, None if static is None else {
                "sample": [1, 3, static.height, static.width]}), compile_now)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device=None) -> None:
        """diffusers' low-memory switch, with its meaning on OpenVINO: only the component in use stays compiled
        (the text encoders while encoding, the transformer while sampling, the VAE while decoding), so the
        peak is the biggest component rather than all of them. Each generation compiles its components again
        (the model cache makes that fast). ``gpu_id`` and ``device`` are accepted for diffusers' callers; the
        device plan given at load still decides where each component runs."""
        self._check_alone("enable_model_cpu_offload()")
        self.offload = True
        self._release(self.text, self.transformer, self.vae_decoder, self.vae_encoder, *self.controlnets)
        self.transformer.shape_specialised = 1 if self.static is None else 0  # compiled per generation now

    def _release(self, *components) -> None:
        """With model offload, drop these components' compiled models and return their memory."""
        if not self.offload:
            return
        for component in components:
            if component is not None:
                component.release()
        release_freed()

    def _use_adapters(self, adapters, adapter_weights=None, argument: str = "adapters") -> bool:
        """LoRA adapters on the transformer, applied whenever its IR is compiled (see set_adapters): merged
        into its weights, or as side branches whose weights are inputs (``lora_mode``). Every file, and its
        fit to the IR, is checked here, before the adapters replace the current ones, and not at a later
        (offloaded) compile. Returns whether the IR changed (not when only branch weights did)."""
        from ovsd3.runtime.adapters import next_edit, parse_adapters

        chosen = parse_adapters(adapters, adapter_weights, argument)
        edit, changed = next_edit(self._adapter_edit, chosen, self.block_count, self.lora_mode,
                                  lambda: self._compiler.read(layout.TRANSFORMER))
        if changed:
            self._compiler.edit(layout.TRANSFORMER, edit)
        self._compiler.fixed_inputs.clear()
        self._compiler.fixed_inputs.update({} if edit is None else edit.scale_inputs())
        self._adapter_edit = edit
        self.adapters, self.ignored_text_tensors = chosen, 0 if edit is None else edit.ignored_text_tensors
        return changed

    @property
    def lora_mode_used(self) -> str | None:
        """How the current adapters are applied: ``merge``, ``branch``, or None without adapters."""
        return None if self._adapter_edit is None else self._adapter_edit.mode

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' ``set_adapters``: replace the LoRA adapters. ``adapter_names``: a path or a list of them
        (``"path:weight"`` and ``(path, weight)`` too; ``[]`` for none); ``adapter_weights``: one number, or one
        per adapter (default 1). Merged adapters recompile the transformer from the IR read at the first
        adapter, not read from the folder again; branch adapters (``lora_mode``) given new weights only change
        the transformer's scale inputs, without a compile. Not on a pipeline with clones: they share its
        compiled transformer."""
        self._check_alone("set_adapters()")
        if self._use_adapters(adapter_names, adapter_weights, "adapter_names"):
            self.transformer = self._new_transformer()

    def _new_transformer(self) -> Transformer:
        # Offloading compiles the transformer when sampling starts, for that generation's shapes; a pipeline
        # compiled for several calls at once (serving) compiles it per call shape too, keeping a few: with
        # dynamic shapes every CPU stream would build gigabytes of its own (ShapeSpecialised).
        kept = 0 if self.static is not None else 1 if self.offload else \
            SHAPES_KEPT if self._compiler.options.concurrency > 1 else 0
        return Transformer(self._compiler, self._patch_size, self.has_t5, self._transformer_shapes,
                           compile_now=not self.offload, shape_specialised=kept,
                           requests=self._requests)

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "AUTO", static: StaticShape | None = None,
             cache_dir: Path | None | str = "default", precision: str | None = None,
             adapters=None, offload: bool = False, concurrency: int = 1,
             lora_mode: str | None = None) -> "SD3Pipeline":
        """``device``: an OpenVINO device for everything, or a plan such as ``transformer=GPU,text=CPU``.
        ``cache_dir``: OpenVINO's model cache (``None`` for none); a second start then skips compiling.
        ``precision``: ``"f32"`` to force full-precision execution. ``adapters``: LoRA adapters for the
        transformer, ``[(path, weight), ...]`` (files or PEFT folders; see :mod:`ovsd3.runtime.adapters`).
        ``lora_mode``: ``"merge"`` (into the weights: exact, FP16/FP32 folders only), ``"branch"`` (side
        branches, any weights; new adapter weights without a compile), or None: merge on a float folder,
        branch on a quantized one.
        ``offload``: start with :meth:`enable_model_cpu_offload` on, compiling nothing until it is used.
        ``concurrency``: how many pipelines (this one and its clones, see :meth:`clone`) will generate at
        once; the models are compiled for that many parallel calls (see CompileOptions)."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise InvalidRequest(f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY} "
                                 f"(got {concurrency!r})")
        folder = Path(folder)
        options = CompileOptions(plan=DevicePlan.parse(device),
                                 cache_dir=default_cache_dir() if cache_dir == "default" else
                                 (Path(cache_dir) if cache_dir is not None else None),
                                 precision=precision, concurrency=concurrency)
        return cls(folder, ModelCompiler(folder, options), static, adapters, offload, lora_mode)

    from_pretrained = load  # diffusers' name: the folder (or a converted hub id's local copy) to load

    # diffusers' read-only views of the current call
    guidance_scale = property(lambda self: self._guidance_scale)
    do_classifier_free_guidance = property(lambda self: (self._guidance_scale or 0.0) > 1.0)
    clip_skip = property(lambda self: self._clip_skip)
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)

    # -- requests ---------------------------------------------------------------------------------------

    def prepare(self, prompt: str | list[str] | None = None, **settings) -> Job:
        """Validate a request (the keywords of :class:`~ovsd3.runtime.request.Request`), encode its prompts
        and draw its starting latents."""
        return self.prepare_request(Request.of(prompt, **settings))

    def prepare_request(self, request: Request) -> Job:
        request = replace(request)  # checked again: a caller may have changed its fields since it was built
        cache = CacheConfig.parse(request.cache)
        request = self._with_folder_skip_layers(request)
        steps = self._default_steps(request) if request.num_inference_steps is None \
            else int(request.num_inference_steps)
        guidance = self.defaults.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
        default_width, default_height = (self.static.width, self.static.height) if self.static else \
            (self.default_size, self.default_size)
        width = default_width if request.width is None else int(request.width)  # 0 is refused, not defaulted
        height = default_height if request.height is None else int(request.height)
        batch = request.batch_size * request.num_images_per_prompt
        self._check_request(request, steps, guidance, width, height, batch)
        crop = None
        if request.padding_mask_crop is not None:  # what is redrawn is the box around the mask, at this size
            crop = MaskCrop.of(request.image, request.mask_image, width, height, request.padding_mask_crop)
            request = replace(request, image=crop.image(width, height), mask_image=crop.mask_image(width, height))
        seed, noise = self._noise_of(request, batch)
        embeds = self._embeddings(request, guided=guidance > 1.0)
        self._release(self.text)
        sigmas = self._sigmas(steps, request)
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if request.latents is not None and tuple(request.latents.shape) != shape:
            raise InvalidRequest(f"latents have shape {tuple(request.latents.shape)}, this request needs {shape}")
        start, blend = self._start_latents(shape, request, noise, width, height, float(sigmas[0]))
        self._release(self.vae_encoder)
        prompts = request.prompts()[0] if request.prompt_embeds is None else [""] * request.batch_size
        negatives = request.negative_prompts()
        params = dict(prompt=prompts[0], negative_prompt=negatives[0][0] if guidance > 1.0 and negatives else "",
                      num_inference_steps=steps, guidance_scale=guidance, width=width, height=height, seed=seed,
                      sampler="flash" if self.schedule.stochastic_sampling else "euler",
                      strength=request.strength if request.image is not None else None, model=self.folder.name,
                      cache=str(cache), noise=getattr(noise, "name", "custom"), ovsd3=__version__)
        if crop is not None:
            params["padding_mask_crop"] = request.padding_mask_crop
        step_noise = global_torch_noise() if request.generator is not None and self.schedule.stochastic_sampling \
            else None
        control = self._control_of(request, batch, guidance > 1.0, width, height, (seed, noise, step_noise))
        return Job(params=params, prompts=prompts, embeds=embeds, guidance_scale=guidance, sigmas=sigmas,
                   latents=start, noise=noise, stochastic=self.schedule.stochastic_sampling, cache=cache,
                   step_noise=step_noise, blend=blend, crop=crop,
                   skip_layer_guidance=SkipLayerGuidance.of(request) if guidance > 1.0 else None, control=control)

    def _control_of(self, request: Request, batch: int, guided: bool, width: int, height: int,
                    noises: tuple) -> ControlJob | None:
        """The request's ControlNet job (ovsd3.runtime.controlnet), its control images encoded; None without."""
        settings = ControlSettings.of(request)
        if settings is None:
            return None
        source = control_noise(request, *noises)
        control = prepare_control(self, settings, batch, guided, width, height, source)
        if source is not noises[2] and hasattr(source, "sync") and request.generator is not None:
            source.sync()  # diffusers drew them from torch's global generator: it moves on as there
        self._release(self.vae_encoder)
        return control

    def _check_request(self, request: Request, steps: int, guidance: float, width: int, height: int,
                       batch: int) -> None:
        if not 1 <= steps <= MAX_STEPS:  # the folder's default too: a damaged record must not allocate for days
            raise InvalidRequest(f"num_inference_steps must be between 1 and {MAX_STEPS} (got {steps}"
                                 f"{'' if request.num_inference_steps is not None else ', the folder default'})")
        if width <= 0 or height <= 0 or width % self.size_multiple or height % self.size_multiple:
            raise InvalidRequest(f"width and height must be positive multiples of {self.size_multiple} "
                                 f"(got {width}x{height})")
        if self.max_size and max(width, height) > self.max_size:
            raise InvalidRequest(f"this model draws at most {self.max_size}x{self.max_size} (got {width}x{height})")
        if not 0 <= guidance <= MAX_GUIDANCE:  # also nan: it would run unguided and record "nan"
            raise InvalidRequest(f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {guidance})")
        if request.image is not None and not 0.0 <= request.strength <= 1.0:
            raise InvalidRequest(f"strength must be between 0 and 1 (got {request.strength})")
        if request.skip_guidance_layers:
            self._check_skip_layers(request)
        if request.image is not None and self.vae_encoder is None:
            raise InvalidRequest(f"{self.folder} has no vae_encoder, which image-to-image needs")
        if self.static is not None and (width, height, batch, guidance > 1.0, request.max_sequence_length) != (
                self.static.width, self.static.height, self.static.batch, self.static.guidance,
                self.static.max_sequence_length):
            raise InvalidRequest(f"this pipeline was compiled for static {self.static.width}x{self.static.height}, "
                                 f"{self.static.batch} image(s), guidance {'on' if self.static.guidance else 'off'}; "
                                 f"the request differs")
        if self.static is not None and request.batch_size != (self.static.prompts or self.static.batch):
            raise InvalidRequest(f"this pipeline was compiled for static shapes with "
                                 f"{self.static.prompts or self.static.batch} prompt(s) (got {request.batch_size})")

    def _default_steps(self, request: Request) -> int:
        """The folder's steps; with an image, diffusers' StableDiffusion3Img2ImgPipeline and InpaintPipeline
        default of 50 where the folder has the text-to-image default of 28 (a Flash folder keeps its 4). The
        command line, openvino.genai's generate and the server pass the folder's steps themselves."""
        steps = self.defaults.num_inference_steps
        if request.image is not None and steps == layout.GenerationDefaults().num_inference_steps:
            return IMAGE_TO_IMAGE_STEPS
        return steps

    def _with_folder_skip_layers(self, request: Request) -> Request:
        """The folder's skip-layer guidance (SD3.5 Medium's card recommends it) where the request names none;
        ``skip_guidance_layers=[]`` turns it off. It is left out with static shapes (their transformer has no
        skipping variant); a step cache keeps it (the skip-layer pass is part of each step it runs or skips)."""
        layers = self.defaults.skip_guidance_layers
        if request.skip_guidance_layers is not None or not layers or self.static is not None:
            return request
        return replace(request, skip_guidance_layers=list(layers))

    def _check_skip_layers(self, request: Request) -> None:
        outside = [layer for layer in request.skip_guidance_layers if layer >= self.block_count]
        if outside:
            raise InvalidRequest(f"skip_guidance_layers {outside} are outside the transformer's blocks "
                                 f"0-{self.block_count - 1}")

    def _noise_of(self, request: Request, batch: int):
        """(the seed to record, the noise source): a torch generator's stream, a given source, or ``seed``'s."""
        if request.generator is not None:
            if isinstance(request.generator, list) and request.image is not None:
                raise InvalidRequest("a list of generators is for text-to-image; pass one generator with an image")
            return generator_noise(request.generator, batch)
        seed = int(np.random.SeedSequence().entropy % 2**32) if request.seed is None else int(request.seed)
        if callable(request.noise):
            return seed, checked_noise(request.noise)
        return seed, noise_source(request.noise or DEFAULT_NOISE, seed)

    def _sigmas(self, steps: int, request: Request) -> np.ndarray:
        sigmas = self.schedule.sigmas(steps)
        if request.image is None:
            return sigmas
        first = img2img_start(steps, request.strength)
        if first >= steps:
            raise InvalidRequest(f"strength {request.strength} with {steps} steps leaves no step to run")
        return sigmas[first:]

    def _embeddings(self, request: Request, guided: bool) -> PromptEmbeddings:
        """The request's embeddings, each prompt's ``num_images_per_prompt`` times; when guiding [negative,
        positive], as diffusers batches them."""
        text_before = self.text.infer_seconds
        repeat = request.num_images_per_prompt
        prompts = request.prompts()
        if prompts is None:
            embeds = self._given(request.prompt_embeds, request.pooled_prompt_embeds, "prompt_embeds")
        else:
            embeds = self._encode(prompts, request.clip_skip, request.max_sequence_length)
        embeds = embeds.repeat(repeat)
        if guided:
            negatives = request.negative_prompts()
            if negatives is None:
                negative = self._given(request.negative_prompt_embeds, request.negative_pooled_prompt_embeds,
                                       "negative_prompt_embeds")
            else:  # diffusers encodes negatives without clip skip
                negative = self._encode(negatives, None, request.max_sequence_length)
            if negative.prompt_embeds.shape[1:] != embeds.prompt_embeds.shape[1:]:
                raise InvalidRequest(f"negative embeddings {negative.prompt_embeds.shape[1:]} and prompt embeddings "
                                     f"{embeds.prompt_embeds.shape[1:]} differ in length or width")
            embeds = PromptEmbeddings.concat(negative.repeat(repeat), embeds)
        self.infer_seconds["text"] += self.text.infer_seconds - text_before
        return embeds

    def _encode(self, prompts: tuple[list[str], list[str], list[str]], clip_skip: int | None,
                max_sequence_length: int) -> PromptEmbeddings:
        return self.text.encode(prompts[0], prompts_2=prompts[1], prompts_3=prompts[2], clip_skip=clip_skip,
                                max_sequence_length=max_sequence_length)

    def _given(self, prompt_embeds: np.ndarray, pooled_embeds: np.ndarray, name: str) -> PromptEmbeddings:
        """Embeddings passed in, checked against the transformer's widths."""
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.joint_attention_dim:
            raise InvalidRequest(f"`{name}` must be (batch, tokens, {self.joint_attention_dim}), "
                                 f"got {prompt_embeds.shape}")
        if pooled_embeds.ndim != 2 or pooled_embeds.shape != (prompt_embeds.shape[0], self.pooled_projection_dim):
            raise InvalidRequest(f"the pooled embeddings for `{name}` must be (batch, {self.pooled_projection_dim}) "
                                 f"with the batch of `{name}` {prompt_embeds.shape}, got {pooled_embeds.shape}")
        return PromptEmbeddings(prompt_embeds, pooled_embeds)

    def _start_latents(self, shape: tuple, request: Request, noise, width: int, height: int,
                       first_sigma: float) -> tuple[np.ndarray, MaskBlend | None]:
        """Text-to-image: the initial noise. Image-to-image: the image's latents noised to the first sigma run
        (diffusers' scale_noise); its posterior sample is drawn before the noise, in diffusers' order.
        Inpainting: the same, and what puts the kept region back after each step (given latents are the
        start and that noise, as in diffusers' inpainting)."""
        if request.image is None:
            return (noise(shape) if request.latents is None else request.latents), None
        clean = self._encode_image(image_io.load_image(request.image, width, height), noise)
        clean = np.repeat(clean, shape[0] // clean.shape[0], axis=0)
        start_noise = noise(shape) if request.latents is None else request.latents
        if request.mask_image is None:
            return add_noise(clean, start_noise, first_sigma), None
        mask = load_mask(request.mask_image, width, height, request.image)
        start = start_noise if request.latents is not None else add_noise(clean, start_noise, first_sigma)
        return start, MaskBlend.of(mask, self.vae_scale_factor, clean, start_noise)

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
        out = self._requests(compiled, inputs)[0]
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
        """The (guided) velocity at one step: computed, or forecast when the step cache skips the step. The
        skip-layer guidance pass is part of the step: computed with it, forecast with it (its term included)."""
        interval = job.cache.guidance_interval
        guided = job.guidance_scale > 1.0 and (interval is None or interval.guides(sigma))
        if job.guidance_scale > 1.0 and not guided:
            cache.stats.unguided_steps += 1
        inputs = self._transformer_inputs(job, job.latents, timestep, guided)
        skip = job.skip_layer_guidance
        skipping = skip is not None and skip.applies(index, len(job.sigmas) - 1)

        def combine(out: np.ndarray) -> np.ndarray:
            if guided:
                uncond, cond = np.split(out, 2)
                out = uncond + np.float32(job.guidance_scale) * (cond - uncond)
            else:
                cond = out
            if not skipping:
                return out
            skipped = self.transformer.skipping(skip.layers, _conditional_half(inputs, guided))
            return out + (cond - skipped) * np.float32(skip.scale)

        def probe():
            signal, finish = self.transformer.probe(inputs)
            if job.control is not None:  # the plain first block is the signal; a step that runs runs with control
                return signal, lambda: combine(self._controlled(job, inputs, index))
            return signal, lambda: combine(finish())

        batch_share = 0.5 if job.guidance_scale > 1.0 and not guided else 1.0
        return cache.velocity(index, lambda: combine(self._controlled(job, inputs, index)), probe, batch_share,
                              SKIP_LAYER_SHARE if skipping else 0.0)

    def _controlled(self, job: Job, inputs: dict, index: int) -> np.ndarray:
        """One transformer call, with the job's ControlNets' residuals where any counts at this step."""
        residuals = None if job.control is None else \
            job.control.residuals(inputs, index, len(job.sigmas) - 1, self.block_count)
        return self.run_transformer(inputs) if residuals is None else self.transformer.controlled(inputs, residuals)

    def steps(self, job: Job) -> Iterator[Step]:
        """Run the sampler, yielding after every step; ``job.latents`` holds the result at the end and
        ``job.cache_stats`` what the step cache skipped. Between steps a caller may replace ``job.latents``
        or ``job.embeds`` (diffusers' callback_on_step_end does)."""
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
                noise = (job.step_noise or job.noise)(job.latents.shape)
                job.latents = flash_step(job.latents, velocity, sigma, sigma_next, noise)
            else:
                job.latents = euler_step(job.latents, velocity, sigma, sigma_next)
            if job.blend is not None:  # inpainting: the kept region back, noised to where sampling now is
                job.latents = job.blend(job.latents, sigma_next)
            yield Step(index, total, sigma, float(timesteps[index]), job.latents, denoised)
        self._release(self.transformer, *(self.controlnets if job.control is not None else ()))

    def decode(self, latents: np.ndarray, output_type: str = "pil"):
        """Latents -> PIL images, or for ``output_type="np"`` a (batch, height, width, 3) array in [0, 1]."""
        pixels = self._infer("vae", self.vae_decoder,
                             {"latent_sample": latents / self.scaling_factor + self.shift_factor})
        self._release(self.vae_decoder)
        return image_io.to_numpy(pixels) if output_type == "np" else image_io.to_pil(pixels)

    def pictures(self, job: Job, output_type: str = "pil"):
        """A finished job's latents decoded (see decode); with padding_mask_crop, each picture pasted back onto
        the original image, whose size it then has."""
        if job.crop is None:
            return self.decode(job.latents, output_type)
        pasted = [job.crop.paste(image) for image in self.decode(job.latents)]
        if output_type == "pil":
            return pasted
        return np.stack([np.asarray(image, dtype=np.float32) / np.float32(255.0) for image in pasted])

    def __call__(self, prompt: str | list[str] | None = None, **settings):
        """Generate images with diffusers' keywords (see :mod:`ovsd3.runtime.request`); returns a
        :class:`GenerationResult` (its ``images`` as diffusers' output has them), or ``(images,)`` for
        ``return_dict=False``."""
        started = time.perf_counter()
        infer_before = sum(self.infer_seconds.values()) + self.transformer.seconds
        request = Request.of(prompt, **settings)
        job = self.prepare_request(request)
        self._sample(job, request)
        self._release(self.transformer)
        images = job.latents if request.output_type == "latent" else self.pictures(job, request.output_type)
        total = time.perf_counter() - started
        infer = sum(self.infer_seconds.values()) + self.transformer.seconds - infer_before
        per_prompt = len(images) // len(job.prompts)
        per_image = [dict(job.params, prompt=job.prompts[index // per_prompt], image_index=index)
                     for index in range(len(images))]
        result = GenerationResult(images=images, params=per_image,
                                  timings={"total_seconds": total, "infer_seconds": infer,
                                           "python_seconds": total - infer},
                                  cache_stats=job.cache_stats)
        return result if request.return_dict else (images,)

    def generate(self, prompt: str, image=None, mask_image=None, **properties):
        """openvino.genai's ``generate`` (Text2Image, Image2Image and, with ``mask_image``, Inpainting), with its
        property names and rules (:mod:`ovsd3.runtime.genai_call`): an ``openvino.Tensor`` of uint8 images."""
        from ovsd3.runtime.genai_call import generate

        return generate(self, prompt, image, mask_image, **properties)

    def _sample(self, job: Job, request: Request) -> None:
        """All steps, with the request's callbacks; a callback may set ``pipe._interrupt`` to stop early (the
        latents reached so far are decoded, as diffusers does)."""
        self._guidance_scale, self._clip_skip, self._interrupt = job.guidance_scale, request.clip_skip, False
        self._num_timesteps = len(job.sigmas) - 1
        for step in self.steps(job):
            if request.callback is not None:
                request.callback(step)
            if request.callback_on_step_end is not None:
                self._on_step_end(job, request, step)
            if self._interrupt:
                break
        for source in (job.noise, job.step_noise):  # torch generators move on by what was drawn, as in diffusers
            sync = getattr(source, "sync", None)
            if sync is not None:
                sync()

    def _on_step_end(self, job: Job, request: Request, step: Step) -> None:
        """diffusers' callback_on_step_end(pipe, step, timestep, tensors): what it returns replaces them."""
        tensors = {"latents": job.latents, "prompt_embeds": job.embeds.prompt_embeds,
                   "pooled_prompt_embeds": job.embeds.pooled_embeds}
        chosen = {name: tensors[name] for name in request.callback_on_step_end_tensor_inputs}
        outputs = request.callback_on_step_end(self, step.index, np.float32(step.timestep), chosen)
        if outputs is None:
            return
        if not isinstance(outputs, dict):
            raise InvalidRequest(f"callback_on_step_end must return a dict of tensors (or None), got "
                                 f"{type(outputs).__name__}")
        if "latents" in outputs:
            job.latents = _replacement(outputs["latents"], "latents", job.latents)
        if "prompt_embeds" in outputs or "pooled_prompt_embeds" in outputs:
            embeds = job.embeds
            job.embeds = PromptEmbeddings(
                _replacement(outputs.get("prompt_embeds", embeds.prompt_embeds), "prompt_embeds", embeds.prompt_embeds),
                _replacement(outputs.get("pooled_prompt_embeds", embeds.pooled_embeds), "pooled_prompt_embeds",
                             embeds.pooled_embeds))


def _conditional_half(inputs: dict, guided: bool) -> dict:
    """A step's transformer inputs for its conditional rows alone: the positive half of a guided batch
    ([negative, positive]), an unguided batch as it is."""
    if not guided:
        return inputs
    half = inputs["hidden_states"].shape[0] // 2
    return {name: value[half:] for name, value in inputs.items()}


def _replacement(value, name: str, current: np.ndarray) -> np.ndarray:
    """A tensor a callback_on_step_end returned, in the shape of the one it replaces and finite: refused in one
    line naming the callback's output, before the transformer sees it."""
    array = as_array(value, f"callback_on_step_end's {name}")
    if array.shape != current.shape:
        raise InvalidRequest(f"callback_on_step_end returned `{name}` of shape {array.shape}; it must keep "
                             f"{current.shape}")
    return array


def checked_noise(noise: Callable[[tuple], np.ndarray]) -> Callable[[tuple], np.ndarray]:
    """A caller's noise(shape) function, its every answer checked: the shape asked for and finite numbers."""
    def drawn(shape: tuple) -> np.ndarray:
        array = as_array(noise(shape), "noise(shape)'s result")
        if array.shape != tuple(shape):
            raise InvalidRequest(f"noise(shape) returned shape {array.shape} for {tuple(shape)}")
        return array

    drawn.name = getattr(noise, "name", "custom")
    if hasattr(noise, "sync"):  # a torch generator's stream, moved on after sampling
        drawn.sync = noise.sync
    return drawn
