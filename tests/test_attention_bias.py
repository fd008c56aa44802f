"""The attention-bias transformer on 77 + 1 text tokens gives what the original gives on 77 + 256 (no T5)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest

from ovsd3 import layout
from ovsd3.ir.attention_bias import ATTENTION_BIAS, add_attention_bias, joint_attention_ops
from ovsd3.metrics import psnr
from ovsd3.runtime.text import CLIP_MAX_LENGTH
from ovsd3.runtime.text_collapse import collapse_text, patch_size_of, t5_part_is_zero

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
T5_TOKENS = 256
SIZES = [(64, 64), (96, 64)]  # pixels (height, width): 16 and 24 image tokens at patch 2
# Measured ~150 dB (float rounding; the INT8 IR is bit-exact). Leaving the bias out already gives 42-45 dB on
# these random tiny models, so a looser bound would not tell a right bias from none.
MIN_PSNR = 100.0
# The INT8 IR quantizes activations: where the two graphs' float rounding differs at a quantizer's step boundary,
# one step flips. Bit-exact on an AVX-512 VNNI CPU, 84.6 dB measured on an AVX2-only one; still far above the
# 42-45 dB of no bias at all.
MIN_PSNR_INT8 = 70.0


def transformer_config(folder) -> dict:
    import json

    return json.loads((folder / layout.TRANSFORMER / "config.json").read_text())


def no_t5_inputs(folder, height: int, width: int, batch: int = 2, t5_tokens: int = T5_TOKENS, seed: int = 0) -> dict:
    """Random transformer inputs whose text is random CLIP tokens followed by T5-length zeros."""
    config = transformer_config(folder)
    rng = np.random.default_rng(seed)
    text = np.zeros((batch, CLIP_MAX_LENGTH + t5_tokens, config["joint_attention_dim"]), np.float32)
    text[:, :CLIP_MAX_LENGTH] = rng.standard_normal(text[:, :CLIP_MAX_LENGTH].shape)
    return {
        "hidden_states": rng.standard_normal((batch, config["in_channels"], height // 8, width // 8), dtype=np.float32),
        "timestep": np.linspace(200.0, 900.0, batch, dtype=np.float32),
        "encoder_hidden_states": text,
        "pooled_projections": rng.standard_normal((batch, config["pooled_projection_dim"]), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def core() -> ov.Core:
    return ov.Core()


def compiled_pair(core, folder):
    """(original, biased) transformer, compiled in f32."""
    model = core.read_model(layout.model_xml(folder, layout.TRANSFORMER))
    return core.compile_model(model, "CPU", F32), core.compile_model(add_attention_bias(model), "CPU", F32)


@pytest.mark.parametrize("folder_fixture", ["ov_no_t5_fp32", "ov_sd35_fp32", "q_sd3"])
def test_collapsed_text_with_bias_matches_the_full_sequence(request, core, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    original, biased = compiled_pair(core, folder)
    for height, width in SIZES:
        inputs = no_t5_inputs(folder, height, width)
        expected = original(inputs)[0]
        collapse = collapse_text(inputs, patch_size_of(folder))
        assert collapse.collapsed and collapse.copies == T5_TOKENS
        assert collapse.inputs["encoder_hidden_states"].shape[1] == CLIP_MAX_LENGTH + 1
        bound = MIN_PSNR_INT8 if folder_fixture == "q_sd3" else MIN_PSNR
        assert psnr(expected, biased(collapse.biased_inputs())[0]) >= bound, (folder_fixture, height, width)

        # A zero bias on the full sequence is the original model (same ops, a zero added to the logits).
        image_tokens = (height // 16) * (width // 16)
        zero = np.zeros(image_tokens + inputs["encoder_hidden_states"].shape[1], np.float32)
        np.testing.assert_allclose(biased({**inputs, ATTENTION_BIAS: zero})[0], expected, rtol=1e-5, atol=1e-6)


def test_log_of_the_copy_count_is_the_exact_bias(core, ov_no_t5_fp32):
    """log(T) on the last key, not another value or position: the test above could not pass by accident."""
    original, biased = compiled_pair(core, ov_no_t5_fp32)
    inputs = no_t5_inputs(ov_no_t5_fp32, 64, 64, t5_tokens=128)
    expected = original(inputs)[0]
    collapse = collapse_text(inputs, patch_size_of(ov_no_t5_fp32))
    assert collapse.attention_bias[-1] == pytest.approx(math.log(128)) and not collapse.attention_bias[:-1].any()
    exact = psnr(expected, biased(collapse.biased_inputs())[0])
    for wrong in (np.zeros_like(collapse.attention_bias), collapse.attention_bias * 0.8,
                  np.roll(collapse.attention_bias, -1)):  # no bias, too small, on the CLIP token before it
        assert psnr(expected, biased({**collapse.inputs, ATTENTION_BIAS: wrong})[0]) < exact - 20.0


def test_only_joint_attention_gets_the_bias(core, ov_sd35_fp32):
    """SD3.5's dual-attention layers keep their image-only attn2 unmasked."""
    original = core.read_model(layout.model_xml(ov_sd35_fp32, layout.TRANSFORMER))
    model = add_attention_bias(original)
    assert "optimum" in model.get_rt_info() and len(original.inputs) == 4  # rt_info kept; the original untouched
    sdpa = [op for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    joint = {op.get_friendly_name() for op in joint_attention_ops(model)}
    assert len(joint) == transformer_config(ov_sd35_fp32)["num_layers"]
    assert any(".attn2/" in op.get_friendly_name() for op in sdpa)
    for op in sdpa:
        assert op.get_input_size() == (4 if op.get_friendly_name() in joint else 3), op.get_friendly_name()
    assert [p.get_partial_shape() for p in model.inputs if p.any_name == ATTENTION_BIAS] == [ov.PartialShape([-1])]


def test_models_without_joint_attention_are_refused(core, ov_no_t5_fp32):
    vae = core.read_model(layout.model_xml(ov_no_t5_fp32, layout.VAE_DECODER))  # has SDPA, but not joint
    with pytest.raises(ValueError, match="no joint attention"):
        add_attention_bias(vae)
    biased = add_attention_bias(core.read_model(layout.model_xml(ov_no_t5_fp32, layout.TRANSFORMER)))
    with pytest.raises(ValueError, match="already has"):
        add_attention_bias(biased)


def test_text_with_any_nonzero_t5_row_is_not_collapsed(ov_no_t5_fp32):
    patch = patch_size_of(ov_no_t5_fp32)
    inputs = no_t5_inputs(ov_no_t5_fp32, 96, 64)
    one_row = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].copy()}
    one_row["encoder_hidden_states"][1, -1, 0] = 1e-30  # the second prompt has a (tiny) T5 embedding
    nan_row = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].copy()}
    nan_row["encoder_hidden_states"][0, CLIP_MAX_LENGTH, 3] = np.nan
    clip_only = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :CLIP_MAX_LENGTH]}
    for case in (one_row, nan_row, clip_only):
        collapse = collapse_text(case, patch)
        assert not collapse.collapsed and collapse.copies == 0
        assert collapse.inputs["encoder_hidden_states"] is case["encoder_hidden_states"]
        assert collapse.attention_bias.shape == (24 + case["encoder_hidden_states"].shape[1],)
        assert not collapse.attention_bias.any()
    assert t5_part_is_zero(inputs["encoder_hidden_states"])
    assert not t5_part_is_zero(one_row["encoder_hidden_states"])


def test_text_collapse_imports_no_torch():
    code = "import sys, ovsd3.runtime.text_collapse; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
