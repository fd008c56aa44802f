"""SD3 ControlNet: converted beside the transformer and drawn as diffusers' StableDiffusion3ControlNetPipeline
draws (same tiny weights, latents, control images; fp32 IR), for both kinds of SD3ControlNetModel: SD3 Medium's
(InstantX: its own position embedding, zero pooled input) and SD3.5 Large's (use_pos_embed=False: the
transformer's patch embedding; the prompt's pooled input)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from helpers import last_line
from ovsd3 import layout
from ovsd3.cli import main
from ovsd3.errors import InvalidRequest, OvsdError
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.controlnet import block_residuals

MIN_PSNR = 100.0  # the issue asks 35 dB; measured 127-132 dB against diffusers with the same T5
CALL = dict(prompt="a red digit on grey", num_inference_steps=3, guidance_scale=4.0, output_type="np",
            width=64, height=64)


def _randomised(controlnet, seed: int):
    """controlnet_blocks and pos_embed_input start at zero (no effect): random weights make the control count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [*controlnet.controlnet_blocks.parameters(), *controlnet.pos_embed_input.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return controlnet


@pytest.fixture(scope="module")
def controlnets(workdir, tiny_sd3) -> dict[str, Path]:
    """Both kinds, saved as diffusers folders."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    torch.manual_seed(0)
    medium = _randomised(SD3ControlNetModel.from_transformer(transformer, num_layers=1,
                                                             num_extra_conditioning_channels=0), 1)
    config = {key: value for key, value in transformer.config.items() if not key.startswith("_")}
    large = SD3ControlNetModel.from_config({**config, "num_layers": 1, "use_pos_embed": False,
                                            "force_zeros_for_pooled_projection": False})
    large.load_state_dict(medium.state_dict(), strict=False)
    large = _randomised(large, 2)
    folders = {"medium": workdir / "cn-medium", "large": workdir / "cn-large"}
    medium.save_pretrained(folders["medium"])
    large.save_pretrained(folders["large"])
    return folders


@pytest.fixture(scope="module")
def folders(workdir, tiny_sd3, ov_sd3_fp32, controlnets) -> dict[str, Path]:
    """medium, large: one ControlNet each; both: [medium, large]. Two ControlNet exports, the rest copied."""
    from ovsd3.convert.controlnet import convert_controlnet
    from ovsd3.convert.export import ExportOptions
    from ovsd3.convert.source import ModelSource

    source, options = ModelSource.open(str(tiny_sd3)), ExportOptions(weight_format="fp32")
    both = Path(shutil.copytree(ov_sd3_fp32, workdir / "ov-cn-both"))
    convert_controlnet(source, controlnets["medium"], 0, both, options)
    convert_controlnet(source, controlnets["large"], 1, both, options)
    made = {"both": both}
    for kind, component in (("medium", "controlnet"), ("large", "controlnet_1")):
        folder = Path(shutil.copytree(ov_sd3_fp32, workdir / f"ov-cn-{kind}"))
        shutil.copytree(both / component, folder / layout.CONTROLNET)
        made[kind] = folder
    return made


def control_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def ovsd3_images(folder: Path, **call) -> np.ndarray:
    pipe = SD3Pipeline.from_pretrained(folder, precision="f32", cache_dir=None)
    torch.manual_seed(11)  # diffusers samples the control images' posteriors from torch's global generator
    return pipe(generator=torch.Generator().manual_seed(3), **{**CALL, **call}).images


def diffusers_images(tiny_sd3: Path, controlnet_folders: list[Path], **call) -> np.ndarray:
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    nets = [SD3ControlNetModel.from_pretrained(folder) for folder in controlnet_folders]
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        tiny_sd3, controlnet=nets if len(nets) > 1 else nets[0])
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(11)
    return pipe(generator=torch.Generator().manual_seed(3), **{**CALL, **call}).images


def db(expected, got) -> float:
    return psnr(np.asarray(expected, np.float64), np.asarray(got, np.float64), data_range=1.0)


@pytest.mark.parametrize("kind", ["medium", "large"])
def test_one_controlnet_draws_diffusers_picture(kind, folders, controlnets, tiny_sd3, ov_sd3_fp32):
    image = control_images(1)[0]
    got = ovsd3_images(folders[kind], control_image=image, controlnet_conditioning_scale=0.8)
    expected = diffusers_images(tiny_sd3, [controlnets[kind]], control_image=image, controlnet_conditioning_scale=0.8)
    assert db(expected, got) >= MIN_PSNR
    assert db(ovsd3_images(ov_sd3_fp32), got) < 30.0  # the control changes the picture


def test_two_controlnets_draw_diffusers_picture(folders, controlnets, tiny_sd3):
    call = dict(control_image=control_images(2), controlnet_conditioning_scale=[0.7, 1.3],
                control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 0.7])
    got = ovsd3_images(folders["both"], **call)
    expected = diffusers_images(tiny_sd3, [controlnets["medium"], controlnets["large"]], **call)
    assert db(expected, got) >= MIN_PSNR


def test_scale_zero_and_no_control_draw_the_plain_picture(folders, ov_sd3_fp32):
    plain = ovsd3_images(ov_sd3_fp32)
    np.testing.assert_array_equal(ovsd3_images(folders["both"]), plain)  # a folder with ControlNets, no control
    np.testing.assert_array_equal(ovsd3_images(folders["both"], control_image=control_images(2),
                                               controlnet_conditioning_scale=0.0), plain)


def test_control_composes_with_image_to_image_inpainting_and_step_caching(folders, monkeypatch):
    from ovsd3.runtime.controlnet import ControlNet

    calls = []
    original = ControlNet.__call__
    monkeypatch.setattr(ControlNet, "__call__", lambda net, inputs: calls.append(1) or original(net, inputs))
    start, mask = control_images(1)[0], Image.new("L", (64, 64), 255)
    pipe = SD3Pipeline.from_pretrained(folders["medium"], precision="f32", cache_dir=None)
    for extra in (dict(image=start, strength=0.8), dict(image=start, mask_image=mask, strength=0.8)):
        with_control = pipe(seed=1, control_image=start, **{**CALL, **extra}).images
        without = pipe(seed=1, **{**CALL, **extra}).images
        assert np.isfinite(with_control).all() and db(without, with_control) < 30.0
    calls.clear()
    result = pipe(seed=1, control_image=start, cache="taylorseer:interval=2,before=1,after=-1",
                  **{**CALL, "num_inference_steps": 6})
    stats = result.cache_stats
    assert stats.full_calls < stats.steps and len(calls) == stats.full_calls  # a skipped step skips the ControlNet
    result = pipe(seed=1, control_image=start, cache="first-block-cache:threshold=0.99,before=1",
                  **{**CALL, "num_inference_steps": 6})
    assert np.isfinite(result.images).all() and result.cache_stats.partial_calls > 0


def test_residuals_go_to_blocks_as_in_diffusers():
    """diffusers: block i takes residual int(i / (blocks / residuals)); the last block takes none."""
    samples = [[np.full((1, 1, 1), value, np.float32) for value in (1.0, 2.0)],
               [np.full((1, 1, 1), value, np.float32) for value in (10.0, 20.0, 30.0)]]
    residuals = block_residuals(samples, [1.0, 0.5], block_count=6)
    got = [float(residuals[f"controlnet_residual.{block}"][0, 0, 0]) for block in range(5)]
    assert got == [1 + 5, 1 + 5, 1 + 10, 2 + 10, 2 + 15]
    assert "controlnet_residual.5" not in residuals


def test_the_derived_transformer_adds_diffusers_residuals(ov_sd3_fp32, tiny_sd3):
    import openvino as ov
    from diffusers import SD3Transformer2DModel

    from ovsd3.ir.controlnet import add_controlnet_residuals

    core, xml = ov.Core(), layout.model_xml(ov_sd3_fp32, layout.TRANSFORMER)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    plain = core.compile_model(core.read_model(xml), "CPU", config)
    controlled = core.compile_model(add_controlnet_residuals(core.read_model(xml), 2), "CPU", config)
    rng = np.random.default_rng(0)
    inputs = {"hidden_states": rng.standard_normal((2, 16, 8, 8), dtype=np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 48), dtype=np.float32),
              "pooled_projections": rng.standard_normal((2, 40), dtype=np.float32),
              "timestep": np.array([500.0, 200.0], np.float32)}
    residual = rng.standard_normal((2, 16, 32), dtype=np.float32)
    zeros = controlled({**inputs, "controlnet_residual.0": np.zeros_like(residual)})[0]
    np.testing.assert_allclose(zeros, plain(inputs)[0], atol=1e-6)
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    with torch.no_grad():
        expected = transformer(**{name: torch.from_numpy(value) for name, value in inputs.items()},
                               block_controlnet_hidden_states=[torch.from_numpy(residual)]).sample.numpy()
    np.testing.assert_allclose(controlled({**inputs, "controlnet_residual.0": residual})[0], expected, atol=1e-4)


def test_the_folder_stays_what_optimum_intel_and_genai_read(folders, ov_sd3_fp32):
    assert (folders["both"] / layout.MODEL_INDEX).read_text() == (ov_sd3_fp32 / layout.MODEL_INDEX).read_text()
    model = layout.ModelFolder.open(folders["both"])
    assert [config["use_pos_embed"] for config in model.controlnet_configs] == [True, False]
    assert layout.unexpected_file(folders["both"], layout.MODEL_FOLDER_FILES) is None


def test_damaged_controlnet_folders_are_refused(folders, tmp_path):
    folder = Path(shutil.copytree(folders["both"], tmp_path / "gap"))
    (folder / "controlnet_1").rename(folder / "controlnet_2")
    with pytest.raises(OvsdError, match="controlnet_2/ follows no controlnet_1/"):
        layout.ModelFolder.open(folder)
    (folder / "controlnet_2").rename(folder / "controlnet_1")
    config_path = folder / "controlnet_1" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_attention_heads": 3}))
    with pytest.raises(OvsdError, match="num_attention_heads x attention_head_dim is 48, but the transformer's is 32"):
        layout.ModelFolder.open(folder)


@pytest.fixture(scope="module")
def both_pipe(folders):
    return SD3Pipeline.from_pretrained(folders["both"], cache_dir=None)


@pytest.mark.parametrize("settings_, message", [
    (dict(control_image=control_images(1)), "control_image has 1 image\\(s\\) for 2 ControlNet\\(s\\)"),
    (dict(control_image=control_images(2), controlnet_conditioning_scale=float("nan")),
     "controlnet_conditioning_scale must be from 0 to 100"),
    (dict(control_image=control_images(2), controlnet_conditioning_scale=-0.5),
     "controlnet_conditioning_scale must be from 0 to 100"),
    (dict(control_image=control_images(2), controlnet_conditioning_scale="1"),
     "controlnet_conditioning_scale must be a number"),
    (dict(control_image=control_images(2), controlnet_conditioning_scale=[1.0, 1.0, 1.0]),
     "controlnet_conditioning_scale has 3 values for 2 ControlNet"),
    (dict(control_image=control_images(2), control_guidance_start=0.6, control_guidance_end=0.6),
     "control_guidance_start \\(0.6\\) must be below control_guidance_end"),
    (dict(control_image=control_images(2), control_guidance_end=1.5), "control_guidance_end must be from 0 to 1"),
    (dict(controlnet_conditioning_scale=0.5), "controlnet_conditioning_scale needs a control_image"),
    (dict(control_image=[]), "control_image is an empty list"),
    (dict(control_image=control_images(2), controlnet_pooled_projections=np.zeros((1, 7))),
     "controlnet_pooled_projections must be"),
    (dict(control_image=[control_images(1)[0], 3]), "control_image\\[1\\] must be"),
])
def test_bad_control_requests_are_refused_in_one_line(both_pipe, settings_, message):
    with pytest.raises(InvalidRequest, match=message) as refused:
        both_pipe.prepare("a cat", num_inference_steps=2, width=64, height=64, **settings_)
    assert "\n" not in str(refused.value)


def test_control_image_without_a_controlnet_is_refused(ov_sd3_fp32):
    pipe = SD3Pipeline.from_pretrained(ov_sd3_fp32, cache_dir=None)
    with pytest.raises(InvalidRequest, match="has no ControlNet"):
        pipe.prepare("a cat", control_image=control_images(1)[0], width=64, height=64)


number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=2),
                   st.none(), st.booleans())
values = st.one_of(number, st.lists(number, max_size=3))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scale=values, start=values, end=values)
def test_any_control_numbers_run_or_are_refused_in_one_line(scale, start, end):
    """Request-level checks (no folder): whatever is given, a Request or one InvalidRequest line."""
    from ovsd3.runtime.request import Request

    try:
        Request.of("a cat", control_image=control_images(1)[0], controlnet_conditioning_scale=scale,
                   control_guidance_start=start, control_guidance_end=end)
    except InvalidRequest as error:
        assert "\n" not in str(error)


def test_cli_runs_with_control_and_refuses_bad_files(folders, tmp_path, capsys):
    paths = []
    for index, image in enumerate(control_images(2)):
        paths += ["--control-image", str(tmp_path / f"c{index}.png")]
        image.save(tmp_path / f"c{index}.png")
    run = ["run", str(folders["both"]), "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64",
           "--no-cache", "--output", str(tmp_path / "out")]
    assert main(run + paths + ["--controlnet-scale", "0.5", "--control-end", "0.5"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    (tmp_path / "bad.png").write_text("not a picture")
    assert main(run + paths[:2] + ["--control-image", str(tmp_path / "bad.png")]) == 2
    assert "bad.png" in last_line(capsys)
    assert main(run + paths[:2]) == 2
    assert "1 time(s) for 2 ControlNet(s)" in last_line(capsys)
    assert main(run + paths + ["--control-start", "0.9", "--control-end", "0.1"]) == 2
    assert "must be below control_guidance_end" in last_line(capsys)


def test_convert_refuses_a_bad_controlnet_before_any_export(tiny_sd3, tmp_path, capsys, controlnets):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_sd3), str(out), "--controlnet", str(tmp_path / "missing")]) == 2
    assert "neither an existing folder nor a model hub id" in last_line(capsys)
    wrong = Path(shutil.copytree(controlnets["medium"], tmp_path / "wrong"))
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "in_channels": 4}))
    assert main(["convert", str(tiny_sd3), str(out), "--controlnet", str(wrong)]) == 2
    assert "in_channels is 4, but the transformer's is 16" in last_line(capsys)
    assert not out.exists()
