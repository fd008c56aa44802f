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

import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ovsd3.atomic import scratch_folder
from ovsd3.ir.slicing import CUT_PREFIX, cuts_for, extract, stages, stitch


def quantize_in_slices(model, samples: Iterable[dict], quantize_slice: Callable, slices: int,
                       log: Callable[[str], None] = print):
    """``quantize_slice(slice_model, slice_samples, index)`` quantizes one slice; samples are streamed
    through the float slices from disk so only one slice and one sample are in memory at a time."""
    import gc

    import openvino as ov

    stage, block_count = stages(model)
    cuts = cuts_for(block_count, slices)
    bounds = [None, *cuts, None]
    core = ov.Core()
    # the recorded inputs of each slice, on disk; a killed run's folder is cleared by the next one
    with scratch_folder("ovsd3-slices") as scratch:
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
