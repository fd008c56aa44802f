"""`ovsd3 quantize`: an INT8 transformer and VAE decoder, INT4-weight text encoders and VAE encoder, checked
before publishing."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ovsd3 import __version__, layout
from ovsd3.atomic import AtomicOutput, check_cache_apart
from ovsd3.errors import OvsdError
from ovsd3.memory import trimmed_mappings
from ovsd3.quantize import calibration
from ovsd3.quantize import target as cpu_target
from ovsd3.quantize.gate import DEFAULT_MIN_PSNR, DEFAULT_MIN_SSIM, GateSettings, run_gate
from ovsd3.quantize.transformer import TransformerQuantization, compress_transformer, quantize_transformer
from ovsd3.quantize.vae import VaeDecoderQuantization, quantize_vae_decoder
from ovsd3.quantize.weights import WeightCompression, compress

CALIB_SIZE = 512  # the published recipe calibrates SD3 Medium (native 1024) at 512
GATE_PROMPTS = 4
DIGITS_GATE_PROMPTS = 20  # one image in 20 is 5 points: enough to tell a broken quantization from INT8's ~5
WEIGHT_COMPRESSED = (layout.CLIP_L, layout.CLIP_G, layout.T5, layout.VAE_ENCODER)  # + the decoder in "weights" mode
# The decoder calibrates on one recorded latent per prompt; beyond this many, more add quantization time
# (a full-size decoder call per latent) rather than range (the demo: 8 latents 50.6 dB, 64 latents 51.9 dB).
MAX_DECODER_LATENTS = 64
MAX_CALIB = 1000  # five times the published recipe's 200; each sample is kept on disk (~11 MB at full size)
MAX_GATE_PROMPTS = 400
GATE_CONTROL_PROMPTS = 4  # a folder with ControlNets: the first prompts drawn again with control, both folders


@dataclass
class QuantizeRequest:
    source: Path
    output: Path
    calib: int = 200  # transformer-input samples
    calib_size: int | None = None  # default: the model's own size, at most 512 (the published recipe's)
    dataset: str = calibration.BUILTIN
    calib_cache: Path | None = None
    transformer: TransformerQuantization = field(default_factory=TransformerQuantization)
    weights: WeightCompression = field(default_factory=WeightCompression)
    vae_decoder: VaeDecoderQuantization | None = None  # None: what --target-cpu picks
    target_cpu: str = "this"  # the CPU the formats are chosen for: "this" or an ISA level (ovsd3.quantize.target)
    gate_prompts: int | None = None  # default: GATE_PROMPTS, or DIGITS_GATE_PROMPTS for the digits demo
    min_psnr: float = DEFAULT_MIN_PSNR
    min_ssim: float = DEFAULT_MIN_SSIM
    max_digit_drop: float = 0.15  # the digits demo only: see GateSettings
    overwrite: bool = False
    cpu_choice: dict | None = None  # filled in from target_cpu when the request is checked


@dataclass
class SizeRow:
    component: str
    before_bytes: int
    after_bytes: int
    format: str  # what the component got: "INT8", "int4_sym weights", ...

    @property
    def rate(self) -> float:
        return self.before_bytes / self.after_bytes if self.after_bytes else float("nan")


def size_table(rows: list[SizeRow]) -> str:
    lines = [f"{'component':16s}{'before MB':>12s}{'after MB':>12s}{'compression':>13s}  format"]
    for row in rows:
        lines.append(f"{row.component:16s}{row.before_bytes / 1e6:12,.1f}{row.after_bytes / 1e6:12,.1f}"
                     f"{row.rate:12.3f}x  {row.format}")
    before, after = sum(r.before_bytes for r in rows), sum(r.after_bytes for r in rows)
    lines.append(f"{'total':16s}{before / 1e6:12,.1f}{after / 1e6:12,.1f}{before / after:12.3f}x")
    return "\n".join(lines)


def _copy_everything_but_models(source: Path, staging: Path) -> None:
    def skip(folder, names):
        return [name for name in names if name.startswith(layout.MODEL_XML.rsplit(".", 1)[0])
                and Path(folder).name in models]

    models = (*layout.MODEL_COMPONENTS, *layout.controlnet_components(source))  # written by quantize

    shutil.copytree(source, staging, ignore=skip, dirs_exist_ok=True)


def _quiet_nncf() -> None:
    # NNCF logs tables and per-node lines at INFO; ovsd3 prints its own summary.
    import logging

    from nncf.common.logging import nncf_logger

    nncf_logger.setLevel(logging.ERROR)


def _gate_prompts(digits_demo: bool, count: int | None) -> list[str]:
    """Held-out prompts: the digits demo draws digit prompts (which its scorer can check); other models
    draw ovsd3/calibration/heldout_prompts.txt, disjoint from the calibration set. ``count`` None: the default."""
    if digits_demo:
        from ovsd3.demo.digits import evaluation_prompts

        return evaluation_prompts(count or DIGITS_GATE_PROMPTS)
    from ovsd3.calibration import heldout_prompts

    return heldout_prompts()[:count or GATE_PROMPTS]


def _quantize_transformer(core, source: Path, staging: Path, request: QuantizeRequest, cache_dir: Path,
                          log: Callable[[str], None]) -> SizeRow:
    import openvino as ov

    model = core.read_model(layout.model_xml(source, layout.TRANSFORMER))
    weight_bytes = layout.model_xml(source, layout.TRANSFORMER).with_suffix(".bin").stat().st_size
    options = request.transformer
    if options.weights is not None:
        quantized = compress_transformer(model, options.weights)
    else:
        quantized = quantize_transformer(model, calibration.RecordedSamples(cache_dir, request.calib), options,
                                         weight_bytes=weight_bytes, log=log)
    ov.save_model(quantized, layout.model_xml(staging, layout.TRANSFORMER))
    del model, quantized
    gc.collect()
    return SizeRow(layout.TRANSFORMER, layout.ir_bytes(source, layout.TRANSFORMER),
                   layout.ir_bytes(staging, layout.TRANSFORMER), options.label)


def _quantize_controlnets(core, source: Path, staging: Path, request: QuantizeRequest, cache_dir: Path | None,
                          log) -> list[SizeRow]:
    """The folder's ControlNets, as the transformer (ovsd3.quantize.controlnet)."""
    from ovsd3.quantize.controlnet import quantize_controlnets

    return [SizeRow(*row) for row in quantize_controlnets(core, layout.ModelFolder.open(source), staging,
                                                          request.transformer, cache_dir, request.calib, log)]


def _compress_weights(core, source: Path, staging: Path, components, options: WeightCompression) -> list[SizeRow]:
    import openvino as ov

    rows = []
    for component in components:
        if not layout.model_xml(source, component).exists():
            continue
        compressed = compress(core.read_model(layout.model_xml(source, component)), options)
        ov.save_model(compressed, layout.model_xml(staging, component))
        del compressed
        gc.collect()
        rows.append(SizeRow(component, layout.ir_bytes(source, component), layout.ir_bytes(staging, component),
                            f"{options.mode} weights"))
    return rows


def _quantize_decoder(core, source: Path, staging: Path, options: VaeDecoderQuantization,
                      latents: calibration.RecordedLatents, log: Callable[[str], None]) -> SizeRow:
    import openvino as ov

    log(f"      VAE decoder: INT8 (NNCF, calibrated on the final latents of {len(latents)} of the recorded "
        f"generations; nodes matching {', '.join(options.keep_float)} kept in float)")
    model = core.read_model(layout.model_xml(source, layout.VAE_DECODER))
    ov.save_model(quantize_vae_decoder(model, latents, options), layout.model_xml(staging, layout.VAE_DECODER))
    del model
    gc.collect()
    return SizeRow(layout.VAE_DECODER, layout.ir_bytes(source, layout.VAE_DECODER),
                   layout.ir_bytes(staging, layout.VAE_DECODER), "INT8")


def _decoder_summary(options: VaeDecoderQuantization, latents: int) -> dict:
    if options.mode == "weights":
        return {"mode": "weights"}  # with the summary's "weights" settings, as the encoders
    return {"mode": "int8", "keep_float": list(options.keep_float), "calibration_latents": latents}


def quantize_folder(request: QuantizeRequest, log: Callable[[str], None] = print) -> dict:
    _quiet_nncf()
    request, model = _checked(request)
    output = AtomicOutput(request.output, command="quantize", overwrite=request.overwrite,
                          inputs=(model.path, request.calib_cache, request.dataset),
                          writes=layout.output_files("quantize") + _copied_files(model.path))
    output.check()
    if request.calib_cache is not None:
        _check_calib_cache(request.calib_cache, request, model.path)
    request = _measured_choice(request, model, log)
    choice = request.cpu_choice
    log(f"target CPU: {choice['isa']} ({'this CPU' if choice['target'] == 'this' else '--target-cpu'}): "
        f"transformer {choice['transformer']}, VAE decoder {choice['vae_decoder']} ({choice['why']})")
    started = time.perf_counter()
    defaults = model.record.defaults
    plan = calibration.CalibrationPlan(samples=request.calib, size=request.calib_size,
                                       steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale)
    prompts, cache_dir = _calibrate(request, model.path, plan, model.record.demo == "digits", log)
    try:
        with output as staging:
            summary = _write_quantized(staging, model, request, plan, prompts, cache_dir, log)
    except OvsdError as error:  # say what stays: the recorded inputs, which the next run reuses
        kept = f" (the calibration inputs recorded in {cache_dir} stay for the next run)" if cache_dir else ""
        raise OvsdError(f"{error}{kept}") from None
    log(f"wrote {output.target} in {time.perf_counter() - started:.0f} s")
    return summary


def _write_quantized(staging: Path, model: layout.ModelFolder, request: QuantizeRequest, plan, prompts: list[str],
                     cache_dir: Path | None, log) -> dict:
    """The quantized folder in ``staging``, past its quality gate, with its record; returns the record's summary."""
    import openvino as ov

    record, defaults = model.record, model.record.defaults
    digits_demo = record.demo == "digits"
    decoder_latents = min(len(prompts), MAX_DECODER_LATENTS)  # one per prompt: its final latents
    _copy_everything_but_models(model.path, staging)
    with trimmed_mappings():  # NNCF reads every weight of the mapped IRs once: keep them out of RSS
        rows = _quantize_models(ov.Core(), model.path, staging, request,
                                calibration.RecordedLatents(cache_dir, decoder_latents), cache_dir, log)
    gate = GateSettings(prompts=tuple(_gate_prompts(digits_demo, request.gate_prompts)), size=request.calib_size,
                        steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale,
                        min_psnr=request.min_psnr, min_ssim=request.min_ssim,
                        max_digit_drop=request.max_digit_drop if digits_demo else None,
                        control_prompts=GATE_CONTROL_PROMPTS if model.controlnet_configs else 0)
    report = _gate(model.path, staging, gate, log)
    summary = {"calibration": {**asdict(plan), "dataset": request.dataset},
               "transformer": asdict(request.transformer), "weights": asdict(request.weights),
               "vae_decoder": _decoder_summary(request.vae_decoder, decoder_latents),
               **_controlnet_summary(model, request),
               "sizes": {row.component: {"before_bytes": row.before_bytes, "after_bytes": row.after_bytes,
                                         "format": row.format} for row in rows},
               "gate": report.as_dict()}
    record.quantization = summary
    record.cpu_target = request.cpu_choice
    record.ovsd3_version = __version__
    record.save(staging)
    return summary


def _controlnet_summary(model: layout.ModelFolder, request: QuantizeRequest) -> dict:
    from ovsd3.quantize.controlnet import summary

    controlnets = summary(model, request.transformer, request.calib)
    return {} if controlnets is None else {"controlnets": controlnets}


def _copied_files(source: Path) -> tuple[str, ...]:
    """What quantize copies from the source folder besides the models: part of what it writes."""
    from glob import escape

    return tuple(escape(path.relative_to(source).as_posix()) for path in sorted(source.rglob("*"))
                 if path.is_file())


def _check_calib_cache(cache_dir: Path, request: QuantizeRequest, source: Path) -> None:
    """The calibration cache is written to: apart from the model, the prompt file and OUT (either way round),
    and holding nothing but recorded inputs, checked before anything is recorded or created."""
    check_cache_apart(cache_dir, "--calib-cache", inputs=(source, request.dataset), outputs=(request.output,))
    stray = layout.unexpected_file(cache_dir, layout.output_files("calibration")) if cache_dir.is_dir() else None
    if stray is not None:
        raise OvsdError(f"--calib-cache {cache_dir} holds {stray}, which is not a recorded calibration input: name "
                        "an empty folder or an earlier calibration cache (nothing was written)")


def _checked(request: QuantizeRequest) -> tuple[QuantizeRequest, layout.ModelFolder]:
    """The request with its calibration size filled in, and the source folder; one-line errors before any work."""
    try:
        model = layout.ModelFolder.open(Path(request.source))
    except OvsdError as error:
        raise OvsdError(f"IN must be a folder from `ovsd3 convert` or optimum-intel: {error}") from None
    if not 1 <= request.calib <= MAX_CALIB:
        raise OvsdError(f"--calib must be between 1 and {MAX_CALIB} (got {request.calib})")
    blocks = model.block_count or None
    slices = request.transformer.slices
    if slices is not None and not 1 <= slices <= (blocks or slices):
        raise OvsdError(f"--slices must be between 1 and the transformer's {blocks} blocks (got {slices})")
    if request.calib_size is None:
        request = dataclasses.replace(request, calib_size=min(CALIB_SIZE, model.native_size))
    if request.calib_size <= 0 or request.calib_size % 16:
        raise OvsdError(f"--calib-size must be a positive multiple of 16 (got {request.calib_size})")
    if request.gate_prompts is not None and not 1 <= request.gate_prompts <= MAX_GATE_PROMPTS:
        raise OvsdError(f"--gate-prompts must be between 1 and {MAX_GATE_PROMPTS}: the quality gate always runs")
    if model.max_size and request.calib_size > model.max_size:
        raise OvsdError(f"--calib-size {request.calib_size} is more than this model draws ({model.max_size})")
    request.weights.check()
    # the options as the table would resolve them, checked now; `this` is measured after the output check
    provisional = _for_target_cpu(request, cpu_target.choose(request.target_cpu))
    provisional.vae_decoder.check()
    provisional.transformer.check()
    return (request if request.target_cpu == "this" else provisional), model


def _measured_choice(request: QuantizeRequest, model: layout.ModelFolder, log) -> QuantizeRequest:
    """For ``--target-cpu this``, the request with the formats this CPU measures fastest (ovsd3.quantize.probe;
    kept per CPU, so a second quantize of the same architecture does not measure again)."""
    if request.target_cpu != "this" or request.cpu_choice is not None:
        return request
    if request.transformer.weights is not None and request.vae_decoder is not None:
        return _for_target_cpu(request, cpu_target.choose("this"))  # both named: nothing left to choose
    from ovsd3.quantize import probe

    log(f"choosing the INT8 form for this CPU: one transformer block float and INT8 at {request.calib_size}x"
        f"{request.calib_size}, one decoder convolution (once per CPU and architecture)")
    speedups = probe.speedups(model.path, request.calib_size, cpu_target.cpu_name(), cpu_target.cpu_flags())
    return _for_target_cpu(request, cpu_target.choose("this", speedups=speedups))


def _for_target_cpu(request: QuantizeRequest, choice: dict) -> QuantizeRequest:
    """The request with the formats of ``choice`` (ovsd3.quantize.target.choose) where the user named none, and
    the choice (for the record) with what the user's own options overrode."""
    transformer, decoder = request.transformer, request.vae_decoder
    if transformer.weights is not None:
        choice["transformer"] = f"{transformer.weights}-weights"
        choice["why"] += "; transformer: --transformer-weights given"
    elif not transformer.ignore_types:
        transformer = dataclasses.replace(transformer,
                                          ignore_types=cpu_target.TRANSFORMER_FORMS[choice["transformer"]])
    if decoder is None:
        decoder = VaeDecoderQuantization(mode=choice["vae_decoder"])
    elif decoder.mode != choice["vae_decoder"]:
        choice["vae_decoder"] = decoder.mode
        choice["why"] += "; VAE decoder: --vae-decoder given"
    return dataclasses.replace(request, transformer=transformer, vae_decoder=decoder, cpu_choice=choice)


def _calibrate(request: QuantizeRequest, source: Path, plan, digits_demo: bool, log) -> tuple[list[str], Path]:
    """Record (or find recorded) the transformer inputs and final latents; returns the prompts and the cache
    (none when neither the transformer nor the decoder quantizes activations)."""
    if request.transformer.weights is not None and request.vae_decoder.mode != "int8":
        log("[1/4] calibration: not needed (weight-only transformer and VAE decoder)")
        return [], None
    if digits_demo and request.dataset == calibration.BUILTIN:
        from ovsd3.demo.digits import calibration_prompts

        prompts = calibration_prompts(plan.prompts_needed)  # the demo's own world, not photo captions
    else:
        prompts = calibration.load_prompts(request.dataset, plan.prompts_needed, log)
    cache_dir = request.calib_cache or calibration.default_cache_root() / calibration.cache_key(source, plan, prompts)
    _check_calib_cache(cache_dir, request, source)
    log(f"[1/4] calibration: {request.calib} transformer inputs from {len(prompts)} prompts x "
        f"{plan.steps} steps at {plan.size}x{plan.size} (guidance {plan.guidance_scale}), cached in {cache_dir}")
    calibration.record(source, plan, prompts, cache_dir, log)
    return prompts, cache_dir


def _quantize_models(core, source: Path, staging: Path, request: QuantizeRequest, decoder_latents,
                     cache_dir: Path, log) -> list[SizeRow]:
    if request.transformer.weights is None:
        kept = " and the attention" if request.transformer.ignore_types else ""
        log(f"[2/4] transformer: INT8 (NNCF, {request.calib} samples, patch embedding{kept} kept in float)")
    else:
        log(f"[2/4] transformer: {request.transformer.label} only (NNCF; activations stay in float)")
    rows = [_quantize_transformer(core, source, staging, request, cache_dir, log)]
    rows += _quantize_controlnets(core, source, staging, request, cache_dir, log)
    decoder_int8 = request.vae_decoder.mode == "int8"
    log(f"[3/4] text encoders and VAE{' encoder' if decoder_int8 else ''}: {request.weights.mode} weights "
        f"(group size {request.weights.group_size}, ratio {request.weights.ratio})")
    weight_only = WEIGHT_COMPRESSED + (() if decoder_int8 else (layout.VAE_DECODER,))
    rows += _compress_weights(core, source, staging, weight_only, request.weights)
    if decoder_int8:
        rows.append(_quantize_decoder(core, source, staging, request.vae_decoder, decoder_latents, log))
    log(size_table(rows))
    return rows


def _gate(source: Path, staging: Path, gate: GateSettings, log):
    """Run the quality gate; a failure raises (and the staging folder goes)."""
    log(f"[4/4] quality gate: {len(gate.prompts)} held-out prompts, same seeds, original vs quantized")
    report = run_gate(source, staging, gate)
    log("      image PSNR " + ", ".join(f"{value:.1f}" for value in report.image_psnr)
        + f" dB (mean {report.mean_psnr:.1f}); SSIM " + ", ".join(f"{v:.3f}" for v in report.image_ssim)
        + f" (mean {report.mean_ssim:.3f})")
    if report.control_psnr:
        log("      with control: image PSNR " + ", ".join(f"{value:.1f}" for value in report.control_psnr)
            + " dB; SSIM " + ", ".join(f"{value:.3f}" for value in report.control_ssim))
    log("      transformer output PSNR per step: " + ", ".join(f"{v:.1f}" for v in report.step_psnr) + " dB")
    digits = report.digit_accuracy
    if digits is not None:
        log(f"      digits matching their prompt: original {digits['reference']:.0%}, quantized "
            f"{digits['candidate']:.0%}")
    if not report.passed:
        digit_note = "" if digits is None else (
            f", digits matching {digits['candidate']:.0%} against the original's {digits['reference']:.0%} "
            f"(may fall by {gate.max_digit_drop:.0%} at most)")
        control_note = "" if not report.control_psnr else (
            f", with control {sum(report.control_psnr) / len(report.control_psnr):.1f} dB and SSIM "
            f"{sum(report.control_ssim) / len(report.control_ssim):.3f}")
        raise OvsdError(f"quality gate failed: mean image PSNR {report.mean_psnr:.1f} dB (needs "
                        f">= {gate.min_psnr}), mean SSIM {report.mean_ssim:.3f} (needs >= {gate.min_ssim})"
                        f"{control_note}{digit_note}; nothing was written")
    return report
