"""`ovsd3 convert`: a whole SD3 pipeline to an OpenVINO folder in optimum-intel's layout."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ovsd3 import __version__, layout
from ovsd3.atomic import AtomicOutput
from ovsd3.convert import components
from ovsd3.convert import DEFAULT_MIN_PSNR
from ovsd3.convert.export import ComponentResult, ExportOptions
from ovsd3.memory import release_freed
from ovsd3.convert.source import ModelSource
from ovsd3.errors import OvsdError

WEIGHT_FORMATS = ("fp16", "fp32")


@dataclass
class ConvertRequest:
    model: str = layout.DEFAULT_MODEL_ID
    output: Path = Path("sd3-ov")
    flash_lora: str | None = None  # adapter folder or hub id; None: no LoRA
    with_t5: bool = True
    weight_format: str = "fp16"
    overwrite: bool = False
    min_psnr: float = DEFAULT_MIN_PSNR
    controlnets: tuple[str, ...] = ()  # SD3ControlNetModel folders or hub ids: controlnet/, controlnet_1/, ...


@dataclass
class ConvertReport:
    output: Path
    components: list[ComponentResult] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quiet_libraries() -> None:
    # Tracing and loading print pages of warnings and progress bars that say nothing to a user of this
    # command; ovsd3 prints its own progress.
    import os
    import warnings

    warnings.filterwarnings("ignore")
    # Read when the libraries first configure logging (at import), so set before importing them.
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        diffusers.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _conversion_steps(source: ModelSource, options: ExportOptions, lora_folder: Path | None,
                      with_t5: bool, controlnets: list[Path]) -> list[tuple[str, Callable[[Path], object]]]:
    """(label, function of the staging folder) for every component and tokenizer, in the order they are made."""
    from ovsd3.convert.controlnet import convert_controlnet

    steps: list[tuple[str, Callable[[Path], object]]] = [
        ("transformer" + (" (+ merged LoRA)" if lora_folder else ""),
         lambda out: components.convert_transformer(source, out, options, lora_folder)),
        *((f"{layout.controlnet_component(index)} (ControlNet {folder.name})",
           lambda out, index=index, folder=folder: convert_controlnet(source, folder, index, out, options))
          for index, folder in enumerate(controlnets)),
        ("text_encoder (CLIP-L)", lambda out: components.convert_text_encoder(source, layout.CLIP_L, out, options)),
        ("text_encoder_2 (CLIP-G)", lambda out: components.convert_text_encoder(source, layout.CLIP_G, out, options)),
    ]
    if with_t5:
        steps.append(("text_encoder_3 (T5)", lambda out: components.convert_t5(source, out, options)))
    steps += [
        ("vae_decoder", lambda out: components.convert_vae_decoder(source, out, options)),
        ("vae_encoder", lambda out: components.convert_vae_encoder(source, out, options)),
    ]
    tokenizers = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if with_t5 else [])
    for name in tokenizers:
        steps.append((name, lambda out, name=name: components.convert_tokenizer(source, name, out)))
    return steps


def _log_step(result, seconds: float, log: Callable[[str], None]) -> None:
    if isinstance(result, ComponentResult):
        log(f"      {result.size_bytes / 1e6:,.1f} MB, {result.seconds:.1f} s; "
            f"agreement with PyTorch: {result.agreement}"
            + ("" if result.precision == "f32" else " (checked at the device's default precision)"))
        return
    log(f"      checked against the original on {result.probes} probe prompts ({seconds:.1f} s)")
    for note in result.notes:
        log(f"      note: {note}")


def _defaults(source: ModelSource, lora_folder: Path | None) -> layout.GenerationDefaults:
    """Flash's settings with its LoRA, else what the model's card recommends."""
    if lora_folder is not None:
        return layout.FLASH_DEFAULTS
    return layout.model_card_defaults(source.name, layout.read_json(source.root / layout.TRANSFORMER / "config.json"))


def _controlnet_specs(controlnets) -> list[str]:
    """``--controlnet`` values: a list of folder paths or hub ids, at most MAX_CONTROLNETS."""
    specs = [controlnets] if isinstance(controlnets, (str, Path)) else list(controlnets or ())
    if not all(isinstance(spec, (str, Path)) and str(spec) for spec in specs):
        raise OvsdError("--controlnet takes a ControlNet folder or model hub id (controlnets=[...] a list of them)")
    if len(specs) > layout.MAX_CONTROLNETS:
        raise OvsdError(f"--controlnet: at most {layout.MAX_CONTROLNETS} ControlNets (got {len(specs)})")
    return [str(spec) for spec in specs]


def _resolve_controlnets(source: ModelSource, specs: list[str]) -> list[Path]:
    """Each ControlNet's folder (downloaded if a hub id), checked to fit the source's transformer."""
    from ovsd3.convert.controlnet import resolve_controlnet

    if not specs:
        return []
    transformer_config = layout.read_json(source.root / layout.TRANSFORMER / "config.json")
    return [resolve_controlnet(spec, transformer_config) for spec in specs]


def convert_model(request: ConvertRequest, log: Callable[[str], None] = print) -> ConvertReport:
    """Convert every component, check each against PyTorch, and publish the folder atomically."""
    if request.weight_format not in WEIGHT_FORMATS:
        raise OvsdError(f"--weight-format must be one of {', '.join(WEIGHT_FORMATS)}")
    _quiet_libraries()
    start = time.perf_counter()
    options = ExportOptions(weight_format=request.weight_format, min_psnr=request.min_psnr)
    controlnet_specs = _controlnet_specs(request.controlnets)
    output = AtomicOutput(request.output, command="convert", overwrite=request.overwrite,
                          inputs=(request.model, request.flash_lora, *controlnet_specs))
    output.check()  # before any download or load

    source = ModelSource.open(request.model, with_t5=request.with_t5)
    lora_folder = None
    if request.flash_lora:
        from ovsd3.convert.lora import resolve_adapter

        lora_folder = resolve_adapter(request.flash_lora)
    with_t5 = request.with_t5 and source.has_t5
    controlnets = _resolve_controlnets(source, controlnet_specs)
    if request.with_t5 and not source.has_t5:
        log(f"note: {request.model} has no T5 encoder; converting without it")

    steps = _conversion_steps(source, options, lora_folder, with_t5, controlnets)
    report = ConvertReport(output=output.target)
    with output as staging:
        for index, (label, step) in enumerate(steps, 1):
            log(f"[{index}/{len(steps)}] {label} ...")
            step_start = time.perf_counter()
            result = step(staging)
            release_freed()
            if isinstance(result, ComponentResult):
                report.components.append(result)
            _log_step(result, time.perf_counter() - step_start, log)
        components.write_scheduler(source, staging, flash=lora_folder is not None)
        components.write_model_index(source, staging, with_t5)
        layout.FolderRecord(
            source=request.model,
            weight_format=request.weight_format,
            has_t5=with_t5,
            flash_lora=request.flash_lora,
            defaults=_defaults(source, lora_folder),
            parity={result.name: result.as_dict() for result in report.components},
            ovsd3_version=__version__,
            demo=source.demo,
            controlnets={layout.controlnet_component(index): spec for index, spec in enumerate(controlnet_specs)}
            or None,
        ).save(staging)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    total = sum(result.size_bytes for result in report.components)
    log(f"wrote {report.output} ({total / 1e6:,.1f} MB) in {report.seconds:.1f} s; "
        f"peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB")
    return report
