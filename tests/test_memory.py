"""Memory for big models: weight mappings trimmed out of the process once read, and model offload (diffusers'
``enable_model_cpu_offload``), which compiles one component at a time, the transformer for each generation's
own shapes, and must draw the same pictures (to the rounding of the kernels chosen for those shapes)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
from PIL import Image

from ovsd3 import layout, memory
from ovsd3.cli import main
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime import pipeline as pipeline_module

SETTINGS = dict(width=64, height=64, num_inference_steps=3, guidance_scale=5.0, seed=7, output_type="np")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")


@linux_only
def test_trimming_drops_a_read_mapping_from_rss_and_keeps_its_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 64 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        before = memory.resident_bytes()["file"]
        checksum = int(view.sum(dtype=np.uint64))  # touches every page: now resident in this process
        touched = memory.resident_bytes()["file"]
        assert touched - before > 60 * 2**20
        assert any(found == str(path) for _, _, found in memory.read_only_mappings())
        assert memory.trim_mappings() >= 64 * 2**20
        assert memory.resident_bytes()["file"] < touched - 60 * 2**20
        assert int(view.sum(dtype=np.uint64)) == checksum == int(data.sum(dtype=np.uint64))  # read back intact
        del view


@linux_only
def test_trimming_leaves_writable_and_small_mappings_alone(tmp_path):
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(32 * 2**20))
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as mapped:
        mapped[:5] = b"dirty"
        assert str(path) not in {found for _, _, found in memory.read_only_mappings()}
        memory.trim_mappings()
        assert mapped[:5] == b"dirty"


def test_offload_draws_the_same_pictures_and_keeps_observers(ov_sd3):
    plain = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)
    expected = [plain("a red 7", **SETTINGS).images, plain("a blue 1", **SETTINGS).images]
    pipe = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)
    pipe.enable_model_cpu_offload()
    calls = []
    pipe.transformer.observers.append(lambda inputs, out: calls.append(inputs["hidden_states"].shape))
    drawn = []
    for prompt, images in zip(("a red 7", "a blue 1"), expected):
        drawn.append(pipe(prompt, **SETTINGS).images)
        # the transformer is compiled for the call's own shapes, whose bf16 kernels round differently
        assert psnr(images, drawn[-1], data_range=1.0) > 38
        # between generations nothing stays compiled: that is what bounds the peak to one component
        assert pipe.transformer._compiled is None and pipe.vae_decoder._compiled is None
        assert all(encoder._compiled is None for encoder in pipe.text.clip_encoders)
    assert calls == [(2, 16, 8, 8)] * 6  # 3 guided steps per picture, all seen across the recompiles
    np.testing.assert_array_equal(pipe("a red 7", **SETTINGS).images, drawn[0])  # and it is deterministic


def test_offload_at_full_precision_matches_to_rounding(ov_sd3):
    plain = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, precision="f32")("a green 3", **SETTINGS).images
    pipe = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, precision="f32", offload=True)
    assert pipe.transformer._compiled is None and pipe.text.t5_encoder._compiled is None  # nothing until used
    assert psnr(plain, pipe("a green 3", **SETTINGS).images, data_range=1.0) > 100


def test_offload_is_advised_for_folders_taking_much_of_the_memory(ov_sd3, monkeypatch):
    weights = layout.weight_bytes(ov_sd3)
    assert weights > 0
    monkeypatch.setattr(pipeline_module, "total_memory_bytes", lambda: 4 * weights)
    assert not pipeline_module.offload_advised(ov_sd3)
    monkeypatch.setattr(pipeline_module, "total_memory_bytes", lambda: weights)
    assert pipeline_module.offload_advised(ov_sd3)


def test_run_with_offload_writes_the_same_png(ov_sd3, tmp_path, capsys):
    common = ["run", str(ov_sd3), "--prompt", "a red 7", "--width", "64", "--height", "64", "--steps", "2",
              "--seed", "3", "--device", "CPU", "--no-cache"]
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert main(common + ["--offload", "--output", str(tmp_path / "offload")]) == 0
    plain, offload = (sorted((tmp_path / name).glob("*.png")) for name in ("plain", "offload"))
    assert len(plain) == len(offload) == 1
    pixels = [np.asarray(Image.open(path[0]), dtype=np.float64) for path in (plain, offload)]
    assert psnr(*pixels, data_range=255.0) > 38



def test_quality_gate_offloads_big_folders_and_still_sees_every_step(ov_sd3, q_sd3, monkeypatch):
    from ovsd3.quantize import gate

    settings = gate.GateSettings(prompts=("a red 7", "a blue 1"), size=64, steps=3, guidance_scale=5.0)
    plain = gate.run_gate(ov_sd3, q_sd3, settings)
    loaded = []

    def offload_as_if_big(folder):
        loaded.append(folder)
        return True

    monkeypatch.setattr(gate, "offload_advised", offload_as_if_big)
    offloaded = gate.run_gate(ov_sd3, q_sd3, settings)
    assert loaded == [ov_sd3, q_sd3]
    assert len(offloaded.step_psnr) == 3 and offloaded.passed == plain.passed
    assert abs(offloaded.mean_psnr - plain.mean_psnr) < 3  # per-shape kernels round differently, nothing more
