"""Adding LoRA deltas to the weights of an SD3 transformer IR, the way a merge adds them to PyTorch's Linears.

optimum-intel's export names each Linear's MatMul after its module (``__module.<path>/aten::linear/MatMul``) and
feeds it its weight ``[out, in]`` (``transpose_b``) from a Constant, directly (fp32) or through a decompression
Convert (fp16). The delta is added in float32 and stored back in the constant's own type, so an FP16 folder stays
FP16 in memory. Weights that NNCF compressed (INT8/INT4: a chain of Convert, Subtract and Multiply on integers)
cannot take a delta without re-quantizing: they are refused, as openvino.genai's fuse mode refuses them.
"""

from __future__ import annotations

import re

import numpy as np

_LINEAR = re.compile(r"^__module\.(?P<path>[^/]+)/(?:aten|ov_ext)::(?:linear|_convolution)/(?:MatMul|Convolution)$")


class AdapterMismatch(ValueError):
    """An adapter's layer that the IR does not have, or has with another shape."""


def linear_layers(model) -> dict[str, object]:
    """Module path (``transformer_blocks.0.attn.to_q``) -> its MatMul or Convolution op."""
    layers = {}
    for op in model.get_ordered_ops():
        match = _LINEAR.match(op.get_friendly_name())
        if match and op.get_type_name() in ("MatMul", "Convolution"):
            layers[match.group("path")] = op
    return layers


def _weight_constant(op, path: str):
    """(the Constant holding the weight, the input it feeds): the Constant itself or behind one Convert."""
    node = op.input_value(1).get_node()
    if node.get_type_name() == "Constant":
        return node, op.input(1)
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        return node.input_value(0).get_node(), node.input(0)
    raise AdapterMismatch(f"layer {path} has compressed (INT8/INT4) weights: LoRA adapters need an FP16 or FP32 "
                          "transformer (apply them before quantizing, or load the FP16 folder)")


def layer_shapes(model) -> dict[str, tuple[int, ...]]:
    """Module path -> its weight's shape as PyTorch holds it: [out, in], or [out, in, kh, kw]."""
    shapes = {}
    for path, op in linear_layers(model).items():
        shape = tuple(op.get_input_partial_shape(1).to_shape())
        shapes[path] = shape[::-1] if op.get_type_name() == "MatMul" and not op.get_transpose_b() else shape
    return shapes


def _updated_weights(model, deltas: dict[str, np.ndarray]) -> list[tuple]:
    """(weight Constant, the input it feeds, the new weight in the constant's type) for every delta, every one
    checked before the model changes."""
    layers = linear_layers(model)
    updates = []
    for path, delta in deltas.items():
        op = layers.get(path)
        if op is None:
            raise AdapterMismatch(f"the adapter changes layer {path}, which this transformer does not have")
        if op.get_type_name() == "MatMul" and not op.get_transpose_b():
            delta = delta.T
        constant, consumer = _weight_constant(op, path)
        weight = constant.get_data()
        if tuple(weight.shape) != tuple(delta.shape):
            raise AdapterMismatch(f"the adapter's layer {path} is {tuple(delta.shape)}, the transformer's "
                                  f"{tuple(weight.shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            updated = (weight.astype(np.float32) + delta).astype(weight.dtype)
        if not np.isfinite(updated).all():  # NaN or infinity in a weight: black images
            raise AdapterMismatch(f"layer {path} would hold values beyond {weight.dtype} (the adapters' update is too "
                                  "large: lower their weights)")
        updates.append((constant, consumer, updated))
    return updates


def add_deltas(model, deltas: dict[str, np.ndarray]) -> None:
    """``model`` with ``deltas`` (module path -> float32 array shaped as the weight) added, in place; a refusal
    leaves it unchanged."""
    import openvino as ov

    for constant, consumer, weight in _updated_weights(model, deltas):
        updated = ov.op.Constant(weight)
        updated.set_friendly_name(constant.get_friendly_name())
        consumer.replace_source_output(updated.output(0))
    model.validate_nodes_and_infer_types()
