"""`ovsd3 quantize` on a tiny folder with a ControlNet: the ControlNet quantized as the transformer is (INT8
from the same calibration pass, its patch embeddings in float; or weights only), listed in the sizes, recorded,
and drawing with control close to the FP16 folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import attention_inputs_quantized, quantize
from ovsd3 import layout
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline

CONTROLNET = layout.CONTROLNET
# The quantized folder drawing with control against the FP16 folder drawing with control, on the tiny model
# (64x64, 28 steps): measured 21.3 dB for INT8 (22.2 dB with the ControlNet left in FP16: quantizing it costs
# ~1 dB), 47.4 dB for INT4 weights, while INT8 against FP16 without control is 23.2 dB on the same prompt and
# the FP16 folder with against without control 14.3 dB. So: no more than CONTROL_DROP below the folder's own
# drift without control, and clearly nearer the controlled picture than the uncontrolled one is (a ControlNet
# that is broken or not run draws the uncontrolled picture, or noise).
CONTROL_DROP = 3.0
CONTROL_MARGIN = 4.0


@pytest.fixture(scope="module")
def q_cn(workdir, cn_folder) -> Path:
    out = workdir / "cnq-int8"
    assert quantize(cn_folder, out) == 0
    return out


@pytest.fixture(scope="module")
def w_cn(workdir, cn_folder) -> Path:
    out = workdir / "cnq-int4w"
    assert quantize(cn_folder, out, "--transformer-weights", "int4", "--vae-decoder", "weights") == 0
    return out


def ops_of(folder: Path, component: str):
    import openvino as ov

    return ov.Core().read_model(layout.model_xml(folder, component)).get_ops()


def fed_by_fake_quantize(node, depth: int = 4) -> bool:
    for value in node.inputs():
        producer = value.get_source_output().get_node()
        if producer.get_type_name() == "FakeQuantize" or (depth > 1 and fed_by_fake_quantize(producer, depth - 1)):
            return True
    return False


def test_controlnet_is_int8_except_its_patch_embeddings(q_cn):
    import openvino as ov

    from ovsd3.quantize.controlnet import patch_embeddings

    model = ov.Core().read_model(layout.model_xml(q_cn, CONTROLNET))
    assert sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) > 10
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    embeddings = patch_embeddings(model)
    assert len(set(embeddings)) == 2  # the latents' and the control latents'
    assert not any(fed_by_fake_quantize(by_name[name]) for name in embeddings)
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    assert sum(fed_by_fake_quantize(op) for op in matmuls) >= len(matmuls) // 2


def test_controlnet_takes_the_transformers_form(q_cn):
    """--target-cpu's form holds for the ControlNet too: where the transformer's attention stays in float (CPUs
    without VNNI), so does the ControlNet's."""
    form = layout.FolderRecord.load(q_cn).cpu_target["transformer"]
    assert attention_inputs_quantized(q_cn, CONTROLNET) == attention_inputs_quantized(q_cn) == (form == "int8")


def test_record_and_sizes_list_the_controlnet(q_cn, cn_folder):
    quantization = layout.FolderRecord.load(q_cn).quantization
    assert quantization["sizes"][CONTROLNET]["format"] == "INT8"
    assert quantization["sizes"][CONTROLNET]["before_bytes"] == layout.ir_bytes(cn_folder, CONTROLNET)
    assert quantization["controlnets"][CONTROLNET]["mode"] == "int8"
    assert quantization["controlnets"][CONTROLNET]["calibration_samples"] == 8
    gate = quantization["gate"]
    assert len(gate["control_psnr"]) == 2 and gate["passed"]  # helpers.quantize: 2 gate prompts, both with control
    assert min(gate["control_psnr"]) >= 15.0


def test_weight_only_applies_to_the_controlnet(w_cn, cn_folder):
    quantization = layout.FolderRecord.load(w_cn).quantization
    assert quantization["sizes"][CONTROLNET]["format"] == "INT4 weights"
    assert quantization["controlnets"] == {CONTROLNET: {"mode": "int4 weights"}}
    types = {op.get_output_element_type(0).get_type_name() for op in ops_of(w_cn, CONTROLNET)
             if op.get_type_name() == "Constant"}
    assert types & {"u4", "i4", "u8", "i8"}
    assert not any(op.get_type_name() == "FakeQuantize" for op in ops_of(w_cn, CONTROLNET))
    assert layout.ir_bytes(w_cn, CONTROLNET) < layout.ir_bytes(cn_folder, CONTROLNET)


def _control_image() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _draw(folder: Path, **call) -> np.ndarray:
    pipe = SD3Pipeline.from_pretrained(folder, cache_dir=None)
    image = pipe("a red digit on grey", width=64, height=64, num_inference_steps=28, guidance_scale=7.0, seed=3,
                 output_type="np", **call).images[0]
    return np.asarray(image, np.float64)


@pytest.mark.parametrize("quantized", ["q_cn", "w_cn"])
def test_quantized_folder_draws_close_to_fp16_with_control(request, quantized, cn_folder):
    folder = request.getfixturevalue(quantized)
    control = dict(control_image=_control_image(), controlnet_conditioning_scale=1.0)
    fp16, plain_fp16 = _draw(cn_folder, **control), _draw(cn_folder)
    drift_without_control = psnr(plain_fp16, _draw(folder), data_range=1.0)
    with_control = psnr(fp16, _draw(folder, **control), data_range=1.0)
    assert with_control >= drift_without_control - CONTROL_DROP
    assert with_control >= psnr(fp16, plain_fp16, data_range=1.0) + CONTROL_MARGIN


def test_control_samples_come_from_the_recorded_calls(q_cn, cn_folder, workdir):
    from ovsd3.quantize.controlnet import control_samples

    model = layout.ModelFolder.open(cn_folder)
    samples = list(control_samples(model, model.controlnet_configs[0], workdir / "cnq-int8-calib", 3))
    assert len(samples) == 3
    for sample in samples:
        assert sample["controlnet_cond"].shape == sample["hidden_states"].shape  # batch 2: both halves of CFG
        assert not sample["pooled_projections"].any()  # an InstantX-kind ControlNet: zero pooled input
        assert np.isfinite(sample["controlnet_cond"]).all() and sample["controlnet_cond"].std() > 0.1
    assert np.array_equal(samples[0]["controlnet_cond"], samples[2]["controlnet_cond"])  # one prompt's picture
    assert not np.array_equal(samples[0]["hidden_states"], samples[2]["hidden_states"])  # at two steps


@pytest.fixture(scope="module")
def inpaint_folders(workdir, tiny_sd3, ov_sd3) -> tuple[Path, Path]:
    """A tiny FP16 folder with an inpainting ControlNet (one extra conditioning channel: the mask), and its INT8
    quantization."""
    from controlnet_folders import with_controlnets
    from test_controlnet_inpaint import inpainting_controlnet

    source = inpainting_controlnet(tiny_sd3, workdir / "cnq-inpaint-source", 4)
    fp16 = with_controlnets(tiny_sd3, ov_sd3, [source], workdir / "cnq-inpaint-fp16", "fp16")
    int8 = workdir / "cnq-inpaint-int8"
    assert quantize(fp16, int8) == 0
    return fp16, int8


def test_an_inpainting_controlnet_is_calibrated_and_gated_with_a_mask(inpaint_folders, workdir):
    """Its calibration samples carry the inverted centre-square mask as their last channel; the gate drew with
    control_mask; the INT8 folder draws close to FP16 with the same control image and mask."""
    from ovsd3.quantize.controlnet import calibration_mask, control_samples

    fp16, int8 = inpaint_folders
    model = layout.ModelFolder.open(fp16)
    sample = next(iter(control_samples(model, model.controlnet_configs[0], workdir / "cnq-inpaint-int8-calib", 1)))
    side = sample["hidden_states"].shape[-1]
    assert sample["controlnet_cond"].shape[1] == 17
    assert (sample["controlnet_cond"][:, -1] == 1.0 - calibration_mask(side, side)).all()
    assert not sample["pooled_projections"].any()
    record = layout.FolderRecord.load(int8)
    assert record.quantization["sizes"][CONTROLNET]["format"] == "INT8" and record.quantization["gate"]["control_psnr"]
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1.0
    control = dict(control_image=_control_image(), control_mask=mask)
    fp16_picture, plain_fp16 = _draw(fp16, **control), _draw(fp16)
    with_control = psnr(fp16_picture, _draw(int8, **control), data_range=1.0)
    assert with_control >= psnr(plain_fp16, _draw(int8), data_range=1.0) - CONTROL_DROP
    assert with_control >= psnr(fp16_picture, plain_fp16, data_range=1.0) + CONTROL_MARGIN
