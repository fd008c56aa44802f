"""Each model's recommended sampler settings, recorded at convert time and used when a request names none:
SD3.5 Large 28 steps at guidance 3.5, Large Turbo 4 steps without guidance, Medium 40 steps at 4.5 with
skip-layer guidance on blocks 7, 8 and 9, SD3 Medium diffusers' 28 at 7.0."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovsd3 import layout
from ovsd3.cli import EXIT_ERROR, main
from ovsd3.presets import get_preset
from ovsd3.runtime import SD3Pipeline

SIZE = dict(width=64, height=64)


@pytest.mark.parametrize("preset, name, expected", [
    ("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", (28, 7.0, None)),
    ("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", (28, 3.5, None)),
    ("sd3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo", (4, 0.0, None)),
    ("sd3.5-large", "/models/SD3.5-Large-Turbo", (4, 0.0, None)),
    ("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", (40, 4.5, (7, 8, 9))),
    ("tiny-sd3.5", "tiny", (40, 4.5, None)),  # Medium's shape with 2 blocks: no blocks 7-9 to skip
])
def test_model_card_defaults_by_architecture(preset, name, expected):
    defaults = layout.model_card_defaults(name, get_preset(preset).transformer.diffusers_config())
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.skip_guidance_layers) == expected
    assert defaults.sampler == "euler"


@pytest.fixture(scope="module")
def ov_turbo(workdir) -> Path:
    """A tiny SD3.5 Large (QK norm, no dual attention) whose folder name says Turbo, converted."""
    from ovsd3.convert import ConvertRequest, convert_model
    from ovsd3.synthetic import save_random_pipeline

    tiny = get_preset("tiny-sd3.5")
    large_shape = dataclasses.replace(tiny, transformer=dataclasses.replace(tiny.transformer,
                                                                           dual_attention_layers=()))
    source = save_random_pipeline(large_shape, workdir / "tiny-sd3.5-large-turbo", seed=4, with_t5=False)
    out = workdir / "ov-large-turbo"
    convert_model(ConvertRequest(model=str(source), output=out, with_t5=False), log=lambda line: None)
    return out


def test_convert_records_the_card_defaults(ov_turbo, ov_sd35, ov_sd3):
    assert layout.FolderRecord.load(ov_turbo).defaults == layout.SD35_LARGE_TURBO_DEFAULTS
    assert layout.FolderRecord.load(ov_sd35).defaults == layout.GenerationDefaults(40, 4.5)
    assert layout.FolderRecord.load(ov_sd3).defaults == layout.GenerationDefaults()


def test_run_uses_the_turbo_defaults(ov_turbo, tmp_path):
    assert main(["run", str(ov_turbo), "--prompt", "a cat", "--seed", "3", "--width", "64", "--height", "64",
                 "--no-cache", "--output", str(tmp_path)]) == 0
    settings = json.loads(Image.open(next(tmp_path.glob("*.png"))).info["ovsd3"])
    assert settings["num_inference_steps"] == 4 and settings["guidance_scale"] == 0.0


def test_a_folder_without_a_record_takes_its_defaults_from_the_model_index(ov_turbo, tmp_path):
    folder = tmp_path / "optimum-style"
    shutil.copytree(ov_turbo, folder)
    (folder / layout.OVSD3_RECORD).unlink()
    index = json.loads((folder / layout.MODEL_INDEX).read_text())
    (folder / layout.MODEL_INDEX).write_text(json.dumps({**index, "_name_or_path": "someone/sd35-large"}))
    assert layout.ModelFolder.open(folder).record.defaults == layout.SD35_LARGE_DEFAULTS
    (folder / layout.MODEL_INDEX).write_text(json.dumps({**index, "_name_or_path": "someone/sd35-large-turbo"}))
    assert layout.ModelFolder.open(folder).record.defaults == layout.SD35_LARGE_TURBO_DEFAULTS


@pytest.fixture(scope="module")
def slg_folder(ov_sd35, tmp_path_factory) -> Path:
    """ov_sd35 with a folder default of skip-layer guidance on block 1 (as Medium's card has 7, 8, 9)."""
    folder = tmp_path_factory.mktemp("slg") / "sd35-slg"
    shutil.copytree(ov_sd35, folder)
    record = json.loads((folder / layout.OVSD3_RECORD).read_text())
    record["defaults"]["skip_guidance_layers"] = [1]
    (folder / layout.OVSD3_RECORD).write_text(json.dumps(record))
    return folder


def test_the_folders_skip_layer_guidance_applies_unless_the_request_says(slg_folder, ov_sd35):
    with_default = SD3Pipeline.load(slg_folder, device="CPU", cache_dir=None)
    plain = SD3Pipeline.load(ov_sd35, device="CPU", cache_dir=None)
    assert with_default.defaults.skip_guidance_layers == (1,)
    call = dict(prompt="a cat", num_inference_steps=6, guidance_scale=4.0, seed=2, output_type="np",
                skip_layer_guidance_stop=0.5, **SIZE)
    by_default = with_default(**call).images
    assert np.array_equal(by_default, plain(**call, skip_guidance_layers=[1]).images)
    assert not np.array_equal(by_default, plain(**call).images)
    assert np.array_equal(with_default(**call, skip_guidance_layers=[]).images, plain(**call).images)  # off
    # A step cache keeps it (tests/test_skip_layer_guidance.py measures the cached pictures)
    assert np.array_equal(with_default(**call, cache="fast").images,
                          plain(**call, cache="fast", skip_guidance_layers=[1]).images)
    # Unguided calls have no guidance to add it to.
    unguided = {**call, "guidance_scale": 1.0}
    assert np.array_equal(with_default(**unguided).images, plain(**unguided).images)


def test_skip_layers_none_on_the_command_line(slg_folder, ov_sd35, tmp_path):
    common = ["--prompt", "a cat", "--steps", "6", "--seed", "1", "--width", "64", "--height", "64",
              "--guidance", "4", "--no-cache"]
    assert main(["run", str(slg_folder), *common, "--skip-layers", "none", "--output", str(tmp_path / "a")]) == 0
    assert main(["run", str(ov_sd35), *common, "--output", str(tmp_path / "b")]) == 0
    assert main(["run", str(slg_folder), *common, "--output", str(tmp_path / "c")]) == 0
    pixels = {name: np.asarray(Image.open(next((tmp_path / name).glob("*.png")))) for name in "abc"}
    assert np.array_equal(pixels["a"], pixels["b"]) and not np.array_equal(pixels["a"], pixels["c"])
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["run", str(slg_folder), *common, "--skip-layers", "x", "--output", str(tmp_path / "d")])
    assert exited.value.code == EXIT_ERROR and not (tmp_path / "d").exists()


def test_a_static_pipeline_leaves_the_folders_skip_layer_guidance_out(slg_folder, ov_sd35):
    """Skip-layer guidance needs a second transformer variant that static shapes (NPU) do not have: the folder's
    default steps aside there, as it does for a step cache, instead of failing every guided call."""
    from ovsd3.runtime.pipeline import StaticShape

    static = StaticShape(width=64, height=64, batch=1, guidance=True)
    call = dict(prompt="a cat", num_inference_steps=6, guidance_scale=4.0, seed=2, output_type="np",
                skip_layer_guidance_stop=0.5, **SIZE)
    with_default = SD3Pipeline.load(slg_folder, device="CPU", cache_dir=None, static=static)
    plain = SD3Pipeline.load(ov_sd35, device="CPU", cache_dir=None, static=static)
    assert np.array_equal(with_default(**call).images, plain(**call).images)
