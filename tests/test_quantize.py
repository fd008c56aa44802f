"""`ovsd3 quantize` on tiny folders: INT8 transformer with a float patch embedding, INT8 VAE decoder
calibrated on the recorded final latents, 4-bit weights elsewhere, loadable everywhere, calibration
cached, and a quality gate that can refuse."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openvino as ov
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovsd3 import layout
from ovsd3.cli import EXIT_ERROR, main
from ovsd3.quantize.transformer import patch_embedding_convolution

from helpers import quantize

FOUR_BIT = {"i4", "u4"}


@pytest.fixture(scope="module")
def q_flash(workdir, ov_flash) -> Path:
    out = workdir / "q-flash"
    assert quantize(ov_flash, out) == 0
    return out


def fake_quantize_count(folder: Path, component: str) -> int:
    model = ov.Core().read_model(layout.model_xml(folder, component))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def element_types(model) -> set[str]:
    return {op.get_output_element_type(0).get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}


def fed_by_fake_quantize(node, depth: int = 4) -> bool:
    """Whether a FakeQuantize lies within ``depth`` producers upstream of ``node``."""
    if depth == 0:
        return False
    for value in node.input_values():
        producer = value.get_node()
        if producer.get_type_name() == "FakeQuantize" or fed_by_fake_quantize(producer, depth - 1):
            return True
    return False


@pytest.mark.parametrize("folder_fixture", ["q_flash", "q_sd3"])
def test_transformer_is_int8_except_the_patch_embedding(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    model = ov.Core().read_model(layout.model_xml(folder, layout.TRANSFORMER))
    fake_quantize = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantize) > 10
    conv_name = patch_embedding_convolution(model)
    conv = next(op for op in model.get_ops() if op.get_friendly_name() == conv_name)
    assert not fed_by_fake_quantize(conv)  # neither its input nor its weights are quantized
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    assert sum(fed_by_fake_quantize(op) for op in matmuls) >= len(matmuls) // 2


@pytest.mark.parametrize("folder_fixture, encoders", [
    ("q_flash", (layout.CLIP_L, layout.CLIP_G)), ("q_sd3", (layout.CLIP_L, layout.CLIP_G, layout.T5))])
def test_text_encoders_and_vae_encoder_carry_4bit_weights(request, folder_fixture, encoders):
    folder = request.getfixturevalue(folder_fixture)
    for component in (*encoders, layout.VAE_ENCODER):
        types = element_types(ov.Core().read_model(layout.model_xml(folder, component)))
        assert types & FOUR_BIT, (component, types)


@pytest.mark.parametrize("folder_fixture", ["q_flash", "q_sd3"])
def test_vae_decoder_is_int8_except_its_first_and_last_convolutions(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    model = ov.Core().read_model(layout.model_xml(folder, layout.VAE_DECODER))
    assert "i8" in element_types(model) and not element_types(model) & FOUR_BIT
    convs = {op.get_friendly_name().split("/")[0]: op for op in model.get_ops() if op.get_type_name() == "Convolution"}
    for name in ("__module.decoder.conv_in", "__module.decoder.conv_out"):
        assert not fed_by_fake_quantize(convs.pop(name), depth=2)  # neither input nor weights quantized
    assert all(fed_by_fake_quantize(conv, depth=2) for conv in convs.values())
    norms = [op for op in model.get_ops() if op.get_type_name() == "GroupNormalization"]
    assert norms and not any(fed_by_fake_quantize(op, depth=1) for op in norms)


def test_vae_decoder_was_calibrated_on_the_recorded_final_latents(workdir, ov_flash, q_flash, tmp_path):
    """The folder's decoder is exactly NNCF's on the cache's latents (2 prompts: 2 latents), and other latents
    would have given other ranges."""
    from ovsd3.quantize import calibration
    from ovsd3.quantize.vae import VaeDecoderQuantization, quantize_vae_decoder

    cache = workdir / "q-flash-calib"
    latents = calibration.RecordedLatents(cache, 2)
    assert [sample["latent_sample"].shape for sample in latents] == [(1, 16, 8, 8)] * 2
    assert layout.FolderRecord.load(q_flash).quantization["vae_decoder"]["calibration_latents"] == 2

    def ranges(xml: Path) -> list[np.ndarray]:
        """Every FakeQuantize's input range (saved as fp16 constants, behind a Convert)."""
        nodes = [op.input_value(i).get_node() for op in ov.Core().read_model(xml).get_ordered_ops()
                 if op.get_type_name() == "FakeQuantize" for i in (1, 2)]
        return [(node.input_value(0).get_node() if node.get_type_name() == "Convert" else node).get_data()
                for node in nodes]

    def requantized(samples) -> list[np.ndarray]:
        model = ov.Core().read_model(layout.model_xml(ov_flash, layout.VAE_DECODER))
        ov.save_model(quantize_vae_decoder(model, samples, VaeDecoderQuantization()), tmp_path / "decoder.xml")
        return ranges(tmp_path / "decoder.xml")

    shipped = ranges(layout.model_xml(q_flash, layout.VAE_DECODER))
    same = requantized(latents)
    assert len(shipped) == len(same) > 10 and all(np.array_equal(a, b) for a, b in zip(shipped, same))
    other = requantized([{"latent_sample": 3 * sample["latent_sample"]} for sample in latents])
    assert not all(np.array_equal(a, b) for a, b in zip(shipped, other))


def test_record_carries_sizes_and_gate(q_sd3):
    record = layout.FolderRecord.load(q_sd3)
    assert record.quantization["weights"] == {"mode": "int4_sym", "group_size": 8, "ratio": 0.8}
    assert set(record.quantization["sizes"]) == set(layout.MODEL_COMPONENTS)
    assert record.quantization["vae_decoder"]["mode"] == "int8"
    assert record.quantization["vae_decoder"]["calibration_latents"] == 1  # 8 samples: 1 prompt of 28 steps
    formats = {name: size["format"] for name, size in record.quantization["sizes"].items()}
    assert formats == {**{name: "int4_sym weights" for name in layout.MODEL_COMPONENTS},
                       layout.TRANSFORMER: "INT8", layout.VAE_DECODER: "INT8"}
    gate = record.quantization["gate"]
    assert len(gate["image_psnr"]) == len(gate["image_ssim"]) == 2 and len(gate["step_psnr"]) == 28
    assert gate["mean_psnr"] == pytest.approx(np.mean(gate["image_psnr"]))
    assert gate["mean_ssim"] == pytest.approx(np.mean(gate["image_ssim"]))
    # Not gated, so not implied by the command's success: the INT8 transformer's outputs stay near the float
    # ones at every step (measured 31-36 dB; another model's transformer gives noise against them).
    assert min(gate["step_psnr"]) >= 25.0, gate["step_psnr"]
    assert record.defaults == layout.GenerationDefaults()  # a quantized folder keeps its defaults


@pytest.mark.parametrize("folder_fixture", ["q_flash", "q_sd3"])
def test_quantized_folder_loads_in_every_runtime(request, folder_fixture, tmp_path):
    """ovsd3, openvino.genai and optimum-intel draw the same picture from the quantized folder (same IR, same
    seed: genai's TorchGenerator and diffusers' global stream are torch's, which ovsd3 draws); another seed is
    another picture."""
    import openvino_genai
    import torch
    from optimum.intel import OVStableDiffusion3Pipeline

    from ovsd3.metrics import psnr
    from ovsd3.runtime import SD3Pipeline

    folder = request.getfixturevalue(folder_fixture)
    assert main(["run", str(folder), "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2",
                 "--no-cache", "--output", str(tmp_path)]) == 0
    flash = folder_fixture == "q_flash"
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    pipe = SD3Pipeline.load(folder, precision="f32", cache_dir=None)

    guidance = 0.0 if flash else 7.0

    def ours(seed: int, steps: int, **extra) -> np.ndarray:
        return pipe("a cat", seed=seed, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                    width=64, height=64, **extra).images[0] * 255.0

    # genai: one step on Flash (its stochastic sampler's per-step noise is not diffusers'; 77 T5 tokens without T5)
    steps, extra = (1, {"max_sequence_length": 77}) if flash else (2, {})
    genai = openvino_genai.Text2ImagePipeline(str(folder), "CPU", **f32).generate(
        "a cat", width=64, height=64, num_inference_steps=steps, guidance_scale=guidance,
        generator=openvino_genai.TorchGenerator(1)).data[0].astype(np.float64)
    assert psnr(genai, ours(1, steps, **extra), data_range=255.0) >= 40.0
    assert psnr(genai, ours(2, steps, **extra), data_range=255.0) < 25.0
    torch.manual_seed(3)  # no generator: diffusers draws from torch's global stream
    optimum = OVStableDiffusion3Pipeline.from_pretrained(folder, ov_config=f32)(
        "a cat", width=64, height=64, num_inference_steps=2, guidance_scale=guidance,
        output_type="np").images[0] * 255.0
    assert psnr(optimum, ours(3, 2), data_range=255.0) >= 40.0
    assert psnr(optimum, ours(4, 2), data_range=255.0) < 25.0


def diffusers_timesteps(folder: Path, steps: int) -> list[float]:
    """The reference: diffusers' FlowMatchEulerDiscreteScheduler from the folder's own scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def test_calibration_cache_resumes(workdir, ov_flash, q_flash, capsys):  # q_flash: its run wrote the cache
    from ovsd3.quantize import calibration

    cache = workdir / "q-flash-calib"  # written by the q_flash fixture's run
    before = {path.name: path.stat().st_mtime_ns for path in cache.glob("prompt_*.npz")}
    assert len(before) == 2  # 8 samples = 2 prompts x 4 Flash steps
    plan = calibration.CalibrationPlan(samples=8, size=64, steps=4, guidance_scale=0.0)
    lines = []
    calibration.record(ov_flash, plan, calibration.load_prompts("builtin", 2), cache, lines.append)
    assert any("2 of 2 prompts already recorded" in line for line in lines)
    assert {path.name: path.stat().st_mtime_ns for path in cache.glob("prompt_*.npz")} == before
    samples = list(calibration.RecordedSamples(cache, 8))
    assert len(samples) == 8 and samples[0]["hidden_states"].shape == (1, 16, 8, 8)
    assert [float(s["timestep"][0]) for s in samples[:4]] == pytest.approx(diffusers_timesteps(ov_flash, 4), abs=0.01)


def test_calibration_cache_without_latents_is_recorded_again(workdir, ov_flash, tmp_path):
    """A cache written before the final latents were kept: its prompts are sampled again, and the decoder's
    calibration set refuses it with a one-line error rather than calibrating on nothing."""
    import shutil

    from ovsd3.errors import OvsdError
    from ovsd3.quantize import calibration

    cache = tmp_path / "old-cache"
    shutil.copytree(workdir / "q-flash-calib", cache)
    with np.load(cache / "prompt_00001.npz") as arrays:
        kept = {name: arrays[name] for name in calibration.INPUT_NAMES}
    np.savez(cache / "prompt_00001.npz", **kept)  # as an older ovsd3 wrote it
    with pytest.raises(OvsdError, match="holds no final latents"):
        list(calibration.RecordedLatents(cache, 2))
    lines = []
    plan = calibration.CalibrationPlan(samples=8, size=64, steps=4, guidance_scale=0.0)
    calibration.record(ov_flash, plan, calibration.load_prompts("builtin", 2), cache, lines.append)
    assert any("1 of 2 prompts already recorded" in line for line in lines)
    assert any("1 prompt(s) recorded by an older ovsd3 lack their final latents" in line for line in lines)
    with np.load(cache / "prompt_00001.npz") as arrays, np.load(workdir / "q-flash-calib" / "prompt_00001.npz") as old:
        assert np.array_equal(arrays["latent_sample"], old["latent_sample"])  # the same run, recorded again


def test_prompt_file_and_offline_fallback(tmp_path):
    from ovsd3.quantize.calibration import builtin_prompts, load_prompts

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red cube\n\na blue sphere\n")
    assert load_prompts(str(prompt_file), 3) == ["a red cube", "a blue sphere", "a red cube"]
    lines = []
    prompts = load_prompts("conceptual_captions", 5, lines.append)
    if lines:  # no hub here: the command says so and names the fallback
        assert "built-in prompt set" in lines[0] and "calibration/prompts.txt" in lines[0]
        assert prompts == builtin_prompts()[:5]
    assert len(prompts) == 5


@settings(max_examples=25, derandomize=True, deadline=None)
@given(length=st.integers(4090, 4200), before=st.integers(0, 3), padding=st.sampled_from(["", "  ", "\t"]))
def test_prompt_lines_are_at_most_4096_characters(tmp_path_factory, length, before, padding):
    """The README's bound: a prompt line of up to 4,096 characters (after stripping) is read, a longer one is a
    one-line error naming the file and the prompt."""
    from ovsd3.errors import OvsdError
    from ovsd3.prompt_file import read_prompt_file

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a cat\n" * before + padding + "x" * length + padding + "\n", encoding="utf-8")
    if length <= 4096:
        assert read_prompt_file(path)[-1] == "x" * length
    else:
        with pytest.raises(OvsdError) as refused:
            read_prompt_file(path)
        assert str(refused.value) == (f"prompt file {path}: prompt {before + 1} is {length} characters long "
                                      "(at most 4096)")


def test_a_long_prompt_line_is_refused_before_any_work(ov_flash, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "y" * 4097 + "\n")
    code = main(["quantize", str(ov_flash), str(tmp_path / "q"), "--dataset", str(prompts), "--calib", "4",
                 "--calib-size", "64", "--calib-cache", str(tmp_path / "calib")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(err) == 1 and "prompt 2 is 4097 characters long (at most 4096)" in err[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.txt"]


def test_heldout_prompts_are_not_calibration_prompts():
    from calibration import calibration_prompts, heldout_prompts

    assert len(calibration_prompts()) >= 300 and not set(heldout_prompts()) & set(calibration_prompts())


def test_the_tiny_gate_refuses_a_wrong_transformer(ov_sd3, ov_flash, tmp_path):
    """The negative control for TINY_GATE: a folder whose transformer is another model's (the Flash folder's,
    a strong random LoRA merged) draws other pictures, and the gate the quantize tests pass refuses it."""
    import os
    import shutil

    from calibration import heldout_prompts
    from helpers import TINY_MIN_PSNR, TINY_MIN_SSIM
    from ovsd3.quantize.gate import GateSettings, run_gate

    broken = tmp_path / "broken"
    shutil.copytree(ov_sd3, broken, copy_function=os.link, ignore=shutil.ignore_patterns(layout.TRANSFORMER))
    shutil.copytree(ov_flash / layout.TRANSFORMER, broken / layout.TRANSFORMER, copy_function=os.link)
    settings = GateSettings(prompts=tuple(heldout_prompts()[:2]), size=64, steps=28, guidance_scale=7.0,
                            min_psnr=TINY_MIN_PSNR, min_ssim=TINY_MIN_SSIM)
    report = run_gate(ov_sd3, broken, settings)
    assert not report.passed and report.mean_psnr < TINY_MIN_PSNR - 1.0 and report.mean_ssim < TINY_MIN_SSIM - 0.1
    assert run_gate(ov_sd3, ov_sd3, settings).passed  # and the same folder passes it


def test_forced_gate_failure_writes_nothing(workdir, ov_flash, tmp_path, capsys):
    out = tmp_path / "q"
    code = quantize(ov_flash, out, "--min-psnr", "99")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_ERROR and "quality gate failed" in err and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


@pytest.mark.parametrize("args, needle", [
    (("--calib", "0"), "--calib must be between 1 and 1000"),
    (("--dataset", "/no/such/prompts.txt"), "cannot read prompt file"),
    (("--weights", "int4_sym", "--ratio", "1.5"), "--ratio must be in (0, 1]"),
    (("--ignore", "no_such_node"), "no node named 'no_such_node'"),
    (("--vae-decoder", "fp8"), "argument --vae-decoder: invalid choice: 'fp8'"),
    (("--transformer-weights", "int2"), "argument --transformer-weights: invalid choice: 'int2'"),
])
def test_bad_input(ov_flash, tmp_path, capsys, args, needle):
    try:
        code = main(["quantize", str(ov_flash), str(tmp_path / "q"), "--calib-size", "64", "--calib", "4",
                     "--calib-cache", str(tmp_path / "calib"), *args])
    except SystemExit as stop:  # argparse's own refusal (a choice not offered): usage, then one error line
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_ERROR and err.startswith("ovsd3 quantize: error: ") and needle in err, err
    assert not (tmp_path / "q").exists()


def test_in_must_be_an_openvino_folder(tiny_sd3, tmp_path, capsys):
    code = main(["quantize", str(tiny_sd3), str(tmp_path / "q")])  # a PyTorch folder, not IR
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "IN must be a folder from `ovsd3 convert` or optimum-intel" in err


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    from ovsd3.metrics import ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(structural_similarity(a, b, channel_axis=2, data_range=255), abs=1e-9)
    assert ssim(a, a) == 1.0


def test_digits_demo_gate_scores_digits_and_can_refuse(ov_sd3, tmp_path, capsys, monkeypatch):
    """A folder marked as the digits demo: calibration and gate use digit prompts, the gate scores the share of
    digits drawn as asked, and refuses when it falls more than --max-digit-drop."""
    import shutil

    demo = tmp_path / "demo-ov"
    shutil.copytree(ov_sd3, demo)
    record = layout.FolderRecord.load(demo)
    record.demo = "digits"
    record.save(demo)
    # Also the --vae-decoder weights path (the decoder as before INT8 existed), to save a quantization.
    assert quantize(demo, tmp_path / "q", "--vae-decoder", "weights") == 0
    summary = layout.FolderRecord.load(tmp_path / "q").quantization
    assert summary["vae_decoder"] == {"mode": "weights"}
    assert summary["sizes"][layout.VAE_DECODER]["format"] == "int4_sym weights"
    assert fake_quantize_count(tmp_path / "q", layout.VAE_DECODER) == 0
    assert element_types(ov.Core().read_model(layout.model_xml(tmp_path / "q", layout.VAE_DECODER))) & FOUR_BIT
    gate = summary["gate"]
    assert set(gate["digit_accuracy"]) == {"reference", "candidate"}
    # The reference's share is the scorer's on the reference folder's own pictures at the gate's prompts and seeds
    from ovsd3.demo.digits import DigitScorer, evaluation_prompts
    from ovsd3.quantize.gate import GateSettings
    from ovsd3.runtime import SD3Pipeline

    prompts, seed = evaluation_prompts(2), GateSettings(prompts=(), size=64, steps=28, guidance_scale=7.0).seed
    pipe = SD3Pipeline.load(demo, device="CPU", cache_dir=None)
    drawn = [np.asarray(pipe(prompt, width=64, height=64, num_inference_steps=28, guidance_scale=7.0,
                             seed=seed + index).images[0]) for index, prompt in enumerate(prompts)]
    assert gate["digit_accuracy"]["reference"] == DigitScorer().score(drawn, prompts).accuracy
    capsys.readouterr()
    # a candidate drawing no digit where the original drew all: a drop of 100 points, past the default 15
    shares = iter((1.0, 0.0))
    monkeypatch.setattr(DigitScorer, "score", lambda self, images, prompts: SimpleNamespace(accuracy=next(shares)))
    assert quantize(demo, tmp_path / "q2") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "digits matching" in err
    assert not (tmp_path / "q2").exists()


@pytest.mark.parametrize("mode, weight_types", [("int8", {"u8", "i8"}), ("int4", FOUR_BIT)])
def test_weight_only_transformer_needs_no_calibration(ov_sd3, tmp_path, capsys, mode, weight_types):
    out = tmp_path / f"w-{mode}"
    assert quantize(ov_sd3, out, "--transformer-weights", mode, "--vae-decoder", "weights") == 0
    assert "calibration: not needed" in capsys.readouterr().out
    assert not (tmp_path / f"{out.name}-calib").exists()  # nothing was recorded
    model = ov.Core().read_model(layout.model_xml(out, layout.TRANSFORMER))
    assert fake_quantize_count(out, layout.TRANSFORMER) == 0  # activations stay in float
    assert element_types(model) & weight_types
    record = layout.FolderRecord.load(out)
    assert record.quantization["transformer"]["weights"] == mode
    assert record.quantization["sizes"][layout.TRANSFORMER]["format"] == f"{mode.upper()} weights"
    # Activations stay in float: closer to the original than the INT8 folder (23 dB), measured 31.5 dB for INT4
    assert record.quantization["gate"]["mean_psnr"] >= 27.0, record.quantization["gate"]
    assert main(["run", str(out), "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2",
                 "--no-cache", "--output", str(tmp_path / "images")]) == 0


def test_weight_only_transformer_with_an_int8_decoder_still_calibrates_the_decoder(ov_sd3, tmp_path):
    out = tmp_path / "w8-d8"
    assert quantize(ov_sd3, out, "--transformer-weights", "int8") == 0
    assert fake_quantize_count(out, layout.TRANSFORMER) == 0
    assert fake_quantize_count(out, layout.VAE_DECODER) > 0
    assert layout.FolderRecord.load(out).quantization["vae_decoder"]["calibration_latents"] == 1
