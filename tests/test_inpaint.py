"""Inpainting against diffusers' StableDiffusion3InpaintPipeline on the same weights and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovsd3.errors import InvalidRequest
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.images import load_image

SIZE = 64
MIN_PSNR = 35.0  # decoded images (a random tiny VAE, 8-bit)
MIN_LATENT_PSNR = 100.0  # the latents, where a wrong prompt or mask scores far below


@pytest.fixture(scope="module")
def pipes(ov_sd3_fp32, tiny_sd3):
    from diffusers import StableDiffusion3InpaintPipeline

    return SD3Pipeline.from_pretrained(ov_sd3_fp32, precision="f32", cache_dir=None), \
        StableDiffusion3InpaintPipeline.from_pretrained(tiny_sd3)


def start_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def square_mask(mode: str = "L") -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 8:40] = 255  # white: redrawn
    return Image.fromarray(mask, "L").convert(mode)


def diffusers_decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """diffusers' latents decoded as its text-to-image pipeline decodes (with the VAE's shift factor)."""
    config = pipe.vae.config
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("strength, steps, guidance, mode", [(0.6, 6, 3.0, "L"), (1.0, 4, 3.0, "RGB"),
                                                             (0.75, 5, 1.0, "1")])
def test_inpainting_matches_diffusers(pipes, strength, steps, guidance, mode):
    ovsd3_pipe, diffusers_pipe = pipes
    call = dict(image=start_image(), mask_image=square_mask(mode), strength=strength, num_inference_steps=steps,
                guidance_scale=guidance, width=SIZE, height=SIZE)
    got = ovsd3_pipe("a red digit 3", generator=torch.Generator().manual_seed(5), output_type="latent",
                     **call).images
    expected = diffusers_pipe("a red digit 3", generator=torch.Generator().manual_seed(5), output_type="latent",
                              **call).images
    agreement = psnr(expected.numpy().astype(np.float64), got.astype(np.float64), data_range=8.0)
    assert agreement >= MIN_LATENT_PSNR, agreement
    other = ovsd3_pipe("a blue digit 3", generator=torch.Generator().manual_seed(5), output_type="latent",
                       **call).images
    assert psnr(expected.numpy().astype(np.float64), other.astype(np.float64), data_range=8.0) < MIN_LATENT_PSNR - 30
    kept = np.asarray(square_mask("L"))[::8, ::8] == 0  # latent pixels outside the mask
    image_latents = ovsd3_pipe._encode_image(  # the image's own latents, with the generator's first draw
        load_image(start_image(), SIZE, SIZE),
        lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(5)).numpy())
    # Outside the mask both end at the image's own latents (to float rounding between two encoder calls)
    assert np.allclose(got[0][:, kept], image_latents[0][:, kept], rtol=1e-5, atol=1e-5)
    assert np.allclose(expected.numpy()[0][:, kept], image_latents[0][:, kept], rtol=1e-3, atol=1e-3)
    assert not np.allclose(got[0][:, ~kept], image_latents[0][:, ~kept], atol=1e-2)  # inside: redrawn
    pixels = ovsd3_pipe.decode(got, output_type="np")
    assert psnr(diffusers_decode(diffusers_pipe, expected).astype(np.float64), pixels.astype(np.float64),
                data_range=1.0) >= MIN_PSNR


def test_inpainting_from_the_command_line(ov_sd3, tmp_path):
    from ovsd3.cli import main

    start_image().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    assert main(["run", str(ov_sd3), "--prompt", "a cat", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "4", "--seed", "1", "--width", str(SIZE), "--height",
                 str(SIZE), "--no-cache", "--output", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert Image.open(png).size == (SIZE, SIZE)


@pytest.mark.parametrize("call, message", [
    (dict(mask_image=square_mask()), "mask_image needs an `image`"),
    (dict(image=start_image(), mask_image=square_mask().resize((32, 32))), "mask_image is 32x32 but the image is"),
    (dict(image=start_image(), mask_image=square_mask("F")), "mask_image has mode F"),
    (dict(image=start_image(), mask_image=np.zeros((2, 3, SIZE, SIZE))), "one grey mask"),
    (dict(image=start_image(), mask_image=square_mask(), padding_mask_crop=8), "padding_mask_crop"),
    (dict(image=start_image(), mask_image="/nonexistent/mask.png"), "cannot read mask"),
    (dict(image=start_image(), mask_image="{bomb}"), "mask .* more than 64 megapixels"),
], ids=["no-image", "size", "mode", "array-shape", "crop", "missing", "bomb"])
def test_bad_masks_are_value_errors(pipes, tmp_path, call, message):
    from test_safety import image_bomb

    ovsd3_pipe, _ = pipes
    if isinstance(call.get("mask_image"), str) and call["mask_image"] == "{bomb}":
        call = dict(call, mask_image=image_bomb(tmp_path / "bomb.png"))  # a few kB claiming 30000x30000
    with pytest.raises(InvalidRequest, match=message):
        ovsd3_pipe("a cat", num_inference_steps=2, width=SIZE, height=SIZE, **call)


def test_edits_endpoint_inpaints_with_openais_and_ovms_masks(ov_sd3):
    """OpenAI's mask (redraw where alpha is 0) and OVMS's (redraw where white) give the pipeline's picture."""
    import base64
    import io

    import httpx
    import openai

    from ovsd3.serve.launch import serving

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    transparent = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    transparent[..., 3] = 255 - np.asarray(square_mask())  # alpha 0 where the white square is
    openai_mask = Image.fromarray(transparent, "RGBA")
    expected = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)(
        "a cat", image=start_image(), mask_image=square_mask(), num_inference_steps=4, seed=9, width=SIZE,
        height=SIZE).images[0]
    with serving(ov_sd3, "--device", "CPU") as base:
        client = openai.OpenAI(base_url=f"{base}/v3", api_key="unused")
        answers = [client.images.edit(model="ovsd3", image=("in.png", png(start_image()), "image/png"),
                                      mask=("mask.png", png(mask), "image/png"), prompt="a cat",
                                      size=f"{SIZE}x{SIZE}", extra_body={"num_inference_steps": 4, "rng_seed": 9})
                   for mask in (openai_mask, square_mask())]
        wrong_size = httpx.post(f"{base}/v3/images/edits", data={"prompt": "a cat", "size": f"{SIZE}x{SIZE}"},
                                files={"image": ("in.png", png(start_image()), "image/png"),
                                       "mask": ("m.png", png(square_mask().resize((32, 32))), "image/png")})
    for answer in answers:
        got = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert wrong_size.status_code == 400 and "mask_image is 32x32" in wrong_size.json()["error"]["message"]


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_genai_inpainting_call(ov_sd3, strength):
    """openvino.genai's InpaintingPipeline.generate(prompt, image, mask_image, ...): uint8 tensors in and out, and
    on the same folder, seed and settings the picture genai's own InpaintingPipeline draws (both in f32)."""
    import openvino as ov
    import openvino_genai

    image = ov.Tensor(np.asarray(start_image())[None])
    mask = ov.Tensor(np.asarray(square_mask("RGB"))[None])
    settings = dict(strength=strength, num_inference_steps=4, width=SIZE, height=SIZE)
    genai = openvino_genai.InpaintingPipeline(str(ov_sd3), "CPU", INFERENCE_PRECISION_HINT="f32")
    theirs = genai.generate("a cat", image, mask, generator=openvino_genai.TorchGenerator(3), **settings).data[0]
    ovsd3_pipe = SD3Pipeline.load(ov_sd3, precision="f32", cache_dir=None)
    got = ovsd3_pipe.generate("a cat", image, mask, rng_seed=3, **settings)
    # Measured 51 dB, no pixel more than 1 apart (8-bit rounding); another seed ~14 dB
    assert np.abs(got.data[0].astype(float) - theirs).max() <= 2
    assert psnr(got.data[0].astype(float), theirs.astype(float), data_range=255.0) >= 45.0
    other = ovsd3_pipe.generate("a cat", image, mask, rng_seed=4, **settings).data[0]
    assert psnr(other.astype(float), theirs.astype(float), data_range=255.0) < 25.0
    expected = ovsd3_pipe("a cat", image=start_image(), mask_image=square_mask(), seed=3, noise="torch",
                          **settings).images[0]
    assert np.array_equal(got.data[0], np.asarray(expected))  # generate() is the diffusers-style call
