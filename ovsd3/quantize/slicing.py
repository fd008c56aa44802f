"""Quantizing the transformer a few blocks at a time, so that SD3 Medium fits in 24 GB.

NNCF's post-training quantization keeps several working copies of a model's weights (f32 statistics
models, SmoothQuant's rescaled weights): on the whole 2B-parameter SD3 Medium transformer it exceeds 24 GB
even at batch 1 and 256x256. A slice of a quarter of the blocks needs a quarter of that.

The IR is cut at transformer-block boundaries. Every tensor made before a cut and used after it (the
image and text token streams, the timestep embedding, shapes) becomes a Parameter of the later slice and a
Result of the earlier one. Calibration inputs for slice k come from running the float slices 0..k-1 on
the recorded transformer inputs; each slice is quantized on its own; the quantized slices are joined back
into one model with the original inputs and outputs.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

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


def quantize_in_slices(model, samples: Iterable[dict], quantize_slice: Callable, slices: int,
                       log: Callable[[str], None] = print, workdir: Path | None = None):
    """``quantize_slice(slice_model, slice_samples, index)`` quantizes one slice; samples are streamed
    through the float slices from disk so only one slice and one sample are in memory at a time."""
    import gc

    import openvino as ov

    stage, block_count = stages(model)
    cuts = cuts_for(block_count, slices)
    bounds = [None, *cuts, None]
    scratch = Path(tempfile.mkdtemp(prefix="ovsd3-slices-", dir=workdir))
    core = ov.Core()
    try:
        current = scratch / "inputs_0"
        current.mkdir()
        count = 0
        for count, sample in enumerate(samples, 1):
            np.savez(current / f"{count:06d}.npz", **sample)
        quantized = []
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            piece = extract(model, stage, start, end)
            blocks = f"blocks {start or 0}-{(end or block_count) - 1}"
            log(f"      slice {index + 1}/{len(bounds) - 1} ({blocks})")
            inputs = _stream(current)
            # Calibrate each slice with static shapes (those of the samples) and give it its dynamic ones
            # back afterwards: OpenVINO's CPU plugin corrupted its heap running NNCF's statistics model of
            # a dynamic-shape middle slice of SD3 Medium (openvino 2026.4.1).
            dynamic = {p.get_friendly_name(): p.get_partial_shape() for p in piece.get_parameters()}
            first = next(iter(inputs))
            piece.reshape({name: ov.PartialShape(list(first[name].shape)) for name in dynamic})
            done = quantize_slice(piece, inputs, index)
            done.reshape({p.get_friendly_name(): dynamic[p.get_friendly_name()] for p in done.get_parameters()})
            quantized.append(done)
            if end is not None:  # the next slice's inputs: this slice's float outputs
                following = scratch / f"inputs_{index + 1}"
                following.mkdir()
                compiled = core.compile_model(piece, "CPU")
                for number, sample in enumerate(_stream(current), 1):
                    result = compiled(sample)
                    outputs = {name: result[port] for port in compiled.outputs for name in port.get_names()
                               if name.startswith(f"{CUT_PREFIX}{end}:")}
                    np.savez(following / f"{number:06d}.npz", **outputs)
                del compiled
                shutil.rmtree(current)
                current = following
            del piece
            gc.collect()
        return stitch(quantized)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _stream:
    """Re-iterable samples read from a folder of .npz files (NNCF goes over its dataset several times)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = sorted(folder.glob("*.npz"))

    def __iter__(self):
        for path in self.files:
            with np.load(path) as arrays:
                yield {name: arrays[name] for name in arrays.files}

    def __len__(self):
        return len(self.files)
