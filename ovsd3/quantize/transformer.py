"""INT8 post-training quantization of the SD3 transformer with NNCF."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ovsd3.errors import OvsdError

PRESETS = ("mixed", "performance")


@dataclass(frozen=True)
class TransformerQuantization:
    subset_size: int = 200
    preset: str | None = None  # None: NNCF's default for transformers (mixed)
    smooth_quant_alpha: float | None = None  # None: NNCF's default
    ignore: tuple[str, ...] = field(default_factory=tuple)  # more node names to keep in float


def patch_embedding_convolution(model) -> str:
    """The first Convolution fed by the ``hidden_states`` input: the patch embedding, which the published
    recipe keeps in float. Found from the graph, so a merged LoRA or another exporter's names don't matter."""
    starts = [parameter for parameter in model.get_parameters()
              if "hidden_states" in parameter.output(0).get_names()]
    if not starts:
        raise OvsdError("the transformer IR has no hidden_states input")
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
    raise OvsdError("no Convolution is fed by hidden_states: is this an SD3 transformer?")


def quantize_transformer(model, samples, options: TransformerQuantization):
    """``model`` (ov.Model) quantized to INT8 with ``samples`` (an iterable of input dicts)."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)

    names = [patch_embedding_convolution(model), *options.ignore]
    known = {op.get_friendly_name() for op in model.get_ops()}
    unknown = [name for name in options.ignore if name not in known]
    if unknown:
        raise OvsdError(f"--ignore: the transformer has no node named {unknown[0]!r}")
    advanced = None
    if options.smooth_quant_alpha is not None:
        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=options.smooth_quant_alpha))
    preset = None if options.preset is None else nncf.QuantizationPreset(options.preset)
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=options.subset_size, preset=preset,
                         ignored_scope=nncf.IgnoredScope(names=names), advanced_parameters=advanced)
