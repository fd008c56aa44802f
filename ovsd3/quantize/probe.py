"""What INT8 gains on this CPU, measured: the evidence `ovsd3 quantize --target-cpu this` picks its formats from.

Whether an INT8 layer is faster than its float form depends on the kernel OpenVINO's CPU plugin has for it on
this CPU (benchmarks/results/int8_avx2/README.md): with VNNI or AMX int8 wins everywhere; with AVX2 only, INT8
fully connected layers gain a little and quantized attention inputs can make the plugin give up its fused
attention kernel. Rather than trust a table of ISA levels, the candidates are timed here:

- the transformer: the folder's own transformer cut to its first block (``ovsd3/ir/skip_blocks``), in float, in
  INT8 with the attention in float (``int8-fc``) and all INT8 (``int8``), each quantized by the NNCF call `ovsd3
  quantize` makes, on random inputs (values set ranges, not speed), compiled for the calibration size's static
  shapes and called in turn. A single attention layer does not show what a whole block does: on this AVX2 EPYC
  one fused attention with quantized inputs measured 1.0-1.09x its float form, while in the whole transformer
  the same quantization costs 0.76-0.81x (the plugin's fusions depend on what surrounds the attention).
- the VAE decoder: one of its 512-channel 3x3 convolutions at 64x64, float (fp16 weights, as converted) against
  NNCF's INT8 pattern (convolutions have no such fusion question: one layer tells).

A probe takes seconds (tiny models) to a minute or two (full size), so its result is kept per CPU, OpenVINO
version, transformer configuration and size in ``~/.cache/ovsd3/cpu-probe/`` (``$XDG_CACHE_HOME`` respected).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.timing import alternating_medians

CONV_CHANNELS, CONV_SIDE = 512, 64  # the VAE decoder's widest convolutions, on a 512x512 picture's latents
TEXT_TOKENS = 77 + 256  # CLIP's and T5's sequences, as the pipeline hands the transformer
SAMPLES = 4  # random calibration inputs for the probe's quantization
REPEATS = 5
KEYS = ("fully_connected", "attention", "convolution")


def _quantized(value, ops):
    """An activation through a u8 per-tensor FakeQuantize, as NNCF inserts one before an INT8 input."""
    low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    return ops.fake_quantize(value, low, high, low, high, 256)


def convolution_model(int8: bool, rng: np.random.Generator):
    """One VAE decoder convolution: fp16 weights (as converted), or NNCF's INT8 pattern (a FakeQuantize on the
    input, int8 weights times a per-channel scale)."""
    import openvino as ov
    import openvino.opset13 as ops

    shape = (CONV_CHANNELS, CONV_CHANNELS, 3, 3)
    if int8:
        codes = ops.convert(ops.constant(rng.integers(-127, 128, shape).astype(np.int8)), ov.Type.f32)
        kernel = ops.multiply(codes, ops.constant((rng.random((CONV_CHANNELS, 1, 1, 1)) * 0.01 + 0.001)
                                                  .astype(np.float32)))
    else:
        kernel = ops.convert(ops.constant((rng.standard_normal(shape) * 0.02).astype(np.float16)), ov.Type.f32)
    x = ops.parameter([1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE], ov.Type.f32, name="x")
    out = ops.convolution(_quantized(x, ops) if int8 else x, kernel, [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([out], [x], "convolution")


def block_inputs(config: dict, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One image's transformer inputs at ``size`` x ``size`` pixels, widths from the transformer's config."""
    side = size // 8
    return {"hidden_states": rng.standard_normal((1, config.get("in_channels", 16), side, side), dtype=np.float32),
            "timestep": np.array([500.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, config["joint_attention_dim"]),
                                                         dtype=np.float32),
            "pooled_projections": rng.standard_normal((1, config["pooled_projection_dim"]), dtype=np.float32)}


def _one_block(folder: layout.ModelFolder):
    import openvino as ov

    from ovsd3.ir.skip_blocks import skip_blocks

    model = ov.Core().read_model(layout.model_xml(folder.path, layout.TRANSFORMER))
    blocks = folder.block_count
    return skip_blocks(model, list(range(1, blocks)), blocks) if blocks > 1 else model


def block_forms(folder: Path, size: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The folder's transformer cut to one block, as ``{"float": ..., "int8-fc": ..., "int8": ...}`` ov.Models
    quantized as `ovsd3 quantize` quantizes, and the inputs to time them on."""
    from ovsd3.quantize.target import TRANSFORMER_FORMS
    from ovsd3.quantize.transformer import TransformerQuantization, quantize_transformer

    opened = layout.ModelFolder.open(folder)
    rng = np.random.default_rng(0)
    inputs = block_inputs(opened.transformer_config, size, rng)
    samples = [{name: value + np.float32(0.1) * rng.standard_normal(value.shape, dtype=np.float32)
                if value.ndim > 1 else value for name, value in inputs.items()} for _ in range(SAMPLES)]
    model = _one_block(opened)
    forms = {"float": model}
    for form, ignore_types in TRANSFORMER_FORMS.items():
        options = TransformerQuantization(subset_size=SAMPLES, slices=1, ignore_types=ignore_types)
        forms[form] = quantize_transformer(model.clone(), samples, options, log=lambda _: None)
    return forms, inputs


def _timed(models: dict, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Median seconds of each model, compiled for ``inputs``' shapes as the runtime compiles them, called in turn."""
    import openvino as ov

    core, calls = ov.Core(), {}
    for name, model in models.items():
        static = model.clone()
        static.reshape({port.get_any_name(): list(inputs[port.get_any_name()].shape) for port in static.inputs})
        request = core.compile_model(static, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        calls[name] = request.infer
    return alternating_medians(calls, inputs, REPEATS)


def measure(folder: Path, size: int) -> dict[str, float]:
    """Speed-ups (seconds before over seconds after, above 1: faster): INT8 fully connected layers over float
    (``fully_connected``), quantized attention inputs over float ones (``attention``), both on one block of the
    folder's transformer at ``size``; an INT8 convolution over a float one (``convolution``)."""
    forms, inputs = block_forms(folder, size)
    block = _timed(forms, inputs)
    rng = np.random.default_rng(1)
    conv = _timed({"float": convolution_model(False, rng), "int8": convolution_model(True, rng)},
                  {"x": rng.standard_normal((1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE), dtype=np.float32)})
    return {"fully_connected": round(block["float"] / block["int8-fc"], 3),
            "attention": round(block["int8-fc"] / block["int8"], 3),
            "convolution": round(conv["float"] / conv["int8"], 3)}


def _cache_file(folder: Path, size: int, cpu: str, flags: set[str] | None) -> Path:
    import openvino as ov

    config = layout.ModelFolder.open(folder).transformer_config
    key = json.dumps([cpu, sorted(flags or ()), ov.get_version(), config, size, SAMPLES, REPEATS], sort_keys=True)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ovsd3" / "cpu-probe" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def speedups(folder: Path, size: int, cpu: str, flags: set[str] | None) -> dict[str, float]:
    """:func:`measure`, measured once per CPU, OpenVINO version, transformer configuration and size."""
    path = _cache_file(folder, size, cpu, flags)
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and set(cached) == set(KEYS):
            return cached
    except (OSError, ValueError):
        pass  # not measured yet here (or the file was damaged): measure
    measured = measure(folder, size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(measured))
        temporary.replace(path)  # another quantize measuring at once writes the same thing
    except OSError:
        pass  # a read-only home: measure again next time
    return measured
