"""LoRA adapters as side branches (branch mode): on quantized folders against the FP16 folder with the same
adapters merged, on an FP16 folder against merge mode, and new adapter weights without a compile."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovsd3.errors import InvalidRequest
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.adapters import LORA_MODES, parse_lora_mode

CALL = dict(num_inference_steps=4, guidance_scale=3.0, output_type="np", width=64, height=64)
SAME = 40.0  # dB: branch and merge differ by float rounding only (measured 86 dB)
WEIGHTS = {"one": {"a": 1.0}, "two": {"a": 0.7, "b": -0.5}}



def _weights_compressed(source: Path, out: Path, **options) -> Path:
    """``source`` with its transformer's weights compressed by NNCF (as `ovsd3 quantize --transformer-weights`)."""
    import nncf
    import openvino as ov

    shutil.copytree(source, out)
    xml = Path("transformer") / "openvino_model.xml"
    model = nncf.compress_weights(ov.Core().read_model(source / xml), **options)
    ov.save_model(model, out / xml, compress_to_fp16=False)
    return out


@pytest.fixture(scope="module")
def w8_sd3(ov_sd3, tmp_path_factory) -> Path:
    import nncf

    return _weights_compressed(ov_sd3, tmp_path_factory.mktemp("w8") / "w8-sd3",
                               mode=nncf.CompressWeightsMode.INT8_ASYM)


@pytest.fixture(scope="module")
def w4_sd3(ov_sd3, tmp_path_factory) -> Path:
    import nncf

    return _weights_compressed(ov_sd3, tmp_path_factory.mktemp("w4") / "w4-sd3",
                               mode=nncf.CompressWeightsMode.INT4_SYM, group_size=8, ratio=1.0)


def _chosen(adapters, weights: dict) -> list[tuple[Path, float]]:
    return [(adapters[name], weight) for name, weight in weights.items()]


def draw(folder: Path, adapters=None, lora_mode=None, **call) -> tuple[SD3Pipeline, np.ndarray]:
    pipe = SD3Pipeline.load(folder, cache_dir=None, adapters=adapters, lora_mode=lora_mode)
    return pipe, pipe("a cat", seed=1, **{**CALL, **call}).images.astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(a, b, data_range=1.0)


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_branches_on_a_float_folder_draw_the_merged_picture(ov_sd3, adapters, weights):
    _, plain = draw(ov_sd3)
    merged_pipe, merged = draw(ov_sd3, _chosen(adapters, weights))
    branch_pipe, branched = draw(ov_sd3, _chosen(adapters, weights), lora_mode="branch")
    assert (merged_pipe.lora_mode_used, branch_pipe.lora_mode_used) == ("merge", "branch")
    assert _psnr(merged, branched) >= SAME
    assert _psnr(plain, branched) < 30  # the adapters changed the picture


@pytest.fixture(scope="module")
def fp16_pictures(ov_sd3, adapters) -> dict:
    """The FP16 folder's pictures: plain, and with each set of WEIGHTS merged."""
    pictures = {"plain": draw(ov_sd3)[1]}
    for name, weights in WEIGHTS.items():
        pipe, pictures[name] = draw(ov_sd3, _chosen(adapters, weights))
        assert pipe.lora_mode_used == "merge"
    return pictures


# dB the adapters may cost a quantized folder against the FP16 folder with them merged, beyond what quantizing
# costs without them: the 1 dB. INT4 weights alone (INT8 activations nowhere, text encoders and VAE
# FP16) draw within 53.6 dB of FP16 here, so close that the strong random adapters (which make the activations,
# and so the weights' rounding error, larger) move it by more: measured with adapter a, branch 50.7 dB, and the
# FP16 folder with it merged, then compressed alike (what a user re-quantizing for each adapter gets) 52.2 dB.
SLACK = {"q_sd3": 1.0, "w8_sd3": 1.0, "w4_sd3": 3.5}


@pytest.mark.parametrize("quantized", SLACK, ids=["int8", "int8-weights", "int4-weights"])
def test_quantized_folders_take_adapters_as_branches(request, quantized, adapters, fp16_pictures):
    """INT8 (FakeQuantize after a SmoothQuant multiply: the branch reads the layer's input before both) and
    weight-compressed folders, one adapter and two, against the FP16 folder with them merged."""
    pipe, plain = draw(request.getfixturevalue(quantized))
    quantizing = _psnr(plain, fp16_pictures["plain"])
    for name, weights in WEIGHTS.items():
        pipe.set_adapters(*zip(*_chosen(adapters, weights)))  # branch mode picked by itself
        assert pipe.lora_mode_used == "branch"
        with_adapters = pipe("a cat", seed=1, **CALL).images.astype(np.float64)
        agreement = _psnr(with_adapters, fp16_pictures[name])
        assert agreement >= quantizing - SLACK[quantized], (name, agreement, quantizing)
        assert _psnr(with_adapters, plain) < 30  # the adapters changed the picture


def _counted(pipe, monkeypatch) -> list:
    """Every compile and IR read of ``pipe``'s compiler from now on."""
    calls = []
    core = pipe._compiler.core
    for name in ("compile_model", "read_model"):
        original = getattr(core, name)
        monkeypatch.setattr(core, name, lambda *args, _name=name, _original=original: calls.append(_name)
                            or _original(*args))
    return calls


def test_new_adapter_weights_do_not_recompile(q_sd3, adapters, monkeypatch):
    pipe, first = draw(q_sd3, _chosen(adapters, {"a": 1.0, "b": 1.0}))
    calls = _counted(pipe, monkeypatch)
    pipe.set_adapters([adapters["a"], adapters["b"]], adapter_weights=[0.7, -0.5])
    got = pipe("a cat", seed=1, **CALL).images.astype(np.float64)
    assert calls == []  # no compile, no read: only the scale inputs changed
    assert pipe.adapters[1].weight == -0.5
    _, fresh = draw(q_sd3, _chosen(adapters, WEIGHTS["two"]))
    assert _psnr(got, fresh) >= 80  # what a pipeline loaded with those weights draws
    assert _psnr(got, first) < 40
    with pytest.raises(InvalidRequest, match="beyond FP16's range: lower the weight"):
        pipe.set_adapters([adapters["a"], adapters["b"]], adapter_weights=[1e30, 1.0])
    assert pipe.adapters[1].weight == -0.5  # a refusal changes nothing
    pipe.set_adapters([adapters["b"]])  # other adapters: other branches, compiled again (the counter sees it)
    pipe("a cat", seed=1, **CALL)
    assert "compile_model" in calls


def test_step_caching_and_skip_layers_keep_the_branches(ov_sd3, adapters):
    """First-block caching runs the transformer in two slices, skip-layer guidance a variant: each keeps the
    branches and their scale inputs."""
    chosen = _chosen(adapters, WEIGHTS["two"])
    for call in (dict(cache="first-block-cache", num_inference_steps=6), dict(skip_guidance_layers=[1])):
        _, merged = draw(ov_sd3, chosen, **call)
        _, branched = draw(ov_sd3, chosen, lora_mode="branch", **call)
        assert _psnr(merged, branched) >= SAME, call


def test_a_quantized_folder_on_the_command_line(q_sd3, adapters, tmp_path, capsys):
    from ovsd3.cli import main

    common = ["run", str(q_sd3), "--prompt", "a cat", "--steps", "2", "--seed", "4", "--width", "64", "--height",
              "64", "--no-cache"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--lora", f"{adapters['a']}:0.8", "--output", str(tmp_path / "lora")]) == 0
    assert "--lora applied as side branches" in capsys.readouterr().err
    from ovsd3.serve.jobs import load_pipeline

    assert load_pipeline(q_sd3, "CPU", [adapters["a"]], 1, "branch")().lora_mode_used == "branch"  # serve's load
    (plain,), (lora,) = (list((tmp_path / name).glob("*.png")) for name in ("plain", "lora"))
    assert plain.read_bytes() != lora.read_bytes()


@pytest.mark.parametrize("mode", ["fuse", "", "MERGE", "branch ", "dynamic"])
@pytest.mark.parametrize("command", ["run", "serve"])
def test_bad_lora_modes_are_one_line_errors(ov_sd3, adapters, tmp_path, capsys, nothing_loads, command, mode):
    from ovsd3.cli import EXIT_ERROR, main

    extra = ["--prompt", "a cat", "--output", str(tmp_path / "out")] if command == "run" else []
    code = main([command, str(ov_sd3), *extra, "--lora", str(adapters["a"]), "--lora-mode", mode])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(error) == 1, error
    assert "--lora-mode must be one of merge, branch" in error[0], error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "serve"])
def test_merging_into_a_quantized_folder_is_refused(q_sd3, adapters, tmp_path, capsys, command):
    from ovsd3.cli import EXIT_ERROR, main

    extra = ["--prompt", "a cat", "--no-cache", "--output", str(tmp_path / "out")] if command == "run" else \
        ["--port", "8791"]
    code = main([command, str(q_sd3), *extra, "--lora", str(adapters["a"]), "--lora-mode", "merge"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and error and "weights are quantized" in error[-1], error
    assert "--lora-mode branch" in error[-1] and not any("Traceback" in line for line in error), error
    assert len(error) == 1 or command == "serve", error  # serve says it is loading first
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidRequest, match="use lora_mode branch"):
        SD3Pipeline.load(q_sd3, cache_dir=None, adapters=[(adapters["a"], 1.0)], lora_mode="merge")


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.one_of(st.none(), st.sampled_from(LORA_MODES), st.text(max_size=8), st.integers(), st.floats(),
                 st.booleans(), st.lists(st.sampled_from(LORA_MODES), max_size=2)))
def test_any_lora_mode_is_taken_or_refused_in_one_line(mode):
    try:
        assert parse_lora_mode(mode) == mode and mode in (None, *LORA_MODES)
    except InvalidRequest as error:
        assert mode not in (None, *LORA_MODES)
        assert "\n" not in str(error) and str(error).startswith("lora_mode must be one of merge, branch")


@pytest.fixture(scope="module")
def branch_pipe(ov_sd3, adapters) -> SD3Pipeline:
    return SD3Pipeline.load(ov_sd3, cache_dir=None, adapters=_chosen(adapters, {"a": 1.0, "b": 1.0}),
                            lora_mode="branch")


@settings(max_examples=25, derandomize=True, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-10**40, 10**40), st.text(max_size=6)), min_size=2, max_size=2))
def test_any_new_weights_are_taken_or_refused_in_one_line(branch_pipe, adapters, weights):
    """New weights for branch adapters: finite and within what the branches can carry, taken without a compile;
    otherwise one line, and the weights in use stay."""
    before = branch_pipe.adapters
    try:
        branch_pipe.set_adapters([adapters["a"], adapters["b"]], adapter_weights=weights)
    except InvalidRequest as error:
        assert "\n" not in str(error) and branch_pipe.adapters == before
        assert branch_pipe._compiler.fixed_inputs["lora_scale_0"] == np.float32(before[0].weight)
        return
    assert [adapter.weight for adapter in branch_pipe.adapters] == [float(weight) for weight in weights]
    assert np.isfinite([float(weight) for weight in weights]).all()
    assert branch_pipe._compiler.fixed_inputs["lora_scale_1"] == np.float32(weights[1])
