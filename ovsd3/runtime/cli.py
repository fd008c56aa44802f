"""`ovsd3 run`: generate images from an OpenVINO SD3 folder (numpy runtime, no torch)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ovsd3.arguments import block_list, check_options, integer, number, path_fits
from ovsd3.errors import OvsdError
from ovsd3.progress import ProgressBar
from ovsd3.runtime.inpaint import MAX_PADDING_MASK_CROP
from ovsd3.runtime.request import MAX_GUIDANCE, MAX_IMAGES, MAX_STEPS

PREVIEW = "preview.png"
# Checked before anything opens; steps, guidance, seed, clip skip and the T5 length are checked by Request (below),
# sizes by the pipeline against the folder's own limits
RULES = {"model_dir": path_fits, "output": path_fits, "image": path_fits, "mask": path_fits, "cache_dir": path_fits,
         "lora": path_fits, "strength": number(0, 1),
         "padding_mask_crop": integer(0, MAX_PADDING_MASK_CROP), "skip_layer_scale": number(0, MAX_GUIDANCE),
         "skip_layer_start": number(0, 1), "skip_layer_stop": number(0, 1), "control_image": path_fits,
         "control_mask": path_fits,
         "controlnet_scale": number(0, 100), "control_start": number(0, 1), "control_end": number(0, 1)}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="generate images from an OpenVINO SD3 folder",
        description="Generate images with the numpy runtime (openvino, openvino-tokenizers, numpy, Pillow). "
                    "Steps and guidance default to the folder's (Flash folders: 4 steps, no guidance). "
                    "Example: ovsd3 run sd3-medium-ov --prompt 'a lighthouse on a rocky coast' --width 1024 "
                    "--height 576 --seed 42")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="folder from `ovsd3 convert` or optimum-intel")
    parser.add_argument("--prompt", required=True, action="append",
                        help="text prompt (repeat for several prompts in one batch)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the folder's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the folder's)")
    parser.add_argument("--width", type=int, default=None, help="multiple of 16 (default: the model's native size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--noise", choices=("torch", "numpy"), default="torch",
                        help="random stream for --seed: torch (default; the same seed draws diffusers' picture, "
                             "as torch.Generator().manual_seed(SEED) does) or numpy (ovsd3 0.1's default)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt, batched")
    parser.add_argument("--image", type=Path, default=None, help="start from this image (image-to-image)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="with --image: redraw only where this mask is white (inpainting, as diffusers' "
                             "StableDiffusion3InpaintPipeline); black is kept")
    parser.add_argument("--padding-mask-crop", type=int, default=None, metavar="N",
                        help="with --mask: redraw only a box around the mask, grown by N pixels (and to the output's "
                             "aspect ratio), at the output size, then paste it back onto --image (diffusers' "
                             "padding_mask_crop); the saved image has --image's size")
    parser.add_argument("--strength", type=float, default=0.6, help="how much of --image to redraw (0..1)")
    _add_control_options(parser)
    parser.add_argument("--clip-skip", type=int, default=None)
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a LoRA adapter for the transformer (PEFT folder, diffusers or kohya safetensors), "
                             "applied when the folder loads, with its weight (default 1); repeatable")
    parser.add_argument("--lora-mode", default=None, metavar="merge|branch",
                        help="how --lora is applied: merge (into the weights; exact; FP16/FP32 folders) or branch "
                             "(low-rank side branches beside the layers; any folder, INT8 and INT4 too); default: "
                             "merge on a float folder, branch on a quantized one")
    _add_guidance_options(parser)
    _add_compile_options(parser)
    parser.add_argument("--preview-every", type=int, default=0, metavar="N",
                        help="write OUTPUT/preview.png every N steps (a cheap linear preview)")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="folder for the PNGs (default outputs/)")
    parser.set_defaults(handler=run)


def _add_guidance_options(parser) -> None:
    """Skip-layer guidance and the text length: diffusers' keywords for the sampling call."""
    parser.add_argument("--skip-layers", type=block_list, default=None, metavar="7,8,9",
                        help="skip-layer guidance (diffusers' skip_guidance_layers): an extra conditional pass with these "
                             "blocks skipped on the early steps; default: the folder's (SD3.5 Medium: 7,8,9, as "
                             "its card recommends; none elsewhere), 'none' turns it off")
    parser.add_argument("--skip-layer-scale", type=float, default=2.8, help="skip_layer_guidance_scale (default 2.8)")
    parser.add_argument("--skip-layer-start", type=float, default=0.01,
                        help="skip_layer_guidance_start, a fraction of the steps (default 0.01)")
    parser.add_argument("--skip-layer-stop", type=float, default=0.2,
                        help="skip_layer_guidance_stop (default 0.2)")
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default 256)")


def _add_control_options(parser) -> None:
    """ControlNet: diffusers' control_image, controlnet_conditioning_scale, control_guidance_start/end."""
    parser.add_argument("--control-image", type=Path, action="append", default=None, metavar="FILE",
                        help="a control image for the folder's ControlNet (repeat: one per ControlNet, in order)")
    parser.add_argument("--control-mask", type=Path, default=None, metavar="FILE",
                        help="for an inpainting ControlNet (extra_conditioning_channels 1, as alimama-creative's "
                             "SD3-Controlnet-Inpainting): white is redrawn in its --control-image (diffusers' "
                             "control_mask; one mask for every such ControlNet of the folder)")
    parser.add_argument("--controlnet-scale", type=float, action="append", default=None, metavar="S",
                        help="controlnet_conditioning_scale (default 1; repeat for one per ControlNet)")
    parser.add_argument("--control-start", type=float, action="append", default=None, metavar="A",
                        help="control_guidance_start, a fraction of the steps (default 0; repeatable)")
    parser.add_argument("--control-end", type=float, action="append", default=None, metavar="B",
                        help="control_guidance_end (default 1; repeatable)")


def _control(args) -> dict:
    """The ControlNet keywords of a run (none without --control-image); one value each, or one per ControlNet."""
    keywords = {"control_image": args.control_image and [str(path) for path in args.control_image],
                "control_mask": args.control_mask and str(args.control_mask)}
    for option, keyword in (("controlnet_scale", "controlnet_conditioning_scale"),
                            ("control_start", "control_guidance_start"), ("control_end", "control_guidance_end")):
        values = getattr(args, option)
        if values is not None:
            keywords[keyword] = values[0] if len(values) == 1 else values
    return {name: value for name, value in keywords.items() if value is not None}


def _check_control(args, model) -> None:
    """Control images that exist, one per ControlNet of the folder: said before anything loads."""
    from ovsd3.layout import controlnet_components

    images = args.control_image or []
    for path in images:
        if not path.is_file():
            raise OvsdError(f"cannot read --control-image {path}: no such file")
    if args.control_mask is not None and not args.control_mask.is_file():
        raise OvsdError(f"cannot read --control-mask {args.control_mask}: no such file")
    count = len(controlnet_components(model.path))
    if images and not count:
        raise OvsdError(f"--control-image given, but {model.path} has no ControlNet (convert with --controlnet)")
    if images and len(images) != count:
        raise OvsdError(f"--control-image given {len(images)} time(s) for {count} ControlNet(s) in {model.path}: "
                        f"give one per ControlNet")
    takers = [component for component, config in zip(controlnet_components(model.path), model.controlnet_configs)
              if int(config.get("extra_conditioning_channels", 0)) == 1]  # inpainting ControlNets take the mask
    if images and takers and args.control_mask is None:
        raise OvsdError(f"--control-image given without --control-mask, but {takers[0]}/ of {model.path} is an "
                        f"inpainting ControlNet (it takes a mask)")
    if images and args.control_mask is not None and not takers:
        raise OvsdError(f"--control-mask given, but no ControlNet of {model.path} takes a mask (an inpainting "
                        f"ControlNet has extra_conditioning_channels 1)")


def _add_compile_options(parser) -> None:
    """Where and how the models run: device, shapes, offload, precision, the model cache and step caching."""
    parser.add_argument("--device", default="AUTO",
                        help="OpenVINO device (AUTO, CPU, GPU, NPU) or a plan like transformer=GPU,text=CPU,vae=GPU")
    parser.add_argument("--static", action="store_true",
                        help="fix batch, size and text length before compiling (NPU needs this)")
    parser.add_argument("--offload", action="store_true",
                        help="compile one component at a time (diffusers' enable_model_cpu_offload): the peak memory "
                             "is the biggest model's instead of all of them; on by itself for folders bigger than "
                             "40%% of this machine's memory (SD3.5 Large)")
    parser.add_argument("--precision", choices=("f32",), default=None,
                        help="force full-precision execution (default: the device's choice, bf16 on recent CPUs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="OpenVINO model cache (default ~/.cache/ovsd3/model_cache); makes a second start fast")
    parser.add_argument("--no-cache", action="store_true", help="do not use the model cache")
    parser.add_argument("--cache", default=None, metavar="MODE",
                        help="step caching, trading exactness for speed: off (default), taylorseer "
                             "(openvino.genai's TaylorSeer Lite), first-block-cache, guidance-interval, or "
                             "combined with + (e.g. taylorseer:interval=4+guidance-interval:low=0.1); the README "
                             "lists settings and what each costs on the demo model. Not the model cache: "
                             "see --cache-dir")


def _next_index(folder: Path) -> int:
    numbers = [int(path.name.split("-")[0]) for path in folder.glob("*.png") if path.name.split("-")[0].isdigit()]
    return max(numbers, default=-1) + 1


def save_new_png(image, folder: Path, params: dict, suffix: str) -> Path:
    """Write ``NNNNN{suffix}.png`` under the next free number, never replacing a file: the PNG is written whole
    under a private name and hard-linked into place (which fails, rather than overwrites, if another run took
    the name first), so concurrent runs into one folder keep every image and no half-written PNG appears."""
    import uuid

    from ovsd3.atomic import interrupt_recorded
    from ovsd3.runtime.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    private = folder / f".{os.getpid()}-{uuid.uuid4().hex}.png.tmp"  # the pid: see _clear_leftovers
    try:
        try:
            save_png(image, private, params)
        except OSError as error:  # a full disk: no file (the private one goes below), one line
            raise OvsdError(f"cannot write an image in {folder}: {error.strerror or error}") from None
        stop = interrupt_recorded()
        if stop is not None:  # a Ctrl-C that a library swallowed: no image appears after the user said stop
            raise stop
        index = _next_index(folder)
        while True:
            target = folder / f"{index:05d}{suffix}.png"
            try:
                os.link(private, target)
                return target
            except FileExistsError:
                index += 1
    finally:
        private.unlink(missing_ok=True)


def _write_preview(step, folder: Path) -> None:
    from ovsd3.runtime.preview import preview_images

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".preview-{os.getpid()}.png.tmp"  # private to this run, so runs into one folder never mix
    try:
        preview_images(step.denoised[:1])[0].save(tmp, format="PNG")
        tmp.replace(folder / PREVIEW)  # atomic, so a viewer never sees half a file
    except OSError as error:
        raise OvsdError(f"cannot write the preview in {folder}: {error.strerror or error}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _skip_layer_guidance(args) -> dict:
    return dict(skip_guidance_layers=args.skip_layers, skip_layer_guidance_scale=args.skip_layer_scale,
                skip_layer_guidance_start=args.skip_layer_start, skip_layer_guidance_stop=args.skip_layer_stop)


def _check_output(output: Path, model_dir: Path) -> None:
    """Refuse, before loading, an --output that cannot take PNGs or that would put them in the model folder."""
    from ovsd3.atomic import nearest_existing, overlap

    if output.is_symlink() and not output.exists():
        raise OvsdError(f"--output {output} is a symbolic link to nothing")
    if output.exists() and not output.is_dir():
        raise OvsdError(f"--output {output} exists and is not a folder")
    # PNGs replace nothing (each takes a free name), so --output may contain the model (`--output .`), but
    # images inside the model folder would be mistaken for part of it
    if model_dir.exists() and overlap(output, model_dir) in ("is", "lies inside"):
        raise OvsdError(f"--output {output} is inside the model folder {model_dir}: choose another folder")
    existing = nearest_existing(output)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OvsdError(f"--output {output}: {existing} is not a writable folder")


# Temporary files a run writes in --output, named with its pid: those of a killed run are cleared by the next.
LEFTOVERS = (r"\.(?P<pid>\d+)-[0-9a-f]+\.png\.tmp", r"\.preview-(?P<pid>\d+)\.png\.tmp")


def _clear_leftovers(output: Path) -> None:
    from ovsd3.atomic import clear_dead_leftovers

    for name in LEFTOVERS:
        clear_dead_leftovers(output, name)


def _lora_paths(specs: list[str]) -> list[Path]:
    """The files named by --lora PATH[:WEIGHT] values (both readings, where a path holds a colon)."""
    return [Path(path) for spec in specs for path in {str(spec), str(spec).rpartition(":")[0]} if path]


def _check_cache_dir(args) -> None:
    """The model cache is written to: not in or over an input, nor (when named) in or over --output."""
    from ovsd3.atomic import check_cache_apart
    from ovsd3.runtime.devices import default_cache_dir

    if args.no_cache:
        return
    inputs = (args.model_dir, args.image, args.mask, *(args.control_image or ()), args.control_mask,
              *_lora_paths(args.lora))
    check_cache_apart(args.cache_dir or default_cache_dir(), "--cache-dir", inputs=inputs,
                      outputs=(args.output,) if args.cache_dir else ())


def run(args) -> int:
    from ovsd3.atomic import cleaned_up_on_failure
    from ovsd3.layout import ModelFolder
    from ovsd3.runtime.cache import CacheConfig
    from ovsd3.runtime.adapters import parse_lora_mode
    from ovsd3.runtime.pipeline import SD3Pipeline, StaticShape, offload_advised
    from ovsd3.runtime.request import Request

    check_options(args, RULES)
    parse_lora_mode(args.lora_mode, "--lora-mode")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise OvsdError(f"--steps must be between 1 and {MAX_STEPS} (got {args.steps})")
    if not 1 <= len(args.prompt) * args.num_images <= MAX_IMAGES:
        raise OvsdError(f"--num-images must be at least 1, and prompts x images at most {MAX_IMAGES} "
                        f"(got {len(args.prompt)} x {args.num_images})")
    if args.preview_every < 0:
        raise OvsdError("--preview-every must not be negative")
    cache = CacheConfig.parse(args.cache)  # a bad spec is refused before anything loads
    Request(prompt=args.prompt, negative_prompt=args.negative_prompt, guidance_scale=args.guidance, seed=args.seed,
            clip_skip=args.clip_skip, max_sequence_length=args.max_sequence_length,
            **_skip_layer_guidance(args), **_control(args))  # the same, for its checks
    _check_output(args.output, args.model_dir)
    _check_cache_dir(args)
    _clear_leftovers(args.output)
    model = ModelFolder.open(args.model_dir)  # a damaged folder is said before anything reads it
    for name, path in (("image", args.image), ("mask", args.mask)):
        if path is not None and not path.is_file():
            raise OvsdError(f"cannot read {name} {path}: no such file")
    if args.mask is not None and args.image is None:
        raise OvsdError("--mask needs --image: the picture to inpaint")
    if args.padding_mask_crop is not None and args.mask is None:
        raise OvsdError("--padding-mask-crop needs --mask (and --image): it crops around the mask")
    _check_control(args, model)
    started = time.perf_counter()
    static = None
    if args.static:
        if not (args.width and args.height):
            raise OvsdError("--static needs --width and --height")
        defaults = model.record.defaults
        guidance = defaults.guidance_scale if args.guidance is None else args.guidance
        static = StaticShape(width=args.width, height=args.height, batch=len(args.prompt) * args.num_images,
                             prompts=len(args.prompt),
                             guidance=guidance > 1.0, max_sequence_length=args.max_sequence_length)
    offload = args.offload or offload_advised(args.model_dir)
    if offload and not args.offload:
        print(f"note: {args.model_dir} holds more than 40% of this machine's memory in weights: its models are "
              "compiled one at a time (--offload)", file=sys.stderr)
    pipe = SD3Pipeline.load(args.model_dir, device=args.device, static=static, precision=args.precision,
                            cache_dir=None if args.no_cache else (args.cache_dir or "default"), adapters=args.lora,
                            offload=offload, lora_mode=args.lora_mode)
    if pipe.lora_mode_used == "branch" and args.lora_mode is None:
        print("note: the transformer is quantized: --lora applied as side branches (--lora-mode branch)",
              file=sys.stderr)
    if pipe.ignored_text_tensors:
        print(f"note: {pipe.ignored_text_tensors} text-encoder LoRA tensor(s) left out (ovsd3 applies LoRA to the "
              "transformer)", file=sys.stderr)
    print(f"loaded {args.model_dir} on {args.device} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    with cleaned_up_on_failure(args.output, [args.output / PREVIEW] if args.preview_every else []):
        return _generate(pipe, args, cache)


def _generate(pipe, args, cache) -> int:
    progress = ProgressBar()
    unfinished_line = []  # the progress bar's, until its last step ends it

    def on_step(step):
        progress(step.index + 1, step.total)
        unfinished_line[:] = [step.index + 1 < step.total]
        if args.preview_every and (step.index + 1) % args.preview_every == 0:
            _write_preview(step, args.output)

    steps = pipe.defaults.num_inference_steps if args.steps is None else args.steps  # the folder's, images too
    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=steps,
                      guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
                      noise=args.noise, num_images_per_prompt=args.num_images, image=args.image,
                      strength=args.strength, mask_image=args.mask, padding_mask_crop=args.padding_mask_crop,
                      **_skip_layer_guidance(args),
                      clip_skip=args.clip_skip, max_sequence_length=args.max_sequence_length, cache=cache,
                      callback=on_step, **_control(args))
    except BaseException:
        if any(unfinished_line):
            print(file=sys.stderr)  # the error or the interrupt gets a line of its own
        raise
    for image, params in zip(result.images, result.params):
        path = save_new_png(image, args.output, params, f"-{params['seed']}")
        print(path)
    timings = result.timings
    if cache.active:
        stats = result.cache_stats
        print(f"cache {cache}: {stats.full_calls} of {stats.steps} steps ran the whole transformer "
              f"({stats.share:.0%} of the uncached transformer work), {stats.unguided_steps} without guidance"
              + (f", {stats.skip_layer_calls} of {stats.skip_layer_steps} skip-layer passes"
                 if stats.skip_layer_steps else ""), file=sys.stderr)
    print(f"{len(result.images)} image(s) in {timings['total_seconds']:.1f} s (seed {result.params[0]['seed']}; "
          f"{timings['python_seconds'] / timings['total_seconds']:.1%} outside OpenVINO inference)", file=sys.stderr)
    return 0
