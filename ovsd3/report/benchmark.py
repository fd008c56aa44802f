"""`ovsd3 benchmark`: images per second across batch sizes, and against openvino.genai and diffusers.

    ovsd3 benchmark sd3-ov --batch 1,2,4 --steps 4 --size 512 --peers --torch-model ./sd3-medium
    ovsd3 benchmark sd3-ov --batch 1,2 --width 1024 --height 576      (--size N: NxN)

Every runner (ovsd3, each peer) runs in its own child process, one after another, so only one pipeline is in
memory at a time and each one's peak memory is its own. Each also draws one picture of the prompt with seed 0
(torch's noise, which all of them can draw): its PSNR against ovsd3's (step caching off) shows what a runner's
shortcuts (genai's TaylorSeer, ovsd3's cache modes, bf16) cost.
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ovsd3 import __version__, layout
from ovsd3.atomic import AtomicOutput, scratch_folder
from ovsd3.errors import OvsdError
from ovsd3.metrics import psnr
from ovsd3.report import figures, machine
from ovsd3.report.children import run_child
from ovsd3.report.settings import MAX_REPEATS, check_batches, check_count, check_settings, image_size
from ovsd3.report.stats import Spread
from ovsd3.runtime.cache import CacheConfig

OVSD3 = "ovsd3"
PEERS = ("genai", "genai+taylorseer", "diffusers-fp32", "diffusers-bf16")
PEER_FAMILIES = ("genai", "diffusers")
PROMPT = "a lighthouse on a rocky coast during a storm, dramatic clouds"


@dataclass
class BenchmarkRequest:
    folder: Path
    out: Path
    batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    steps: int | None = None  # default: the folder's
    guidance_scale: float | None = None
    size: int | None = None  # square images, the shorthand for width = height = size (not with them)
    width: int | None = None  # default: the model's native size, as diffusers
    height: int | None = None
    repeats: int = 3
    device: str = "AUTO"
    peers: tuple[str, ...] = ()  # of PEER_FAMILIES
    max_sequence_length: int = 256  # T5 tokens (zeros without T5), as diffusers' default
    torch_model: str | None = None  # the PyTorch (diffusers) model the folder came from, for the diffusers peers
    caches: tuple[str, ...] = ("off",)  # ovsd3 runs once per step-caching mode
    overwrite: bool = False


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OvsdError(f"--batch takes batch sizes separated by commas, such as 1,2,4 (got {text!r})") from None
    if not batches or min(batches) < 1:
        raise OvsdError(f"batch sizes must be positive (got {text!r})")
    return sorted(set(batches))


def parse_peers(text: str) -> tuple[str, ...]:
    """``all``, or some of genai and diffusers, comma-separated."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return PEER_FAMILIES
    unknown = [name for name in names if name not in PEER_FAMILIES]
    if unknown or not names:
        raise OvsdError(f"--peers takes all, or {' and '.join(PEER_FAMILIES)} separated by commas (got {text!r})")
    return tuple(name for name in PEER_FAMILIES if name in names)


def _is_torch_folder(path: Path) -> bool:
    """A diffusers folder with PyTorch weights (an OpenVINO folder has a model_index.json too)."""
    return (path / layout.MODEL_INDEX).exists() and not layout.model_xml(path, layout.TRANSFORMER).exists()


def _torch_model(request: BenchmarkRequest, record: layout.FolderRecord, log) -> str | None:
    """The diffusers peers need the PyTorch model: --torch-model, else the folder's source when it is a local
    folder that still exists."""
    if request.torch_model:
        return request.torch_model
    if Path(record.source).is_dir() and _is_torch_folder(Path(record.source)):
        return record.source
    log(f"note: no PyTorch model for the diffusers peers (the folder's source {record.source!r} is not a local "
        f"folder here); pass --torch-model to time diffusers too")
    return None


def _tasks(request: BenchmarkRequest, record: layout.FolderRecord, settings: dict, log) -> dict[str, dict]:
    common = {"folder": str(request.folder.resolve()), "device": request.device, "prompt": PROMPT,
              "batches": request.batches, "repeats": request.repeats, **settings}
    tasks = {ovsd3_runner(spec): {"name": "ovsd3_batches", "cache": spec, **common} for spec in request.caches}
    if "genai" in request.peers:
        tasks["genai"] = {"name": "genai_batches", "taylorseer": False, **common}
        tasks["genai+taylorseer"] = {"name": "genai_batches", "taylorseer": True, **common}
    torch_model = _torch_model(request, record, log) if "diffusers" in request.peers else None
    if torch_model is not None:
        if request.device not in ("AUTO", "CPU"):
            log(f"note: diffusers runs on the CPU, ovsd3 on {request.device}")
        for dtype in ("fp32", "bf16"):
            tasks[f"diffusers-{dtype}"] = {"name": "diffusers_batches", "torch_model": torch_model, "dtype": dtype,
                                           "with_t5": record.has_t5, "flash_lora": record.flash_lora, **common}
    return tasks


def ovsd3_runner(cache: str) -> str:
    return OVSD3 if cache == "off" else f"{OVSD3} {cache}"


def _run(tasks: dict[str, dict], request: BenchmarkRequest, settings: dict, image_dir: Path,
         log) -> dict[str, dict]:
    """Each runner in its own child process, one after another; per batch size its spread and rates."""
    runners = {}
    for index, (runner, task) in enumerate(tasks.items()):
        log(f"{runner}: batches {','.join(map(str, request.batches))}, {settings['steps']} steps, guidance "
            f"{settings['guidance_scale']}, {settings['width']}x{settings['height']}, median of {request.repeats}")
        picture = f"{index:02d}-{runner.replace(' ', '_')}.png"
        result = run_child({**task, "image_path": str(image_dir / picture)})
        batches = {}
        for batch in request.batches:
            seconds = Spread.of(result["seconds"][str(batch)])
            batches[str(batch)] = {"seconds_per_call": seconds.to_json(),
                                   "seconds_per_image": seconds.median / batch,
                                   "images_per_second": batch / seconds.median}
            log(f"  batch {batch}: {seconds} per call, {batch / seconds.median:.3f} images/s")
        runners[runner] = {"batches": batches, "image": f"images/{picture}",
                           **{key: value for key, value in result.items() if key != "seconds"}}
    return runners


def _picture_psnr(runners: dict[str, dict], reference: str, image_dir: Path) -> None:
    """Each runner's seed-0 picture against the reference runner's (dB; None for the reference itself)."""
    from PIL import Image

    def pixels(runner: str):
        with Image.open(image_dir / Path(runners[runner]["image"]).name) as image:
            return np.asarray(image.convert("RGB"))

    expected = pixels(reference)
    for name, runner in runners.items():
        runner["image_psnr_db"] = None if name == reference else psnr(expected, pixels(name), data_range=255.0)


def run_benchmark(request: BenchmarkRequest, log: Callable[[str], None] = print) -> dict:
    model = layout.ModelFolder.open(request.folder)
    record = model.record
    width, height = image_size(request.size, request.width, request.height, model)
    check_count("--repeats", request.repeats, MAX_REPEATS)
    check_batches(request.batches)
    settings = {"steps": record.defaults.num_inference_steps if request.steps is None else request.steps,
                "guidance_scale": (record.defaults.guidance_scale if request.guidance_scale is None
                                   else request.guidance_scale),
                "width": width, "height": height,
                "max_sequence_length": request.max_sequence_length}
    check_settings(settings)
    request.caches = tuple(dict.fromkeys(str(CacheConfig.parse(spec)) for spec in request.caches)) or ("off",)
    output = AtomicOutput(request.out, command="benchmark", overwrite=request.overwrite,
                          inputs=(request.folder, request.torch_model))
    output.check()
    with scratch_folder("ovsd3-benchmark") as image_dir:  # a killed run's is cleared by the next
        runners = _run(_tasks(request, record, settings, log), request, settings, image_dir, log)
        reference = ovsd3_runner(request.caches[0])  # ratios are against ovsd3 with the first cache mode (off)
        _picture_psnr(runners, reference, image_dir)
        return _write(request, runners, reference, settings, output, image_dir, log)


def _write(request: BenchmarkRequest, runners: dict, reference: str, settings: dict, output: AtomicOutput,
           image_dir: Path, log) -> dict:
    host = machine.describe(request.device, runners[reference])
    for spec in request.caches:  # kept once, under "machine"
        for key in ("openvino", "execution_devices", "device_names"):
            runners[ovsd3_runner(spec)].pop(key)
    for runner in runners.values():  # time ratio: how many times longer than ovsd3 the same call takes
        for batch, figures_ in runner["batches"].items():
            ours = runners[reference]["batches"][batch]["seconds_per_call"]["median"]
            figures_["time_vs_ovsd3"] = figures_["seconds_per_call"]["median"] / ours
    report = {
        "ovsd3_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "folder": str(request.folder.resolve()),
        "machine": host,
        "settings": {"prompt": PROMPT, "batches": request.batches, "repeats": request.repeats,
                     "caches": list(request.caches), **settings},
        "runners": runners,
        "files": {"markdown": "benchmark.md", "chart": "benchmark.png", "images": "images"},
    }
    with output as staging:
        shutil.copytree(image_dir, staging / "images")
        figures.benchmark_chart({name: {int(batch): values["seconds_per_call"]["median"]
                                        for batch, values in runner["batches"].items()}
                                 for name, runner in runners.items()}, staging / "benchmark.png",
                                f"{request.folder.resolve().name}: {settings['steps']} steps, "
                                f"{settings['width']}x{settings['height']}, {report['machine']['processor']}")
        text = markdown(report)
        (staging / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "benchmark.md").write_text(text)
    log(text)
    log(f"wrote {request.out}")
    return report


def markdown(report: dict) -> str:
    settings, host, runners = report["settings"], report["machine"], report["runners"]
    batches = [str(batch) for batch in settings["batches"]]
    lines = [f"# ovsd3 benchmark: {Path(report['folder']).name}", "",
             f"{settings['steps']} steps, guidance {settings['guidance_scale']}, {settings['width']}x"
             f"{settings['height']}, {settings['max_sequence_length']} T5 tokens, median of {settings['repeats']} "
             f"calls per batch. Machine: "
             f"{host['processor']} ({host['cpu_count']} CPUs); device {host['device']} -> "
             f"{', '.join(host['execution_devices'])}; OpenVINO {host['openvino']}.", "",
             "| runner | " + " | ".join(f"batch {batch}: s/image" for batch in batches)
             + " | " + " | ".join(f"batch {batch}: images/s" for batch in batches)
             + " | time vs ovsd3 (per batch) | peak RSS (GiB) | seed-0 picture: PSNR vs ovsd3 (dB) |",
             "|---|" + "---|" * (2 * len(batches) + 3)]
    for name, runner in runners.items():
        ratios = ", ".join(f"{runner['batches'][batch]['time_vs_ovsd3']:.2f}" for batch in batches)
        agreement = "reference" if runner["image_psnr_db"] is None else f"{runner['image_psnr_db']:.1f}"
        lines.append(f"| {name} | " + " | ".join(f"{runner['batches'][batch]['seconds_per_image']:.3f}"
                                                  for batch in batches)
                     + " | " + " | ".join(f"{runner['batches'][batch]['images_per_second']:.3f}" for batch in batches)
                     + f" | {ratios} | {runner['peak_rss_bytes'] / 2**30:.2f} | {agreement} |")
    for name, runner in runners.items():
        if "transformer_calls" in runner and "taylorseer" in runner:
            caching = runner["taylorseer"]
            how = "off" if caching is None else ", ".join(f"{key} {value}" for key, value in caching.items())
            lines += ["", f"{name}: {runner['transformer_calls']} transformer calls for {settings['steps']} steps "
                          f"at the last batch (TaylorSeer step caching: {how})."]
        elif "transformer_calls" in runner:
            lines += ["", f"{name}: {runner['transformer_calls']} whole transformer calls for {settings['steps']} "
                          f"steps at the last batch ({runner['work']:.0%} of an uncached run's transformer "
                          f"work; step caching: {runner['cache']})."]
    lines += ["", "![images per second](benchmark.png)", ""]
    return "\n".join(lines)
