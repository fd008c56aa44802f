"""SD3Pipeline called the way diffusers' documentation calls StableDiffusion3Pipeline, against diffusers itself
(same tiny weights, same torch generator): keywords, embeddings, output types, callbacks, the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovsd3.errors import InvalidRequest
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.noise import TorchNoise

PROMPTS = ["a photo of a cat sitting on a red sofa", "a lighthouse in a storm"]
SIZE = dict(width=64, height=64)
# Float images (output_type "np") and latents from the f32 IR: measured 127-130 dB against diffusers, where a
# missing prompt_2 or numpy's noise scores 13-29 dB. 35 dB, the 8-bit images' bound, would pass a wrong sampler.
MIN_PSNR = 100.0
MIN_PSNR_8BIT = 45.0  # uint8 pictures: measured 51 dB, no pixel more than 1 apart


@pytest.fixture(scope="module")
def pipes(ov_sd3_fp32, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    return SD3Pipeline.from_pretrained(ov_sd3_fp32, precision="f32", cache_dir=None), \
        StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(expected, got, minimum: float = MIN_PSNR) -> bool:
    return psnr(np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64), data_range=1.0) >= minimum


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 16, 5, 3), (7,), (1, 33), (1, 16, 128, 128)])
def test_torch_noise_is_torch_randn(shape):
    """Blocks of 16, a redrawn tail, and torch's double-precision path under 16 values."""
    source, reference = TorchNoise(1234), generator(1234)
    for _ in range(2):
        np.testing.assert_allclose(source(shape), torch.randn(shape, generator=reference).numpy(), atol=1e-5)


def test_a_torch_generator_is_read_and_moved_on():
    used, reference = generator(5), generator(5)
    torch.randn(3, generator=used), torch.randn(3, generator=reference)  # a pending Box-Muller value too
    source = TorchNoise.from_torch(used)
    np.testing.assert_allclose(source((2, 16)), torch.randn((2, 16), generator=reference).numpy(), atol=1e-5)
    source((5,)), torch.randn(5, generator=reference)
    source.sync()
    np.testing.assert_array_equal(torch.randn(40, generator=used).numpy(), torch.randn(40, generator=reference).numpy())


def test_diffusers_keywords_draw_diffusers_pictures(pipes):
    ovsd3_pipe, diffusers_pipe = pipes
    call = dict(prompt=PROMPTS, prompt_2=["a dog", "a ship"], prompt_3=["neon colours", "in the rain"],
                negative_prompt="blurry", negative_prompt_2=["dark", "grainy"], num_images_per_prompt=2,
                num_inference_steps=3, guidance_scale=4.0, output_type="np", **SIZE)
    got = ovsd3_pipe(generator=generator(3), **call).images
    expected = diffusers_pipe(generator=generator(3), **call).images
    assert got.shape == expected.shape == (4, 64, 64, 3)
    assert close(expected, got)
    # prompt_2 reaches CLIP-G: without it the picture changes
    plain = ovsd3_pipe(generator=generator(3), **dict(call, prompt_2=None)).images
    assert not close(plain, got, minimum=40.0)  # measured 29 dB


def test_the_same_seed_draws_diffusers_picture(pipes):
    """ovsd3's default noise is torch's stream: seed=7 is diffusers' torch.Generator().manual_seed(7)."""
    ovsd3_pipe, diffusers_pipe = pipes
    call = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np", **SIZE)
    got = ovsd3_pipe(PROMPTS[0], seed=7, **call)
    expected = diffusers_pipe(PROMPTS[0], generator=generator(7), **call).images
    assert got.params[0]["noise"] == "torch" and close(expected, got.images)
    numpy_noise = ovsd3_pipe(PROMPTS[0], seed=7, noise="numpy", **call).images
    assert not close(expected, numpy_noise, minimum=40.0)  # numpy's stream is another picture (14 dB)


def test_embeddings_passed_in(pipes):
    ovsd3_pipe, diffusers_pipe = pipes
    with torch.no_grad():
        embeds = diffusers_pipe.encode_prompt(PROMPTS[1], None, None, negative_prompt="ugly")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, embeds))
    call = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", **SIZE)
    expected = diffusers_pipe(generator=generator(2), **given, **call).images
    got = ovsd3_pipe(generator=generator(2), **{name: value.numpy() for name, value in given.items()}, **call)
    assert close(expected, got.images)
    from_text = ovsd3_pipe(PROMPTS[1], negative_prompt="ugly", generator=generator(2), **call).images
    assert close(from_text, got.images)


def test_latent_output_and_return_dict(pipes):
    ovsd3_pipe, diffusers_pipe = pipes
    call = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent", return_dict=False, **SIZE)
    (got,) = ovsd3_pipe(PROMPTS[0], generator=generator(4), **call)
    (expected,) = diffusers_pipe(PROMPTS[0], generator=generator(4), **call)
    assert got.shape == tuple(expected.shape) == (1, 16, 8, 8)
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-3)
    pil = ovsd3_pipe(PROMPTS[0], num_inference_steps=2, seed=1, **SIZE).images
    assert pil[0].size == (64, 64)


def halve_latents_at_step_1(pipe, step, timestep, tensors):
    if step == 1:
        return {"latents": tensors["latents"] * 0.5}
    return {}


def interrupt_after_step_1(pipe, step, timestep, tensors):
    if step == 1:
        pipe._interrupt = True
    return tensors


@pytest.mark.parametrize("callback", [halve_latents_at_step_1, interrupt_after_step_1])
def test_callback_on_step_end_edits_latents_and_interrupts(pipes, callback):
    ovsd3_pipe, diffusers_pipe = pipes
    seen = []

    def watching(pipe, step, timestep, tensors):
        seen.append((step, float(timestep), sorted(tensors)))
        return callback(pipe, step, timestep, tensors)

    call = dict(num_inference_steps=4, guidance_scale=3.0, output_type="np", **SIZE)
    got = ovsd3_pipe(PROMPTS[0], generator=generator(9), callback_on_step_end=watching,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **call).images
    expected = diffusers_pipe(PROMPTS[0], generator=generator(9), callback_on_step_end=callback,
                              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **call).images
    assert close(expected, got)
    steps = [2] if callback is interrupt_after_step_1 else [4]
    assert [len(seen)] == steps and seen[0][2] == ["latents", "prompt_embeds"]
    assert seen[0][1] == pytest.approx(float(diffusers_pipe.scheduler.timesteps[0]))
    assert ovsd3_pipe.interrupt == (callback is interrupt_after_step_1) and ovsd3_pipe.num_timesteps == 4


def test_image_to_image_with_a_generator(pipes, tiny_sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    ovsd3_pipe, _ = pipes
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = dict(strength=0.6, num_inference_steps=5, guidance_scale=3.0, output_type="np", **SIZE)
    got = ovsd3_pipe(PROMPTS[0], image=init, seed=7, **call).images
    expected = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_sd3)(
        PROMPTS[0], image=init, generator=generator(7), **call).images
    assert close(expected, got)


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"])
def test_image_calls_take_diffusers_defaults(pipes, tiny_sd3, pipeline):
    """No steps or strength given: diffusers' image pipelines run 50 steps at strength 0.6, and so does ovsd3."""
    import diffusers
    from PIL import Image

    ovsd3_pipe, _ = pipes
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(64)[:, None] < 32, 255, 0).repeat(64, 1).astype(np.uint8), "L")
    extra = dict(mask_image=mask) if "Inpaint" in pipeline else {}
    call = dict(image=init, guidance_scale=3.0, output_type="latent", **SIZE, **extra)
    got = ovsd3_pipe(PROMPTS[0], generator=generator(8), **call).images
    expected = getattr(diffusers, pipeline).from_pretrained(tiny_sd3)(PROMPTS[0], generator=generator(8), **call).images
    agreement = psnr(expected.numpy().astype(np.float64), got.astype(np.float64), data_range=8.0)
    assert agreement >= MIN_PSNR, agreement
    assert ovsd3_pipe.num_timesteps == 30  # 50 steps at strength 0.6


def test_a_list_of_generators_draws_each_image_from_its_own(pipes):
    ovsd3_pipe, diffusers_pipe = pipes
    call = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np", num_images_per_prompt=2, **SIZE)
    got = ovsd3_pipe(PROMPTS[0], generator=[generator(1), generator(2)], **call).images
    expected = diffusers_pipe(PROMPTS[0], generator=[generator(1), generator(2)], **call).images
    assert close(expected, got)
    with pytest.raises(ValueError, match="list of generators of length 1"):
        ovsd3_pipe(PROMPTS[0], generator=[generator(1)], **call)


@pytest.mark.parametrize("settings, message", [
    (dict(prompt="cat", prompt_embeds=np.zeros((1, 333, 48))), "both `prompt` and `prompt_embeds`"),
    (dict(prompt=None), "either `prompt` or `prompt_embeds`"),
    (dict(prompt="cat", output_type="pt"), "output_type must be one of pil, np, latent"),
    (dict(prompt="cat", max_sequence_length=600), "cannot be greater than 512"),
    (dict(prompt=["a", "b"], negative_prompt=["c"], guidance_scale=3.0), "`negative_prompt` has batch size 1"),
    (dict(prompt="cat", callback_on_step_end_tensor_inputs=["noise_pred"]), "found ['noise_pred']"),
    (dict(prompt="cat", prompt_embeds=None, pooled_prompt_embeds=np.zeros((1, 40))), None),
    (dict(prompt=None, prompt_embeds=np.zeros((1, 333, 48))), "`pooled_prompt_embeds` also"),
    (dict(prompt=3), "has to be of type `str` or `list`"),
    (dict(prompt="cat", noise="dice"), "unknown noise source 'dice'"),
    (dict(prompt="cat", generator=12), "generator must be a torch.Generator"),
    (dict(prompt="cat", guidance_scale=float("nan")), "guidance must be a number from 0 to 100"),
    (dict(prompt="cat", guidance_scale=float("inf")), "guidance must be a number from 0 to 100"),
    (dict(prompt="cat", width=0), "positive multiples of 16"),
    (dict(prompt="cat", clip_skip=-1), "clip_skip must not be negative"),
    (dict(prompt="cat", max_sequence_length=0), "max_sequence_length must be at least 1"),
])
def test_invalid_values_are_value_errors(pipes, settings, message):
    ovsd3_pipe, _ = pipes
    if message is None:  # accepted, as diffusers accepts it (the pooled embeddings come from the prompt)
        ovsd3_pipe(num_inference_steps=1, guidance_scale=0.0, output_type="latent", **settings, **SIZE)
        return
    with pytest.raises(ValueError) as raised:
        ovsd3_pipe(num_inference_steps=1, **{**SIZE, **settings})
    assert isinstance(raised.value, InvalidRequest) and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_clip_wider_than_the_joint_width_is_cropped(workdir):
    """diffusers' small test configurations: CLIP-L + CLIP-G = 40 features, joint width 32."""
    from diffusers import StableDiffusion3Pipeline

    from conftest import _convert
    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    source = save_random_pipeline(get_preset("tiny-wide-clip"), workdir / "tiny-wide-clip", seed=5)
    folder = _convert(source, workdir / "ov-wide-clip", weight_format="fp32")
    call = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np", **SIZE)
    got = SD3Pipeline.load(folder, precision="f32", cache_dir=None)(PROMPTS[0], generator=generator(0), **call)
    expected = StableDiffusion3Pipeline.from_pretrained(source)(PROMPTS[0], generator=generator(0), **call).images
    assert close(expected, got.images)


def test_openvino_genai_generate_call(pipes, ov_sd3_fp32):
    """pipe.generate as openvino.genai's Text2ImagePipeline.generate: same properties, same generator, the
    same picture; a callback that returns True stops it."""
    import openvino_genai

    ovsd3_pipe, _ = pipes
    genai_pipe = openvino_genai.Text2ImagePipeline(str(ov_sd3_fp32), "CPU", INFERENCE_PRECISION_HINT="f32")
    properties = dict(width=64, height=64, num_inference_steps=3, guidance_scale=4.0, negative_prompt="blurry",
                      num_images_per_prompt=2, prompt_2="a dog")
    expected = genai_pipe.generate(PROMPTS[0], generator=openvino_genai.TorchGenerator(5), **properties).data
    got = ovsd3_pipe.generate(PROMPTS[0], generator=openvino_genai.TorchGenerator(5), **properties)
    assert got.data.dtype == np.uint8 and got.data.shape == expected.shape == (2, 64, 64, 3)
    assert psnr(expected.astype(np.float64), got.data.astype(np.float64), data_range=255.0) >= MIN_PSNR_8BIT
    default_seed = ovsd3_pipe.generate(PROMPTS[0], **properties).data  # rng_seed 42 unless given
    np.testing.assert_array_equal(default_seed, ovsd3_pipe.generate(PROMPTS[0], rng_seed=42, **properties).data)
    steps = []
    stopped = ovsd3_pipe.generate(PROMPTS[0], callback=lambda step, total, latent: steps.append(step) or step == 1,
                                  **properties)
    assert steps == [0, 1] and stopped.data.size == 0
    with pytest.raises(ValueError, match="ignores negative prompt"):
        ovsd3_pipe.generate(PROMPTS[0], guidance_scale=1.0, negative_prompt="x", width=64, height=64)
