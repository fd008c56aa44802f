"""LoRA adapters on an SD3 transformer IR: merged into the weights, or as low-rank side branches.

optimum-intel's export names each Linear's MatMul after its module (``__module.<path>/aten::linear/MatMul``) and
feeds it its weight ``[out, in]`` (``transpose_b``) from a Constant, directly (fp32) or through a decompression
Convert (fp16).

Merge (``add_deltas``): the delta is added in float32 and stored back in the constant's own type, so an FP16
folder stays FP16 in memory. Weights that NNCF compressed (INT8/INT4: a chain of Convert, Subtract and Multiply on
integers) cannot take a delta without re-quantizing: they are refused, as openvino.genai's fuse mode refuses them.

Branch (``add_branches``), openvino.genai's dynamic mode: beside each adapted layer, ``(x @ A^T) * s @ B^T`` is
added to the layer's output (before its bias), the layer itself untouched whatever its weights are. ``s`` is an
input of the model, one scalar per adapter (``lora_scale_<i>``), so a new adapter weight needs no compile. ``x``
is the layer's float input: where NNCF put a FakeQuantize (INT8 activations) and a SmoothQuant multiply before the
layer, the branch reads the tensor before both (SmoothQuant divided the weights by the scale it multiplied the
input with; the adapter's A was trained against the undivided input).
"""

from __future__ import annotations

import re

import numpy as np

SCALE_INPUT = "lora_scale_{}"  # one scalar f32 input per adapter in branch mode
_SMOOTH_QUANT = "nncf_smooth_quant"  # NNCF's name for the multiply SmoothQuant puts before a quantized layer
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
    raise AdapterMismatch(f"layer {path} has compressed (INT8/INT4) weights: merging a LoRA needs an FP16 or FP32 "
                          "transformer (apply it as branches: lora_mode 'branch', --lora-mode branch)")


def _plain_weights(op) -> bool:
    node = op.input_value(1).get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and node.get_output_element_type(0).is_real()


def compressed_layers(model) -> list[str]:
    """The Linears (and convolutions) whose weights are not a float Constant: quantized (INT8 FakeQuantize
    folders hold them as int8) or weight-compressed (INT8/INT4)."""
    return [path for path, op in linear_layers(model).items() if not _plain_weights(op)]


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


def _branch_input(op, path: str):
    """The layer's float input, before NNCF's FakeQuantize and SmoothQuant multiply if it has them."""
    if op.get_type_name() == "MatMul" and op.get_transpose_a():
        raise AdapterMismatch(f"layer {path} multiplies a transposed input; LoRA branches need x @ W^T")
    value = op.input_value(0)
    if value.get_node().get_type_name() == "FakeQuantize":
        value = value.get_node().input_value(0)
    node = value.get_node()
    if node.get_type_name() == "Multiply" and _SMOOTH_QUANT in node.get_friendly_name():
        value = next(source for source in node.input_values() if source.get_node().get_type_name() != "Constant")
    return value


def _as_type(value, element_type):
    from openvino import opset13 as ops

    return value if value.get_element_type() == element_type else ops.convert(value, element_type).output(0)


def _factor(array: np.ndarray, element_type):
    from openvino import opset13 as ops

    return _as_type(ops.constant(np.ascontiguousarray(array, dtype=np.float32)).output(0), element_type)


def _branch(op, x, A: np.ndarray, B: np.ndarray, scale, name: str):
    """``(x A^T) * scale B^T`` as ``op`` computes its own product: a MatMul, or a convolution (A with the
    layer's kernel, strides and pads; B a 1x1 convolution)."""
    from openvino import opset13 as ops

    kind = x.get_element_type()
    if op.get_type_name() == "MatMul":
        down = ops.matmul(x, _factor(A, kind), False, True, name=f"{name}/down")
        scaled = ops.multiply(down, _as_type(scale, kind), name=f"{name}/scale")
        return ops.matmul(scaled, _factor(B, kind), False, True, name=f"{name}/up")
    attributes = op.get_attributes()
    down = ops.convolution(x, _factor(A, kind), attributes["strides"], attributes["pads_begin"],
                           attributes["pads_end"], attributes["dilations"], attributes["auto_pad"], name=f"{name}/down")
    scaled = ops.multiply(down, _as_type(scale, kind), name=f"{name}/scale")
    return ops.convolution(scaled, _factor(B, kind), [1, 1], [0, 0], [0, 0], [1, 1], name=f"{name}/up")


def add_branches(model, branches: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """``model`` with one side branch per adapter and layer, in place: ``branches[i]`` maps adapter i's layers
    to (A [rank, in(, kh, kw)], B [out, rank(, 1, 1)]), its alpha / rank folded into B, and adapter i's weight
    is the model's scalar input ``lora_scale_<i>``. Every layer is found and checked before the model changes."""
    from openvino import opset13 as ops

    layers = linear_layers(model)
    missing = next((path for adapter in branches for path in adapter if path not in layers), None)
    if missing is not None:
        raise AdapterMismatch(f"the adapter changes layer {missing}, which this transformer does not have")
    sources = {path: _branch_input(layers[path], path) for adapter in branches for path in adapter}
    parameters = []
    for index, adapter in enumerate(branches):
        scale = ops.parameter([], np.float32, name=SCALE_INPUT.format(index))
        scale.output(0).get_tensor().set_names({SCALE_INPUT.format(index)})
        parameters.append(scale)
        # The branches read the scale through an op of its own: a slice of the model (step caching) that
        # passes the input on to a later slice must not return the Parameter itself, which would lose its name.
        value = ops.convert(scale, np.float32, name=f"{SCALE_INPUT.format(index)}/value").output(0)
        for path, (A, B) in adapter.items():
            op = layers[path]
            target = op.output(0)
            consumers = list(target.get_target_inputs())
            branch = _branch(op, sources[path], A, B, value, f"{op.get_friendly_name()}/lora_{index}")
            total = ops.add(target, branch, name=f"{op.get_friendly_name()}/lora_{index}/add")
            for consumer in consumers:
                consumer.replace_source_output(total.output(0))
    model.add_parameters(parameters)
    model.validate_nodes_and_infer_types()
