"""LoRA adapters applied when a folder loads, against diffusers + PEFT on the same weights and noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ovsd3.errors import OvsdError
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline

SIZE = dict(width=64, height=64)
CALL = dict(num_inference_steps=4, guidance_scale=3.0, output_type="np", **SIZE)
MIN_PSNR = 90.0  # float images from the f32 IR against diffusers + PEFT; a wrong scale or layer is far below



def diffusers_with(tiny_sd3, chosen: list[tuple[Path, float, float]]):
    """diffusers' pipeline with PEFT adapters loaded and weighted by set_adapters (weight x alpha / r folded in,
    as diffusers' SD3 loader gives a bare state dict scale 1)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    names = []
    for index, (folder, _, _) in enumerate(chosen):
        state = {key.replace("base_model.model.", "transformer."): value
                 for key, value in load_file(folder / "adapter_model.safetensors").items()}
        pipe.load_lora_weights(state, adapter_name=f"adapter{index}")
        names.append(f"adapter{index}")
    pipe.set_adapters(names, adapter_weights=[weight * alpha / 4 for _, weight, alpha in chosen])
    return pipe


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 0.7, "b": -0.5}], ids=["one", "two"])
def test_adapters_match_diffusers_and_peft(ov_sd3_fp32, tiny_sd3, adapters, weights):
    alphas = {"a": 8.0, "b": 4.0}
    expected = diffusers_with(tiny_sd3, [(adapters[name], weight, alphas[name]) for name, weight in weights.items()])(
        "a cat", generator=torch.Generator().manual_seed(1), **CALL).images
    pipe = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None,
                            adapters=[(adapters[name], weight) for name, weight in weights.items()])
    got = pipe("a cat", generator=torch.Generator().manual_seed(1), **CALL).images
    plain = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None)(
        "a cat", generator=torch.Generator().manual_seed(1), **CALL).images
    agreement = psnr(expected.astype(np.float64), got.astype(np.float64), data_range=1.0)
    assert agreement >= MIN_PSNR, agreement
    assert psnr(plain.astype(np.float64), got.astype(np.float64), data_range=1.0) < 40  # the adapter changed it


def test_switching_adapters_does_not_reread_the_folder(ov_sd3_fp32, adapters, monkeypatch):
    pipe = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None, adapters=[(adapters["a"], 1.0)])
    with_a = pipe("a cat", seed=3, **CALL).images
    reads = []
    original = pipe._compiler.core.read_model
    monkeypatch.setattr(pipe._compiler.core, "read_model", lambda *args: reads.append(args) or original(*args))
    pipe.set_adapters([f"{adapters['a']}:0.0"])
    without = pipe("a cat", seed=3, **CALL).images
    pipe.set_adapters([(adapters["a"], 1.0)])
    assert np.array_equal(pipe("a cat", seed=3, **CALL).images, with_a)
    assert reads == []  # the IR read at load is reused
    plain = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None)("a cat", seed=3, **CALL).images
    assert psnr(plain.astype(np.float64), without.astype(np.float64), data_range=1.0) > 80  # weight 0: no change


def _kohya_file(path: Path, transformer_path: Path, alpha: float) -> tuple[Path, Path]:
    """A kohya file (MMDiT names, fused qkv, last block's adaLN) and the PEFT folder that means the same."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    config = __import__("json").loads((transformer_path / "config.json").read_text())
    width, rank, last = config["num_attention_heads"] * config["attention_head_dim"], 4, config["num_layers"] - 1
    down, up = rng.normal(0, 0.2, (rank, width)).astype(np.float32), rng.normal(0, 0.2, (3 * width, rank))
    norm_down, norm_up = rng.normal(0, 0.2, (rank, width)), rng.normal(0, 0.2, (2 * width, rank))
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
             "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": np.array(alpha),
             f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_down.weight": norm_down,
             f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_up.weight": norm_up,
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((rank, 8))}
    save_file({key: np.asarray(value, dtype=np.float32) for key, value in kohya.items()}, path / "kohya.safetensors")
    peft = {f"base_model.model.transformer_blocks.0.attn.{name}.lora_{factor}.weight": value
            for name, rows in zip(("to_q", "to_k", "to_v"), np.split(up, 3))
            for factor, value in (("A", down), ("B", rows * alpha / rank))}
    half = width
    peft[f"base_model.model.transformer_blocks.{last}.norm1_context.linear.lora_A.weight"] = norm_down
    peft[f"base_model.model.transformer_blocks.{last}.norm1_context.linear.lora_B.weight"] = \
        np.concatenate([norm_up[half:], norm_up[:half]])  # MMDiT's (shift, scale) is diffusers' (scale, shift)
    folder = path / "peft"
    folder.mkdir()
    save_file({key: np.asarray(value, dtype=np.float32) for key, value in peft.items()},
              str(folder / "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q"]).save_pretrained(str(folder))
    return path / "kohya.safetensors", folder


def test_kohya_names_mean_what_diffusers_modules_do(ov_sd3_fp32, tiny_sd3, tmp_path):
    kohya, peft = _kohya_file(tmp_path, tiny_sd3 / "transformer", alpha=2.0)
    by_kohya = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None, adapters=[(kohya, 0.8)])
    by_peft = SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None, adapters=[(peft, 0.8)])
    got, expected = (pipe("a cat", seed=2, **CALL).images for pipe in (by_kohya, by_peft))
    assert psnr(expected.astype(np.float64), got.astype(np.float64), data_range=1.0) > 80
    assert by_kohya.ignored_text_tensors == 1


def test_lora_errors_are_one_line(ov_sd3, q_sd3, tiny_sd35, adapters, tmp_path, capsys):
    from diffusers import SD3Transformer2DModel

    from ovsd3.cli import EXIT_ERROR, main
    from ovsd3.synthetic import save_random_lora

    wider = save_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd35, subfolder="transformer"),
                             tmp_path / "sd35", targets=("attn2.to_q",))
    cases = [([f"{tmp_path}/missing.safetensors"], "no such file or folder"),
             ([f"{adapters['a']}:heavy"], "is not a number"),
             ([str(wider)], "layer transformer_blocks.0.attn2.to_q, which this transformer does not have"),
             ([str(tmp_path)], "has no adapter_config.json")]
    for lora, needle in cases:
        code = main(["run", str(ov_sd3), "--prompt", "a cat", "--steps", "1", "--no-cache", "--output",
                     str(tmp_path / "out"), *[part for spec in lora for part in ("--lora", spec)]])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == EXIT_ERROR and needle in error, error
    with pytest.raises(OvsdError, match="weights are quantized .* use lora_mode branch"):
        SD3Pipeline.load(q_sd3, cache_dir=None, adapters=[(adapters["a"], 1.0)], lora_mode="merge")


def test_lora_on_the_command_line(ov_sd3, adapters, tmp_path):
    from ovsd3.cli import main

    common = ["run", str(ov_sd3), "--prompt", "a cat", "--steps", "2", "--seed", "4", "--width", "64", "--height",
              "64", "--no-cache"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--lora", f"{adapters['a']}:0.8", "--lora", str(adapters["b"]), "--output",
                 str(tmp_path / "lora")]) == 0
    (plain,), (lora,) = (list((tmp_path / name).glob("*.png")) for name in ("plain", "lora"))
    assert plain.read_bytes() != lora.read_bytes()


def test_serve_with_a_lora_draws_the_pipelines_picture(ov_sd3, adapters):
    import base64
    import io

    import httpx
    from PIL import Image

    from ovsd3.serve.launch import serving

    expected = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, adapters=[(adapters["a"], 0.8)])(
        "a cat", seed=6, num_inference_steps=3, **SIZE).images[0]
    with serving(ov_sd3, "--device", "CPU", "--lora", f"{adapters['a']}:0.8") as base:
        answer = httpx.post(f"{base}/v3/images/generations", timeout=120,
                            json={"prompt": "a cat", "rng_seed": 6, "num_inference_steps": 3, "size": "64x64"})
    got = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("kind, key", [
    ("DoRA", "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"),
    ("DoRA (kohya)", "lora_unet_transformer_blocks_0_attn_to_q.dora_scale"),
    ("LoHa", "lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a"),
    ("LoKr", "lora_unet_transformer_blocks_0_attn_to_q.lokr_w1"),
    ("LoRA bias", "transformer.transformer_blocks.0.attn.to_q.lora_B.bias"),
])
def test_adapters_other_than_plain_lora_are_refused(ov_sd3, tmp_path, capsys, kind, key):
    """The README: DoRA, LoHa, LoKr and LoRA biases are refused, not applied as plain LoRA."""
    from safetensors.numpy import save_file

    from ovsd3.cli import EXIT_ERROR, main

    prefix = key.split(".")[0] + "." if key.startswith("lora_unet_") else "transformer.transformer_blocks.0.attn.to_q."
    plain = ({f"{prefix}lora_down.weight": np.ones((4, 32), np.float32),
              f"{prefix}lora_up.weight": np.ones((32, 4), np.float32)} if key.startswith("lora_unet_") else
             {f"{prefix}lora_A.weight": np.ones((4, 32), np.float32),
              f"{prefix}lora_B.weight": np.ones((32, 4), np.float32)})
    path = tmp_path / "adapter.safetensors"
    save_file({**plain, key: np.ones((32,), np.float32)}, str(path))
    code = main(["run", str(ov_sd3), "--prompt", "a cat", "--steps", "1", "--no-cache", "--lora", str(path),
                 "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(error) == 1, (kind, error)
    assert f"is not a plain LoRA (it has {key}: DoRA, LoHa, LoKr" in error[0], (kind, error)
    assert not (tmp_path / "out").exists()


def test_a_peft_dora_folder_is_refused(adapters, tmp_path):
    import json
    import shutil

    from ovsd3.runtime.adapters import read_adapter

    folder = tmp_path / "dora"
    shutil.copytree(adapters["a"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(OvsdError, match=r"adapter_config.json: a DoRA adapter \(use_dora\); only plain LoRA is supported"):
        read_adapter(folder, 2)
