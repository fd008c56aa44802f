"""Bad input gets one clear line and exit code 2; an interrupted or failed conversion leaves no OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovsd3.cli import EXIT_ERROR, main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def leftovers(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*"))


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_ERROR
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ovsd3 convert: error: ")
    for needle in needles:
        assert needle in err, err


def test_not_an_sd3_pipeline(tmp_path, capsys):
    model = tmp_path / "sdxl"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    code, err = run_cli(capsys, model, tmp_path / "out")
    assert_one_line_error(code, err, "StableDiffusionXLPipeline", "not a Stable Diffusion 3 pipeline")
    assert not (tmp_path / "out").exists()


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, tmp_path / "empty", tmp_path / "out")
    assert_one_line_error(code, err, "no model_index.json")


def test_neither_folder_nor_hub_id(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path / "no" / "such" / "place", tmp_path / "out")
    assert_one_line_error(code, err, "neither an existing folder nor a model hub id")


def test_missing_component(tmp_path, tiny_sd3, capsys):
    model = tmp_path / "broken"
    shutil.copytree(tiny_sd3, model)
    shutil.rmtree(model / "vae")
    code, err = run_cli(capsys, model, tmp_path / "out")
    assert_one_line_error(code, err, "missing component 'vae'")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an unreachable hub looks like, whatever the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    code, err = run_cli(capsys, "stabilityai/stable-diffusion-3-medium-diffusers", tmp_path / "out")
    assert_one_line_error(code, err, "cannot download", "model hub", "local diffusers folder")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_for_adapter(tmp_path, tiny_sd3, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    code, err = run_cli(capsys, tiny_sd3, tmp_path / "out", "--flash-lora")
    assert_one_line_error(code, err, "jasperai/flash-sd3", "cannot download")


def test_adapter_that_does_not_fit(tmp_path, tiny_sd3, capsys):
    from diffusers import SD3Transformer2DModel

    from ovsd3.synthetic import save_random_lora

    config = dict(SD3Transformer2DModel.load_config(tiny_sd3, subfolder="transformer"))
    config["attention_head_dim"] = 8  # another width: every adapted layer has other shapes
    other = SD3Transformer2DModel.from_config(config)
    adapter = save_random_lora(other, tmp_path / "other-lora")
    code, err = run_cli(capsys, tiny_sd3, tmp_path / "out", "--flash-lora", adapter)
    assert_one_line_error(code, err, "LoRA adapter does not fit the transformer")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


def test_adapter_folder_without_config(tmp_path, tiny_sd3, capsys):
    (tmp_path / "not-an-adapter").mkdir()
    code, err = run_cli(capsys, tiny_sd3, tmp_path / "out", "--flash-lora", tmp_path / "not-an-adapter")
    assert_one_line_error(code, err, "not a PEFT adapter folder")


def test_output_not_writable(tmp_path, tiny_sd3, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(capsys, tiny_sd3, blocker / "out")
    assert_one_line_error(code, err, "cannot create output folder")


def test_overwrite_replaces_only_an_earlier_convert_output(tmp_path, tiny_sd3_without_t5, ov_sd3, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code, err = run_cli(capsys, tiny_sd3_without_t5, out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "precious.txt").exists()

    code, err = run_cli(capsys, tiny_sd3_without_t5, out, "--overwrite")  # not an earlier convert's output
    assert_one_line_error(code, err, "was not written by ovsd3")
    assert (out / "precious.txt").exists()

    shutil.rmtree(out)
    shutil.copytree(ov_sd3, out)  # an earlier `ovsd3 convert` output
    (out / "added-later.txt").write_text("the user's: kept, and the overwrite refused (issue 25)")
    code, err = run_cli(capsys, tiny_sd3_without_t5, out, "--overwrite")
    assert_one_line_error(code, err, "holds added-later.txt", "nothing was replaced")
    assert (out / "added-later.txt").exists() and (out / "text_encoder_3").exists()
    (out / "added-later.txt").unlink()
    assert main(["convert", str(tiny_sd3_without_t5), str(out), "--overwrite"]) == 0
    assert (out / "transformer" / "openvino_model.xml").exists()
    assert not (out / "text_encoder_3").exists()  # the new conversion's (no T5), not the old folder's
    assert not leftovers(out)


def test_parity_gate_fails_and_writes_nothing(tmp_path, tiny_sd3, capsys):
    out = tmp_path / "out"
    # 200 dB, the highest bound convert takes: an fp16 export agrees at 76-84 dB
    code, err = run_cli(capsys, tiny_sd3, out, "--min-psnr", "200")
    assert_one_line_error(code, err, "transformer", "disagrees with PyTorch", "PSNR")
    assert not out.exists() and not leftovers(out)


def test_unexpected_failure_is_one_line_too(tmp_path, tiny_sd3, capsys, monkeypatch):
    from ovsd3.convert import components

    def broken(*args, **kwargs):
        raise RuntimeError("something inside a library broke\nwith a second line")

    monkeypatch.setattr(components, "convert_transformer", broken)
    code = main(["convert", str(tiny_sd3), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == ("ovsd3 convert: internal error: RuntimeError: something inside a library broke "
                                 "(set OVSD3_DEBUG=1 for the traceback)")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
    # What that line promises: with OVSD3_DEBUG=1 the error itself propagates (Python prints its traceback),
    # and the output is cleaned up all the same.
    monkeypatch.setenv("OVSD3_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something inside a library broke\nwith a second line"):
        main(["convert", str(tiny_sd3), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


def _start_convert(model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ovsd3", "convert", str(model), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_first_component(process: subprocess.Popen, out: Path, timeout: float = 120.0) -> None:
    staging = out.parent / f".{out.name}.partial-{process.pid}"
    deadline = time.monotonic() + timeout
    while not (staging / "transformer" / "openvino_model.xml").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "conversion did not start writing"
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGINT: tests/test_safety.py, under load
def test_interrupted_conversion_leaves_nothing(tmp_path, tiny_sd3, signum):
    out = tmp_path / "out"
    process = _start_convert(tiny_sd3, out)
    _wait_for_first_component(process, out)
    process.send_signal(signum)
    assert process.wait(timeout=120) != 0
    assert not out.exists() and not leftovers(out)


def test_killed_conversion_leaves_no_out_and_next_run_clears_leftovers(tmp_path, tiny_sd3, capsys):
    out = tmp_path / "out"
    process = _start_convert(tiny_sd3, out)
    _wait_for_first_component(process, out)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not out.exists() and leftovers(out)  # SIGKILL cannot be cleaned up after, but OUT never appeared
    code, _ = run_cli(capsys, tiny_sd3, out, "--min-psnr", "200")  # any later run into the same OUT (refused)
    assert code == EXIT_ERROR and not leftovers(out)
