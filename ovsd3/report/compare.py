"""`ovsd3 report`: two or more folders on the same prompts, seeds, steps and size; size, speed, quality.

    ovsd3 report sd3-ov sd3-int8 --prompts 5 --out report/
    ovsd3 report sd3-ov --cache off --cache taylorseer --out report/    (a step-caching mode is a column too)
    ovsd3 report sd3-ov sd3-int8 --genai --out report/     (openvino.genai on the first folder, cache off and on)
    ovsd3 report sd3-ov sd3-int8 --width 1024 --height 576 --out report/    (--size 512: 512x512)

A column is a folder with a step-caching mode; every folder runs with every ``--cache`` mode (default: off).
With ``--genai``, openvino.genai's Text2ImagePipeline draws the same prompts and seeds from the first folder,
with its TaylorSeer caching off and on (its default): two more columns, scored like the others.
The first column is the reference: compression, speed-up and image agreement are all against it.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from ovsd3 import __version__, layout
from ovsd3.atomic import AtomicOutput, scratch_folder
from ovsd3.demo.digits import DigitScorer, evaluation_prompts
from ovsd3.errors import OvsdError
from ovsd3.report import control as control_section
from ovsd3.report import figures, machine
from ovsd3.report.children import run_child
from ovsd3.report.settings import MAX_PROMPTS, check_count, check_settings, image_size
from ovsd3.report.quality import ClipScorer, image_agreement
from ovsd3.report.stats import Spread
from ovsd3.runtime.cache import CacheConfig
from ovsd3.runtime.request import MAX_SEED


@dataclass
class ReportRequest:
    folders: list[Path]
    out: Path
    prompts: int = 3
    prompt_file: Path | None = None  # default: the held-out prompts of ovsd3/calibration/
    seed: int = 0  # prompt i is drawn with seed + i
    steps: int | None = None  # default: the first folder's
    guidance_scale: float | None = None
    size: int | None = None  # square images, the shorthand for width = height = size (not with them)
    width: int | None = None  # default: the first folder's native size, as diffusers
    height: int | None = None
    device: str = "AUTO"
    clip: str | None = None  # CLIP model (hub id or folder) for CLIP scores
    max_sequence_length: int = 256  # T5 tokens (zeros without T5), as diffusers' default
    labels: list[str] = field(default_factory=list)
    caches: list[str] = field(default_factory=lambda: ["off"])  # step-caching modes: each folder runs each
    digits: bool | None = None  # score digits and colours (the demo model); None: when the first folder is the demo
    genai: bool = False  # also openvino.genai on the first folder, TaylorSeer caching off and on
    full_size: str | None = None  # a preset whose INT8 gain at full size is estimated (ovsd3.report.full_size)
    control: bool | None = None  # score the demo ControlNet (None: when digits are scored and folder 1 has one)
    control_cases: int = 20  # control images drawn through each column that has a ControlNet
    overwrite: bool = False


def folder_labels(folders: list[Path], labels: list[str]) -> list[str]:
    """The folders' names, made unique; or the user's labels, one per folder."""
    if labels:
        if len(labels) != len(folders):
            raise OvsdError(f"{len(labels)} labels for {len(folders)} folders")
        return list(labels)
    names = [folder.resolve().name for folder in folders]
    return [name if names.count(name) == 1 else f"{index + 1}:{name}" for index, name in enumerate(names)]


@dataclass(frozen=True)
class Column:
    folder: Path
    label: str
    cache: str  # a step-caching spec (ovsd3.runtime.cache), "off" for none; genai: "off" or "taylorseer"
    runner: str = "ovsd3"  # or "genai"


def report_columns(request: ReportRequest) -> list[Column]:
    """Each folder with each cache mode, in that order; labels say the mode when it is not off. Then genai's."""
    labels = folder_labels(request.folders, request.labels)
    caches = list(dict.fromkeys(str(CacheConfig.parse(spec)) for spec in request.caches)) or ["off"]
    columns = [Column(folder, label if cache == "off" else f"{label} {cache}", cache)
               for folder, label in zip(request.folders, labels) for cache in caches]
    if request.genai:
        columns += [Column(request.folders[0], f"genai {labels[0]}", "off", "genai"),
                    Column(request.folders[0], f"genai {labels[0]} taylorseer", "taylorseer", "genai")]
    if len(columns) < 2:
        raise OvsdError("a report compares two or more columns: folders (the first is the reference), or one "
                        "folder with two or more --cache modes")
    return columns


def component_sizes(folder: Path) -> dict[str, int]:
    return {component: layout.ir_bytes(folder, component)
            for component in (*layout.MODEL_COMPONENTS, *layout.controlnet_components(folder))
            if layout.model_xml(folder, component).exists()}


def _prompts(request: ReportRequest, digits: bool) -> list[str]:
    check_count("--prompts", request.prompts, MAX_PROMPTS)
    if request.prompt_file is None and digits:
        return evaluation_prompts(request.prompts)
    if request.prompt_file is None:
        from ovsd3.calibration import heldout_prompts

        prompts = heldout_prompts()
    else:
        from ovsd3.quantize.calibration import load_prompts

        prompts = load_prompts(str(request.prompt_file), request.prompts)
    if len(prompts) < request.prompts:
        raise OvsdError(f"{len(prompts)} prompts available, --prompts asks for {request.prompts}")
    return prompts[: request.prompts]


def _settings(request: ReportRequest) -> dict:
    first = request.folders[0]
    model = layout.ModelFolder.open(first)
    defaults = model.record.defaults
    width, height = image_size(request.size, request.width, request.height, model)
    return {"steps": defaults.num_inference_steps if request.steps is None else request.steps,
            "guidance_scale": defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            "width": width, "height": height, "max_sequence_length": request.max_sequence_length}


def _first_start(measured: dict) -> dict:
    return {"load_seconds": measured["load_seconds"], "first_image_seconds": measured["first_image_seconds"],
            "total_seconds": measured["load_seconds"] + measured["first_image_seconds"]}


def _first_starts(folder: Path, device: str, prompt: str, settings: dict) -> dict:
    """Without a model cache is measured by the generation child; here: a process filling an empty cache,
    then a new process starting from it."""
    with scratch_folder("ovsd3-report-cache") as cache_dir:  # a killed run's is cleared by the next
        task = {"name": "ovsd3_first_start", "folder": str(folder), "device": device, "cache_dir": str(cache_dir),
                "prompt": prompt, **settings}
        filling = _first_start(run_child(task))
        cached = _first_start(run_child(task))
    return {"cache_fill": filling, "cached": cached}


def measure_folder(column: Column, prompts: list[str], seeds: list[int], settings: dict, device: str,
                   image_dir: Path, first_starts: dict) -> dict:
    """``first_starts``: per folder, measured once however many cache modes it is reported with."""
    folder = column.folder
    task = {"folder": str(folder), "device": device, "prompts": prompts, "seeds": seeds, "image_dir": str(image_dir),
            **settings}
    if column.runner == "genai":
        generated = run_child({"name": "genai_generate", "taylorseer": column.cache != "off", **task})
    else:
        generated = run_child({"name": "ovsd3_generate", "cache": column.cache, **task})
    runs = generated["generations"]
    if column.runner == "ovsd3" and folder not in first_starts:
        first_starts[folder] = _first_starts(folder, device, prompts[0], settings)
    speed = {
        "total_seconds": Spread.of(run["total_seconds"] for run in runs).to_json(),
        "text_seconds": Spread.of(run["text_seconds"] for run in runs).to_json(),
        "step_seconds": Spread.of(step for run in runs for step in run["step_seconds"]).to_json(),
        "decode_seconds": Spread.of(run["decode_seconds"] for run in runs).to_json(),
        "first_start": {"no_cache": _first_start(generated),
                        **(first_starts[folder] if column.runner == "ovsd3" else {})},
        "peak_rss_bytes": generated["peak_rss_bytes"],
        "transformer_calls": _mean([run["cache"]["full_calls"] for run in runs]),
        "work": _mean([run["cache"]["work"] / run["cache"]["steps"] for run in runs]),
    }
    record = layout.ModelFolder.open(folder).record
    return {"label": column.label, "runner": column.runner, "cache": column.cache, "path": str(folder.resolve()),
            "weight_format": record.weight_format,
            "quantized": record.quantization is not None, "cpu_target": record.cpu_target,
            "speed": speed, "images": generated["images"],
            "machine": {key: generated[key] for key in ("openvino", "execution_devices", "device_names")}}


def _relative(folders: list[dict], reference: dict, clip_scores: list[list[float]] | None,
              digit_scores: list[dict] | None) -> None:
    """Fill in what each folder is against the first: compression, speed-up, image agreement."""
    for index, folder in enumerate(folders):
        folder["size"]["compression"] = reference["size"]["total_bytes"] / folder["size"]["total_bytes"]
        folder["size"]["component_compression"] = {
            name: reference["size"]["components"][name] / size
            for name, size in folder["size"]["components"].items() if name in reference["size"]["components"]}
        folder["speed"]["speedup"] = {
            part: reference["speed"][f"{part}_seconds"]["median"] / folder["speed"][f"{part}_seconds"]["median"]
            for part in ("total", "text", "step", "decode")}
        quality = {"reference": index == 0, "psnr_db": None, "ssim": None, "mean_psnr_db": None, "mean_ssim": None}
        if index:
            agreement = image_agreement(reference["images"], folder["images"])
            quality.update(agreement, mean_psnr_db=_mean(agreement["psnr_db"]), mean_ssim=_mean(agreement["ssim"]))
        quality["clip_score"] = None if clip_scores is None else clip_scores[index]
        quality["mean_clip_score"] = None if clip_scores is None else _mean(clip_scores[index])
        quality["digits"] = None if digit_scores is None else digit_scores[index]
        folder["quality"] = quality


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def make_report(request: ReportRequest, log: Callable[[str], None] = print) -> dict:
    models = [layout.ModelFolder.open(folder) for folder in request.folders]
    columns = report_columns(request)
    digits = request.digits if request.digits is not None else models[0].record.demo == "digits"
    scorer_of_digits = DigitScorer() if digits else None
    prompts = _prompts(request, digits)
    if not 0 <= request.seed <= MAX_SEED - len(prompts):
        raise OvsdError(f"--seed must be between 0 and 2**64 - 1 - prompts (got {request.seed})")
    seeds = [request.seed + index for index in range(len(prompts))]
    settings = _settings(request)
    check_settings(settings)
    scorer = ClipScorer(request.clip) if request.clip else None  # fail before the slow part, not after
    control = control_section.wanted(request.control, digits, request.folders)
    if control:
        check_count("--control-cases", request.control_cases, MAX_PROMPTS)
    estimate_request = _estimate_request(request)
    output = AtomicOutput(request.out, command="report", overwrite=request.overwrite,
                          inputs=(*request.folders, request.prompt_file, request.clip))
    output.check()
    with output as staging:
        folders = _measure_columns(columns, prompts, seeds, settings, request.device, staging, log)
        _score(folders, prompts, scorer, scorer_of_digits)
        control_scores = control_section.measure(columns, request.control_cases, request.seed, settings,
                                                 request.device, staging, log) if control else None
        for folder in folders:  # paths inside the report folder, relative, so the folder can be moved
            folder["images"] = [str(Path(path).relative_to(staging)) for path in folder["images"]]
        report = {
            "ovsd3_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(request.device, folders[0]["machine"]),
            "settings": {"prompts": prompts, "seeds": seeds, **settings, "clip_model": request.clip,
                         "digits": digits},
            "folders": folders,
            "files": {"markdown": "report.md", "grid": "grid.png", "chart": "chart.png"},
        }
        if control_scores is not None:
            control_section.relative_paths(control_scores, staging)
            report["control"] = control_scores
        if estimate_request is not None:
            report["full_size"] = _full_size_estimate(estimate_request, log)
        for folder in folders:
            folder.pop("machine")
        _draw_figures(report, staging)
        text = markdown(report)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(text)
    log(text)
    log(f"wrote {request.out}")
    return report


def _score(folders: list[dict], prompts: list[str], clip: ClipScorer | None, digits: DigitScorer | None) -> None:
    """Each folder's CLIP scores and digit scores (where asked for), and what it is against the first."""
    clip_scores = [clip.scores(folder["images"], prompts) for folder in folders] if clip else None
    digit_scores = None if digits is None else [
        digits.score([Image.open(path) for path in folder["images"]], prompts).to_json() for folder in folders]
    _relative(folders, folders[0], clip_scores, digit_scores)


def _draw_figures(report: dict, staging: Path) -> None:
    """grid.png (a row per prompt, a column per folder), chart.png (step time and size), and with control
    images control.png; their layouts recorded in ``report``."""
    folders, settings = report["folders"], report["settings"]
    labels, prompts = [folder["label"] for folder in folders], settings["prompts"]
    grid = figures.image_grid([[str(staging / folder["images"][row]) for folder in folders]
                               for row in range(len(prompts))], prompts, labels, staging / "grid.png")
    report["grid"] = grid.to_json()
    figures.report_chart(labels, [folder["speed"]["step_seconds"] for folder in folders],
                         [{name: size / 1e6 for name, size in folder["size"]["components"].items()}
                          for folder in folders],
                         staging / "chart.png", f"{settings['width']}x{settings['height']}, "
                                                f"{report['machine']['processor']}")
    if "control" in report:
        report["files"]["control_grid"] = "control.png"
        report["control_grid"] = control_section.grid(report["control"], labels, staging,
                                                      staging / "control.png").to_json()


def _estimate_request(request: ReportRequest):
    """The full-size estimate's settings, checked (and its PyTorch need) before any slow work."""
    if request.full_size is None:
        return None
    from ovsd3.report.full_size import EstimateRequest

    estimate_request = EstimateRequest(preset=request.full_size)
    estimate_request.check()
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise OvsdError("--full-size builds full-width blocks in PyTorch: pip install 'ovsd3[convert]'") from None
    return estimate_request


def _full_size_estimate(estimate_request, log: Callable[[str], None]) -> dict:
    from ovsd3.report.full_size import estimate

    with scratch_folder("ovsd3-full-size") as scratch:
        return estimate(estimate_request, scratch, log)


def _measure_columns(columns: list[Column], prompts: list[str], seeds: list[int], settings: dict, device: str,
                     staging: Path, log: Callable[[str], None]) -> list[dict]:
    folders, first_starts = [], {}
    for column in columns:
        log(f"{column.label}: {len(prompts)} prompts, {settings['steps']} steps, guidance "
            f"{settings['guidance_scale']}, {settings['width']}x{settings['height']}, device {device}, "
            f"step caching {column.cache}")
        measured = measure_folder(column, prompts, seeds, settings, device, staging / "images" / f"{len(folders):02d}",
                                  first_starts)
        sizes = component_sizes(column.folder)
        measured["size"] = {"components": sizes, "total_bytes": sum(sizes.values())}
        folders.append(measured)
        log(f"  step {Spread.from_json(measured['speed']['step_seconds'])}, "
            f"peak RSS {measured['speed']['peak_rss_bytes'] / 2**30:.2f} GiB")
    return folders


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f}"


def cpu_target_line(folder: dict) -> str:
    """What `ovsd3 quantize --target-cpu` chose for a folder, and why (its record's cpu_target)."""
    target = folder["cpu_target"]
    where = "this CPU" if target["target"] == "this" else "--target-cpu"
    return (f"\n{folder['label']}: quantized for {target['isa']} ({where}): transformer {target['transformer']}, "
            f"VAE decoder {target['vae_decoder']}; why: {target.get('why', '-')}")


def markdown(report: dict) -> str:
    folders, settings, host = report["folders"], report["settings"], report["machine"]
    labels = [folder["label"] for folder in folders]
    header = "| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    lines = [f"# ovsd3 report: {' vs '.join(labels)}", "",
             f"{len(settings['prompts'])} prompts, seeds {settings['seeds'][0]}..{settings['seeds'][-1]}, "
             f"{settings['steps']} steps, guidance {settings['guidance_scale']}, "
             f"{settings['width']}x{settings['height']}. Reference: {labels[0]}.", "",
             f"Machine: {host['processor']} ({host['cpu_count']} CPUs), device {host['device']} -> "
             f"{', '.join(host['execution_devices'])}; OpenVINO {host['openvino']}; ovsd3 "
             f"{report['ovsd3_version']}.", "", "## Size (MB)", "", header.rstrip("\n")]
    components = list(dict.fromkeys(name for folder in folders for name in folder["size"]["components"]))
    for name in components:
        lines.append(f"| {name} | " + " | ".join(
            _mb(folder["size"]["components"][name]) if name in folder["size"]["components"] else "-"
            for folder in folders) + " |")
    lines.append("| **total** | " + " | ".join(f"**{_mb(folder['size']['total_bytes'])}**" for folder in folders)
                 + " |")
    lines.append("| compression | " + " | ".join(f"{folder['size']['compression']:.3f}x" for folder in folders)
                 + " |")
    lines += ["", "## Speed (seconds: median, min-max)", "", header.rstrip("\n")]
    for part, title in (("total", "generation"), ("text", "text encoding"), ("step", "transformer step"),
                        ("decode", "VAE decode")):
        lines.append(f"| {title} | " + " | ".join(
            f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
            for s in (folder["speed"][f"{part}_seconds"] for folder in folders)) + " |")
    lines.append("| transformer work: whole calls per image (share of an uncached run's) | " + " | ".join(
        f"{folder['speed']['transformer_calls']:.1f} ({folder['speed']['work']:.0%})" for folder in folders)
        + " |")
    lines.append("| speed-up (generation) | " + " | ".join(
        f"{folder['speed']['speedup']['total']:.2f}x" for folder in folders) + " |")
    lines.append("| speed-up (step) | " + " | ".join(
        f"{folder['speed']['speedup']['step']:.2f}x" for folder in folders) + " |")
    for key, title in (("no_cache", "first start, no model cache"), ("cache_fill", "first start, filling the cache"),
                       ("cached", "first start, from the cache")):
        lines.append(f"| {title}: load + first 1-step image | " + " | ".join(
            "{load_seconds:.2f} + {first_image_seconds:.2f}".format(**folder["speed"]["first_start"][key])
            if key in folder["speed"]["first_start"] else "-" for folder in folders) + " |")
    lines.append("| peak RSS (GiB) | " + " | ".join(
        f"{folder['speed']['peak_rss_bytes'] / 2**30:.2f}" for folder in folders) + " |")
    lines += [cpu_target_line(folder) for folder in folders if folder.get("cpu_target")]
    lines += ["", "## Quality against the reference", "", header.rstrip("\n")]
    lines.append("| mean PSNR (dB) | " + " | ".join(
        "reference" if folder["quality"]["reference"] else f"{folder['quality']['mean_psnr_db']:.2f}"
        for folder in folders) + " |")
    lines.append("| mean SSIM | " + " | ".join(
        "reference" if folder["quality"]["reference"] else f"{folder['quality']['mean_ssim']:.4f}"
        for folder in folders) + " |")
    if settings["digits"]:
        lines.append("| digits matching the prompt (digit and colour) | " + " | ".join(
            f"{folder['quality']['digits']['accuracy']:.1%}" for folder in folders) + " |")
    if settings["clip_model"]:
        lines.append(f"| CLIP score ({settings['clip_model']}) | " + " | ".join(
            f"{folder['quality']['mean_clip_score']:.2f}" for folder in folders) + " |")
    lines += ["", "![images](grid.png)", "", "![speed and size](chart.png)"]
    return "\n".join(lines + control_section.markdown(report) + _small_images_note(report) + _full_size_lines(report)
                     + [""])


# Below this many pixels a transformer block has so little arithmetic that INT8's quantize/dequantize
# overhead outweighs what its kernels save (the demo's 64x64: 16 image tokens).
SMALL_IMAGE_PIXELS = 256 * 256


def _small_images_note(report: dict) -> list[str]:
    settings = report["settings"]
    if settings["width"] * settings["height"] > SMALL_IMAGE_PIXELS or not any(
            folder["quantized"] for folder in report["folders"]):
        return []
    return ["", f"At {settings['width']}x{settings['height']} a transformer block has next to no arithmetic, so "
                "the quantized folder's speed here is its quantize/dequantize overhead, not what INT8 gains on "
                "full-size images" + (": see the full-size estimate below." if "full_size" in report else
                                      " (`ovsd3 report ... --full-size sd3-medium` estimates that on this CPU).")]


def _full_size_lines(report: dict) -> list[str]:
    if "full_size" not in report:
        return []
    from ovsd3.report.full_size import markdown as full_size_markdown

    return full_size_markdown(report["full_size"])
