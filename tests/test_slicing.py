"""Cutting the transformer IR at block boundaries and joining it back changes nothing."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from ovsd3 import layout
from ovsd3.convert.components import transformer_parity_inputs
from ovsd3.ir.slicing import cuts_for, extract, stages, stitch

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def sample(folder, batch: int = 2) -> dict:
    import json
    from types import SimpleNamespace

    config = SimpleNamespace(**json.loads((folder / layout.TRANSFORMER / "config.json").read_text()))
    inputs = transformer_parity_inputs(config, np.random.default_rng(0))
    return {name: np.concatenate([value] * batch) * (1 if name == "timestep" else 0.7) for name, value in inputs.items()}


@pytest.mark.parametrize("folder_fixture", ["ov_sd3", "ov_sd35"])
def test_float_slices_run_in_sequence_and_stitched_are_exact(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    core = ov.Core()
    model = core.read_model(layout.model_xml(folder, layout.TRANSFORMER))
    inputs = sample(folder)
    expected = core.compile_model(model, "CPU", F32)(inputs)[0]

    stage, block_count = stages(model)
    assert block_count == 2 and cuts_for(block_count, 2) == [1]
    first, second = extract(model, stage, None, 1), extract(model, stage, 1, None)
    assert {p.get_friendly_name() for p in first.get_parameters()} == {p.any_name for p in model.inputs}
    assert all(p.get_friendly_name().startswith("ovsd3_cut1:") for p in second.get_parameters())
    compiled = core.compile_model(first, "CPU", F32)
    result = compiled(inputs)
    middle = {name: result[port] for port in compiled.outputs for name in port.get_names()}
    np.testing.assert_array_equal(core.compile_model(second, "CPU", F32)(middle)[0], expected)

    joined = stitch([extract(model, stage, None, 1), extract(model, stage, 1, None)])
    assert sorted(p.any_name for p in joined.inputs) == sorted(p.any_name for p in model.inputs)
    assert [o.any_name for o in joined.outputs] == ["out_sample"]
    assert len(joined.get_ops()) == len(model.get_ops())
    np.testing.assert_array_equal(core.compile_model(joined, "CPU", F32)(inputs)[0], expected)


def test_three_slices_pass_tensors_through_the_middle_one(ov_sd3):
    """With a middle slice, tensors made in the first and used in the last (the shared timestep
    embedding) pass through it; its outputs must keep both their input and output names."""
    core = ov.Core()
    model = core.read_model(layout.model_xml(ov_sd3, layout.TRANSFORMER))
    stage, _ = stages(model)
    # Two blocks give cuts at 1 and at "2" (after the last block, before the final norm and projection).
    pieces = [extract(model, stage, None, 1), extract(model, stage, 1, 2), extract(model, stage, 2, None)]
    inputs = sample(ov_sd3)
    values = inputs
    for index, piece in enumerate(pieces):
        compiled = core.compile_model(piece, "CPU", F32)
        result = compiled(values)
        if index < 2:
            prefix = f"ovsd3_cut{index + 1}:"
            values = {name: result[port] for port in compiled.outputs for name in port.get_names()
                      if name.startswith(prefix)}
    expected = core.compile_model(model, "CPU", F32)(inputs)[0]
    np.testing.assert_array_equal(result[0], expected)
    joined = stitch([extract(model, stage, None, 1), extract(model, stage, 1, 2), extract(model, stage, 2, None)])
    np.testing.assert_array_equal(core.compile_model(joined, "CPU", F32)(inputs)[0], expected)


def test_slice_counts():
    from ovsd3.quantize.transformer import slice_count

    assert cuts_for(24, 4) == [6, 12, 18] and cuts_for(2, 8) == [1] and cuts_for(24, 1) == []
    assert slice_count(4_172_000_000) == 4 and slice_count(500_000) == 1
