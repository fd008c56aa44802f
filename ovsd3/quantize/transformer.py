"""INT8 post-training quantization of the SD3 transformer with NNCF."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ovsd3.errors import OvsdError

PRESETS = ("mixed", "performance")
# Weight-only alternatives to INT8 activations (--transformer-weights): no calibration pass, smaller gains.
WEIGHT_ONLY_MODES = {"int8": "int8", "int4": "int4_sym"}  # -> ovsd3.quantize.weights modes


@dataclass(frozen=True)
class TransformerQuantization:
    subset_size: int = 200
    preset: str | None = None  # None: NNCF's default for transformers (mixed)
    smooth_quant_alpha: float | None = None  # None: NNCF's default
    ignore: tuple[str, ...] = field(default_factory=tuple)  # more node names to keep in float
    slices: int | None = None  # quantize this many block ranges separately; None: from the model's size
    weights: str | None = None  # "int8" or "int4": weight-only compression instead of INT8 activations
    # Operation types whose inputs stay float: ("ScaledDotProductAttention",) keeps the CPU plugin's fused
    # attention kernel, which it gives up for an int8 MatMul + Softmax when the query and key are quantized.
    ignore_types: tuple[str, ...] = ()

    def check(self) -> None:
        if self.weights is not None and self.weights not in WEIGHT_ONLY_MODES:
            raise OvsdError(f"--transformer-weights must be one of {', '.join(WEIGHT_ONLY_MODES)} "
                            f"(got {self.weights!r})")

    @property
    def label(self) -> str:
        return "INT8" if self.weights is None else f"{self.weights.upper()} weights"

# NNCF quantized a 6-block slice of SD3 Medium (1.1 GB of fp16 weights) within 11.4 GB on this machine;
# the whole 4.2 GB transformer exceeds 24 GB. Slices of at most this much weight keep it well inside.
SLICE_WEIGHT_BYTES = 1_200_000_000


def slice_count(weight_bytes: int) -> int:
    return max(1, -(-weight_bytes // SLICE_WEIGHT_BYTES))


def patch_embedding_convolution(model, input_name: str = "hidden_states") -> str:
    """The first Convolution fed by the ``hidden_states`` input (or ``input_name``: a ControlNet's
    ``controlnet_cond``): the patch embedding, which the published recipe keeps in float. Found from the graph,
    so a merged LoRA or another exporter's names don't matter."""
    starts = [parameter for parameter in model.get_parameters()
              if input_name in parameter.output(0).get_names()]
    if not starts:
        raise OvsdError(f"the IR has no {input_name} input")
    queue, seen = deque(starts), set()
    while queue:
        node = queue.popleft()
        for output in node.outputs():
            for target in output.get_target_inputs():
                consumer = target.get_node()
                if consumer.get_type_name() == "Convolution":
                    return consumer.get_friendly_name()
                if consumer.get_friendly_name() not in seen:
                    seen.add(consumer.get_friendly_name())
                    queue.append(consumer)
    raise OvsdError(f"no Convolution is fed by {input_name}: is this an SD3 transformer?")


def nncf_int8(model, samples, options: TransformerQuantization, keep_in_float: set[str]):
    """``model`` with INT8 activations and weights from NNCF, calibrated on ``samples``: the one call the
    transformer, its slices and the ControlNets are quantized with, so that ``options`` (preset, SmoothQuant,
    the operation types --target-cpu keeps in float) mean the same for all. ``keep_in_float``: node names, those
    not in ``model`` (another slice's) left out."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)

    advanced = None
    if options.smooth_quant_alpha is not None:
        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=options.smooth_quant_alpha))
    preset = None if options.preset is None else nncf.QuantizationPreset(options.preset)
    names = sorted(set(keep_in_float) & {op.get_friendly_name() for op in model.get_ops()})
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=options.subset_size, preset=preset,
                         ignored_scope=nncf.IgnoredScope(names=names, types=list(options.ignore_types),
                                                         validate=False),
                         advanced_parameters=advanced)


def quantize_transformer(model, samples, options: TransformerQuantization, weight_bytes: int = 0,
                         log=print):
    """``model`` (ov.Model) quantized to INT8 with ``samples`` (an iterable of input dicts), in slices of
    blocks when it is too big to quantize whole in this machine's memory (see ovsd3.quantize.slicing)."""
    patch_embedding = patch_embedding_convolution(model)
    known = {op.get_friendly_name() for op in model.get_ops()}
    unknown = [name for name in options.ignore if name not in known]
    if unknown:
        raise OvsdError(f"--ignore: the transformer has no node named {unknown[0]!r}")
    keep_in_float = {patch_embedding, *options.ignore}

    def quantize(piece, piece_samples, index=0):
        return nncf_int8(piece, piece_samples, options, keep_in_float)

    slices = options.slices or slice_count(weight_bytes)
    if slices <= 1:
        return quantize(model, samples)
    from ovsd3.quantize.slicing import quantize_in_slices

    return quantize_in_slices(model, samples, quantize, slices, log)


def compress_transformer(model, mode: str):
    """Weight-only compression of the transformer (``mode`` "int8": per-channel INT8; "int4": INT4 in groups
    of 128, NNCF keeping its first and last layers in INT8): activations stay in float, so no calibration."""
    from ovsd3.quantize.weights import WeightCompression, compress

    return compress(model, WeightCompression(mode=WEIGHT_ONLY_MODES[mode], ratio=1.0))
