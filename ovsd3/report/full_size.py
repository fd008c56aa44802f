"""What INT8 gains at full size on this CPU, measured in a few minutes from a few full-width blocks.

The demo model's 64x64 images (an 8x8 latent: 16 image tokens) leave a transformer block next to no
arithmetic, so its step time is quantize/dequantize overhead and graph scheduling: INT8 cannot gain there and
usually loses. What INT8 is for is the matrix work of full-size models. Building a whole one (SD3 Medium's
transformer: 2B parameters, 24 blocks) takes longer than a newcomer's first run should, so this builds the
preset's transformer at its real width with only ``blocks`` blocks and random weights, exports and
quantizes it the way ``ovsd3 convert`` and ``ovsd3 quantize`` do, and times one call of FP16 and of INT8,
alternating, at each size.

The full step is estimated from two timings of the same compiled weights: the ``blocks``-block model and the
same IR with one middle block skipped (``ovsd3.ir.skip_blocks``, as skip-layer guidance does). Their
difference is one block's time; the rest (patch and text embeddings, the last block, which hands on no text,
and the output projection) is what the skipped model leaves. The full transformer is then
``t(blocks) + (num_layers - blocks) * block``. ``benchmarks/int8_estimate.py`` checks that estimate against
a whole full-size transformer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ovsd3 import layout
from ovsd3.errors import OvsdError
from ovsd3.quantize.probe import TEXT_TOKENS  # CLIP + T5 at diffusers' default max_sequence_length
from ovsd3.timing import alternating_medians

PRESETS = ("sd3-medium", "sd3.5-large")  # the full-size ones with uniform blocks (tests use small presets)
# Calibration only sets the scales, which timing does not depend on: small random inputs keep it quick.
CALIBRATION_SIZE = 128


@dataclass(frozen=True)
class EstimateRequest:
    preset: str = "sd3-medium"
    blocks: int = 3
    sizes: tuple[int, ...] = (512, 1024)
    repeats: int = 3
    calibration_samples: int = 2
    device: str = "CPU"
    int8_form: str | None = None  # an ovsd3.quantize.target form; None: what `ovsd3 quantize` picks for this CPU

    def check(self) -> None:
        from ovsd3.presets import PRESETS as ARCHITECTURES

        arch = ARCHITECTURES.get(self.preset)
        if arch is None or arch.transformer.dual_attention_layers:
            raise OvsdError(f"--full-size must be one of {', '.join(PRESETS)} (got {self.preset!r}; SD3.5 "
                            "Medium's blocks differ from one another, so a few do not tell the rest)")
        if not 3 <= self.blocks < arch.transformer.num_layers:
            raise OvsdError(f"the full-size estimate needs 3 to {arch.transformer.num_layers - 1} blocks "
                            f"(one skipped between two others; got {self.blocks})")


def _architecture(request: EstimateRequest):
    from ovsd3.presets import get_preset

    arch = get_preset(request.preset).transformer
    return arch, dataclasses.replace(arch, num_layers=request.blocks, dual_attention_layers=())


def _export(arch, out: Path) -> None:
    """The cut transformer in fp16, exported and checked against PyTorch as `ovsd3 convert` does."""
    import torch
    from diffusers import SD3Transformer2DModel

    from ovsd3.convert.components import transformer_job
    from ovsd3.convert.export import ExportOptions, export_component

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        module = SD3Transformer2DModel(**arch.diffusers_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    export_component(transformer_job(module, ExportOptions()), out / layout.TRANSFORMER, ExportOptions())


def transformer_inputs(arch, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One image's transformer call at ``size`` x ``size`` pixels (no guidance: a guided step is a batch of 2),
    as `ovsd3 quantize`'s probe times one (TEXT_TOKENS text tokens)."""
    from ovsd3.quantize.probe import block_inputs

    return block_inputs(arch.diffusers_config(), size, rng)


def _quantize(fp16: Path, int8: Path, arch, request: EstimateRequest) -> str:
    """INT8 with the NNCF call `ovsd3 quantize` makes on this CPU, calibrated on random inputs (timing needs no
    real ones); the form it chose (ovsd3.quantize.target)."""
    import openvino as ov

    from ovsd3.quantize.target import TRANSFORMER_FORMS, choose
    from ovsd3.quantize.transformer import TransformerQuantization, quantize_transformer

    model = ov.Core().read_model(layout.model_xml(fp16, layout.TRANSFORMER))
    rng = np.random.default_rng(1)
    samples = [transformer_inputs(arch, CALIBRATION_SIZE, rng) for _ in range(request.calibration_samples)]
    form = request.int8_form or choose("this")["transformer"]
    options = TransformerQuantization(subset_size=request.calibration_samples, slices=1,
                                      ignore_types=TRANSFORMER_FORMS[form])
    quantized = quantize_transformer(model, samples, options, log=lambda _: None)
    (int8 / layout.TRANSFORMER).mkdir(parents=True)
    ov.save_model(quantized, layout.model_xml(int8, layout.TRANSFORMER))
    return form


def _static_shapes(inputs: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {name: value.shape for name, value in inputs.items()}


def _compiled_pair(folder: Path, inputs: dict, blocks: int, device: str) -> tuple[Callable, Callable]:
    """(the whole cut transformer, the same with block 1 skipped), compiled for ``inputs``' shapes as a
    serving pipeline compiles them (static shapes: dynamic ones hold several GiB of scratch per model at 1024)."""
    from ovsd3.ir.skip_blocks import skip_blocks
    from ovsd3.runtime.devices import CompileOptions, DevicePlan, ModelCompiler, reshape_inputs

    compiler = ModelCompiler(folder, CompileOptions(plan=DevicePlan(device), cache_dir=None))
    skipped = skip_blocks(compiler.read(layout.TRANSFORMER), [1], blocks)
    reshape_inputs(skipped, _static_shapes(inputs))
    return (compiler.compile(layout.TRANSFORMER, static_shapes=_static_shapes(inputs)),
            compiler.compile_derived(layout.TRANSFORMER, skipped))


def _full_step(whole: float, skipped: float, blocks: int, num_layers: int) -> dict:
    block = max(whole - skipped, 0.0)
    return {"cut_seconds": whole, "block_seconds": block, "rest_seconds": whole - blocks * block,
            "full_seconds": whole + (num_layers - blocks) * block}


def measure(folders: dict[str, Path], arch, full_layers: int, request: EstimateRequest,
            log: Callable[[str], None]) -> dict:
    """Per size: each folder's cut call, block, rest and estimated full call, and INT8's speed-up."""
    rows = {}
    for size in request.sizes:
        log(f"full-size estimate: timing {size}x{size}")
        inputs = transformer_inputs(arch, size, np.random.default_rng(size))
        models = {f"{label} {part}": model for label, folder in folders.items()
                  for part, model in zip(("whole", "skip"), _compiled_pair(folder, inputs, request.blocks,
                                                                           request.device))}
        seconds = alternating_medians(models, inputs, request.repeats)
        del models  # one size's compiled models at a time
        row = {label: _full_step(seconds[f"{label} whole"], seconds[f"{label} skip"], request.blocks, full_layers)
               for label in folders}
        row["speedup"] = row["FP16"]["full_seconds"] / row["INT8"]["full_seconds"]
        rows[str(size)] = row
    return rows


def _sizes(request: EstimateRequest, arch) -> tuple[int, ...]:
    """The asked sizes the position embedding allows (small test presets: the largest it allows)."""
    largest = arch.pos_embed_max_size * 8
    return tuple(size for size in request.sizes if size <= largest) or (largest,)


def estimate(request: EstimateRequest, scratch: Path, log: Callable[[str], None] = print) -> dict:
    """Build, export, quantize and time the cut transformer under ``scratch``; the estimate as JSON-ready data."""
    request.check()
    full, cut = _architecture(request)
    started = time.perf_counter()
    folders = {"FP16": scratch / "fp16", "INT8": scratch / "int8"}
    log(f"full-size estimate: {request.preset}'s transformer at full width, {request.blocks} of its "
        f"{full.num_layers} blocks, random weights")
    _export(cut, folders["FP16"])
    form = _quantize(folders["FP16"], folders["INT8"], cut, request)
    sizes = measure(folders, cut, full.num_layers, dataclasses.replace(request, sizes=_sizes(request, cut)), log)
    return {"preset": request.preset, "blocks": request.blocks, "num_layers": full.num_layers,
            "text_tokens": TEXT_TOKENS, "int8_form": form, "repeats": request.repeats, "sizes": sizes,
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(result: dict) -> list[str]:
    """The report's section: measured cut calls, the estimated full call, INT8's speed-up per size."""
    lines = ["", f"## What INT8 gains at full size on this CPU ({result['preset']}, estimated)", "",
             f"The demo's own timing above is not what INT8 is for: its images are so small that a transformer "
             f"block has next to no arithmetic, and quantizing and dequantizing cost more than they save. Here "
             f"{result['preset']}'s transformer at its real width, {result['blocks']} of its {result['num_layers']} "
             f"blocks with random weights, exported and quantized the same way (INT8 form {result['int8_form']}, as "
             f"`ovsd3 quantize` picks it for this CPU), one image's call (no guidance; a "
             f"guided step is a batch of two), median of {result['repeats']}. The full call is the cut call plus "
             f"{result['num_layers'] - result['blocks']} times one block's time (the cut call less the same with "
             f"one block skipped). Made in {result['seconds']:.0f} s.", "",
             "| size | FP16 cut call (s) | INT8 cut call (s) | FP16 block (s) | INT8 block (s) | "
             "FP16 full call, est. (s) | INT8 full call, est. (s) | INT8 speed-up |", "|---|---|---|---|---|---|---|---|"]
    for size, row in result["sizes"].items():
        fp16, int8 = row["FP16"], row["INT8"]
        lines.append(f"| {size}x{size} | {fp16['cut_seconds']:.2f} | {int8['cut_seconds']:.2f} | "
                     f"{fp16['block_seconds']:.2f} | {int8['block_seconds']:.2f} | {fp16['full_seconds']:.1f} | "
                     f"{int8['full_seconds']:.1f} | {row['speedup']:.2f}x |")
    return lines
