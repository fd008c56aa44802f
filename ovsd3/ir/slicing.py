"""Cutting the transformer IR at block boundaries and joining the pieces back.

The IR is cut at transformer-block boundaries. Every tensor made before a cut and used after it (the
image and text token streams, the timestep embedding, shapes) becomes a Parameter of the later slice and a
Result of the earlier one. Joining connects each cut Parameter to the matching Result again (a float round
trip through cut and join is bit-exact). The quantizer calibrates and quantizes slices one at a time
(``ovsd3/quantize/slicing.py``); the runtime derives variants of the transformer from slices (step caching).
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"__module\.transformer_blocks\.(\d+)\.")
_BEFORE_BLOCKS = ("__module.pos_embed", "__module.time_text_embed", "__module.context_embedder")
_AFTER_BLOCKS = ("__module.norm_out", "__module.proj_out")
CUT_PREFIX = "ovsd3_cut"


def _constant_derived(op, derived: set[str]) -> bool:
    inputs = op.input_values()
    return op.get_type_name() == "Constant" or (
        bool(inputs) and all(value.get_node().get_friendly_name() in derived for value in inputs))


def stages(model) -> tuple[dict[str, int | None], int]:
    """Each op's position along the transformer: -1 before the blocks, the block index, or the block
    count after them; None for weights and what is computed from weights alone (they go with their user)."""
    names = [op.get_friendly_name() for op in model.get_ops()]
    blocks = {int(match.group(1)) for name in names if (match := _BLOCK.match(name))}
    if not blocks:
        raise ValueError("no transformer_blocks found in the IR")
    count = max(blocks) + 1
    stage: dict[str, int | None] = {}
    derived: set[str] = set()
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if _constant_derived(op, derived):
            derived.add(name)
            stage[name] = None
            continue
        if op.get_type_name() == "Parameter" or name.startswith(_BEFORE_BLOCKS):
            stage[name] = -1
        elif match := _BLOCK.match(name):
            stage[name] = int(match.group(1))
        elif name.startswith(_AFTER_BLOCKS) or op.get_type_name() == "Result":
            stage[name] = count
        else:  # an unnamed top-level op runs after everything it reads
            producers = [stage[value.get_node().get_friendly_name()] for value in op.input_values()]
            stage[name] = max((s for s in producers if s is not None), default=-1)
    return stage, count


def crossing(model, stage: dict, cut: int) -> list[tuple[str, int]]:
    """(op name, output index) of every tensor made before block ``cut`` and used from it on."""
    tensors = []
    for op in model.get_ordered_ops():
        producer_stage = stage[op.get_friendly_name()]
        if producer_stage is None or producer_stage >= cut:
            continue
        for index, output in enumerate(op.outputs()):
            consumers = [target.get_node().get_friendly_name() for target in output.get_target_inputs()]
            if any(stage[name] is not None and stage[name] >= cut for name in consumers):
                tensors.append((op.get_friendly_name(), index))
    return tensors


def cut_name(cut: int, tensor: tuple[str, int]) -> str:
    return f"{CUT_PREFIX}{cut}:{tensor[0]}:{tensor[1]}"


def extract(model, stage: dict, start: int | None, end: int | None):
    """The slice between cuts ``start`` and ``end`` (None: the model's own inputs or outputs)."""
    import openvino as ov
    from openvino import opset13 as ops

    clone = model.clone()
    by_name = {op.get_friendly_name(): op for op in clone.get_ops()}
    entering = {}  # tensor -> the Parameter standing for it in this slice
    if start is not None:
        for tensor in crossing(model, stage, start):
            output = by_name[tensor[0]].output(tensor[1])
            parameter = ops.parameter(output.get_partial_shape(), output.get_element_type(),
                                      name=cut_name(start, tensor))
            parameter.output(0).get_tensor().set_names({cut_name(start, tensor)})
            output.replace(parameter.output(0))
            entering[tensor] = parameter
    if end is None:
        results = list(clone.get_results())
    else:
        results = []
        for tensor in crossing(model, stage, end):
            if tensor in entering:  # passes straight through
                parameter = entering[tensor]
                # Not the Parameter itself: a compiled model keeps only a Result's names where a Parameter
                # feeds it directly, and the slice would lose this input's name.
                source = ops.convert(parameter, parameter.get_element_type()).output(0)
            else:
                source = by_name[tensor[0]].output(tensor[1])
            result = ops.result(source)
            # A Result shares its input's tensor: add the name, or a pass-through would lose its input name.
            result.get_output_tensor(0).add_names({cut_name(end, tensor)})
            result.set_friendly_name(cut_name(end, tensor))
            results.append(result)
    used = _reachable_parameters(results)
    candidates = [*entering.values(), *clone.get_parameters()]
    return ov.Model(results, [p for p in candidates if p.get_friendly_name() in used], f"slice_{start}_{end}")


def _reachable_parameters(results) -> set[str]:
    """Names of the Parameters the results actually depend on (walking back from them)."""
    seen, stack, found = set(), list(results), set()
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()  # Python wrappers are new on every access: compare names
        if name in seen:
            continue
        seen.add(name)
        if op.get_type_name() == "Parameter":
            found.add(name)
        stack.extend(value.get_node() for value in op.input_values())
    return found


def stitch(slices: list):
    """One model from consecutive slices: each cut Parameter reads the previous slice's matching Result."""
    import openvino as ov

    for earlier, later in zip(slices, slices[1:]):
        produced = {result.get_friendly_name(): result.input_value(0) for result in earlier.get_results()}
        for parameter in later.get_parameters():
            name = parameter.get_friendly_name()
            if name.startswith(CUT_PREFIX):
                parameter.output(0).replace(produced[name])
    first_inputs = {p.get_friendly_name(): p for p in slices[0].get_parameters()}
    for later in slices[1:]:  # a later slice reading an original input reads the first slice's
        for parameter in later.get_parameters():
            name = parameter.get_friendly_name()
            if not name.startswith(CUT_PREFIX) and name in first_inputs and parameter is not first_inputs[name]:
                parameter.output(0).replace(first_inputs[name].output(0))
    return ov.Model(slices[-1].get_results(), list(first_inputs.values()), "transformer")


def cuts_for(block_count: int, slices: int) -> list[int]:
    slices = max(1, min(slices, block_count))
    return sorted({round(block_count * k / slices) for k in range(1, slices)})
