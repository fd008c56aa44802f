"""`ovsd3 run` answers bad input with one line and exit code 2."""

from __future__ import annotations

import shutil

import pytest

from ovsd3.cli import EXIT_ERROR, main
from ovsd3.errors import OvsdError
from ovsd3.runtime.devices import DevicePlan


def absent_device() -> str:
    """A device OpenVINO knows that this machine lacks (an Intel laptop has a GPU, some an NPU too)."""
    import openvino as ov

    present = {name.split(".")[0] for name in ov.Core().available_devices}
    return next(name for name in ("NPU", "GPU", "FPGA") if name not in present)


ABSENT = absent_device()


def run_cli(capsys, folder, *extra) -> tuple[int, str]:
    code = main(["run", str(folder), "--prompt", "a cat", "--no-cache", "--steps", "2", *map(str, extra)])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, needle", [
    (("--width", "72", "--height", "64"), "multiples of 16 (got 72x64)"),
    (("--steps", "0"), "steps must be between 1 and 1000"),
    (("--steps", "1000000000"), "steps must be between 1 and 1000"),
    (("--num-images", "10000"), "prompts x images at most 64"),
    (("--guidance", "nan"), "guidance must be a number from 0 to 100"),
    (("--guidance", "inf"), "guidance must be a number from 0 to 100"),
    (("--width", "0", "--height", "64"), "positive multiples of 16"),
    (("--clip-skip", "-1"), "clip_skip must not be negative"),
    (("--image", "{image}", "--strength", "1.5"), "strength must be between 0 and 1"),
    (("--image", "{image}", "--strength", "-0.1"), "strength must be between 0 and 1"),
    (("--device", ABSENT), f"device {ABSENT} is not available here"),
    (("--device", f"transformer={ABSENT}"), f"device {ABSENT} is not available here"),
    (("--device", "unet=CPU"), "unknown component 'unet'"),
    (("--image", "{missing}"), "cannot read image"),
    (("--image", "{not_an_image}"), "cannot read image"),
    (("--num-images", "0"), "--num-images must be at least 1"),
])
def test_bad_input_is_one_line(ov_sd3, tmp_path, capsys, extra, needle):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(image)
    (tmp_path / "junk.png").write_text("not an image")
    paths = dict(image=image, missing=tmp_path / "nope.png", not_an_image=tmp_path / "junk.png")
    extra = [value.format(**paths) for value in extra]
    code, err = run_cli(capsys, ov_sd3, "--width", "64", "--height", "64", "--output", tmp_path / "out", *extra)
    assert code == EXIT_ERROR
    assert err.startswith("ovsd3 run: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder behind


def test_concurrent_runs_into_one_folder_keep_every_image(ov_sd3, tmp_path):
    """Four runs with the same seed into one folder at once: four images, none overwritten, no leftovers."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "ovsd3", "run", str(ov_sd3), "--prompt", "a cat", "--steps", "1", "--seed", "5",
               "--width", "64", "--height", "64", "--no-cache", "--output", str(tmp_path / "shared")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    printed = [run.communicate()[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    written = sorted(path.name for path in (tmp_path / "shared").iterdir())
    assert len(written) == 4 and len(set(printed)) == 4 and all(name.endswith("-5.png") for name in written)


def test_missing_component(ov_sd3, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ov_sd3, broken)
    shutil.rmtree(broken / "vae_decoder")
    code, err = run_cli(capsys, broken)
    assert code == EXIT_ERROR and "missing component 'vae_decoder'" in err


def test_img2img_without_vae_encoder(ov_sd3, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "no-encoder"
    shutil.copytree(ov_sd3, folder)
    shutil.rmtree(folder / "vae_encoder")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    code, err = run_cli(capsys, folder, "--width", "64", "--height", "64", "--image", tmp_path / "in.png")
    assert code == EXIT_ERROR and "has no vae_encoder" in err


def test_not_a_model_folder(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path)
    assert code == EXIT_ERROR and "not an OpenVINO SD3 folder" in err


@pytest.mark.parametrize("option", ["use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                                    "use_beta_sigmas"])  # the README: refused, not approximated
def test_unsupported_scheduler_option_is_refused(ov_sd3, tmp_path, capsys, option):
    import json
    import os

    folder = tmp_path / "other-sigmas"
    shutil.copytree(ov_sd3, folder, copy_function=os.link)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config[option] = True
    config_path.unlink()  # a hard link to the fixture's file: replace it, never write through
    config_path.write_text(json.dumps(config))
    code, err = run_cli(capsys, folder, "--output", tmp_path / "out")
    assert code == EXIT_ERROR and option in err and "not supported" in err
    assert not (tmp_path / "out").exists()


def test_device_plans():
    plan = DevicePlan.parse("transformer=GPU, text=CPU, vae_decoder=NPU")
    assert plan.device_for("transformer") == "GPU"
    assert [plan.device_for(name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")] == ["CPU"] * 3
    assert plan.device_for("vae_decoder") == "NPU" and plan.device_for("vae_encoder") == "AUTO"
    assert DevicePlan.parse("gpu").device_for("vae_encoder") == "GPU"
    with pytest.raises(OvsdError, match="names no device"):
        DevicePlan.parse("transformer=")


def test_per_component_devices_generate(ov_sd3, tmp_path, capsys):
    code = main(["run", str(ov_sd3), "--prompt", "a cat", "--no-cache", "--steps", "2", "--width", "64",
                 "--height", "64", "--device", "transformer=CPU,text=AUTO,vae=CPU", "--output", str(tmp_path)])
    assert code == 0 and len(list(tmp_path.glob("*.png"))) == 1


def test_static_shapes_on_a_guidance_free_folder(ov_flash, tmp_path):
    """--static takes guidance from the folder's defaults (Flash: none, so the transformer batch is 1)."""
    code = main(["run", str(ov_flash), "--prompt", "a cat", "--static", "--width", "64", "--height", "64",
                 "--no-cache", "--output", str(tmp_path)])
    assert code == 0 and len(list(tmp_path.glob("*.png"))) == 1


def test_size_beyond_the_position_embedding_is_refused(ov_sd3, tmp_path, capsys):
    """The tiny transformer's position embedding covers 24 patches a side: 384 px at most."""
    code, err = run_cli(capsys, ov_sd3, "--width", "400", "--height", "384", "--output", tmp_path / "out")
    assert code == EXIT_ERROR and "draws at most 384x384 (got 400x384)" in err and "\n" not in err.strip()
