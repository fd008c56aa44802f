"""Inpainting against diffusers' StableDiffusion3InpaintPipeline on the same weights and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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
    (dict(image=start_image(), mask_image=square_mask(), padding_mask_crop=-1),
     "padding_mask_crop must be between 0 and 16384"),
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


# -- padding_mask_crop -------------------------------------------------------------------------------------

def picture(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(width: int, height: int, box: tuple[int, int, int, int], mode: str = "L") -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask, "L").convert(mode)


@pytest.fixture(scope="module")
def shifted_diffusers(pipes):
    """diffusers' inpainting pipeline decoding as ovsd3 does, with the VAE's shift factor (the one deliberate
    difference, see ovsd3/runtime/inpaint.py), so that whole pictures can be compared."""
    diffusers_pipe = pipes[1]
    vae, shift = diffusers_pipe.vae, diffusers_pipe.vae.config.shift_factor
    plain_decode = vae.decode
    vae.decode = lambda latents, *args, **kwargs: plain_decode(latents + shift, *args, **kwargs)
    yield diffusers_pipe
    vae.decode = plain_decode


# (picture width, height), the mask's box, the padding, the generation's width, height, the mask's mode: a
# picture the generation's size, larger ones of other aspect ratios (the box widened, then "fill"), a box at
# the picture's edge (shifted back inside), no padding, an RGB mask
CROP_CASES = [((64, 64), (8, 16, 40, 48), 8, (64, 64), "L"), ((96, 80), (50, 10, 70, 30), 4, (64, 64), "L"),
              ((128, 64), (10, 20, 30, 60), 0, (64, 32), "L"), ((80, 128), (30, 100, 75, 127), 16, (32, 64), "RGB")]


@pytest.mark.parametrize("size, box, pad, generated, mode", CROP_CASES)
def test_padding_mask_crop_matches_diffusers(pipes, shifted_diffusers, size, box, pad, generated, mode):
    """The box around the mask redrawn at the generation's size and pasted back: diffusers' picture, at the
    original picture's size, the original's own pixels wherever the mask is black."""
    ovsd3_pipe = pipes[0]
    image, mask = picture(*size), box_mask(*size, box, mode)
    call = dict(image=image, mask_image=mask, strength=0.8, num_inference_steps=5, guidance_scale=3.0,
                width=generated[0], height=generated[1], padding_mask_crop=pad)
    got = ovsd3_pipe("a red digit 3", generator=torch.Generator().manual_seed(5), **call).images[0]
    expected = shifted_diffusers("a red digit 3", generator=torch.Generator().manual_seed(5), **call).images[0]
    assert got.size == expected.size == size
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert psnr(expected, got, data_range=255.0) >= MIN_PSNR
    kept = np.asarray(mask.convert("L")) == 0
    assert np.array_equal(got[kept], np.asarray(image, dtype=np.float64)[kept])
    # The crop is what was redrawn: more padding draws another picture inside the mask
    wider = ovsd3_pipe("a red digit 3", generator=torch.Generator().manual_seed(5),
                       **{**call, "padding_mask_crop": pad + 24}).images[0]
    assert psnr(expected[~kept], np.asarray(wider, dtype=np.float64)[~kept], data_range=255.0) < MIN_PSNR
    as_array = ovsd3_pipe("a red digit 3", generator=torch.Generator().manual_seed(5), output_type="np",
                          **call).images
    assert as_array.shape == (1, size[1], size[0], 3) and np.array_equal(np.round(as_array[0] * 255), got)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(data=st.data())
def test_crop_region_is_diffusers_get_crop_region(data):
    """Generated masks (boxes anywhere, single pixels, the whole picture), paddings (none to beyond the
    picture) and generation shapes: the same box as diffusers' VaeImageProcessor.get_crop_region."""
    from diffusers.image_processor import VaeImageProcessor

    from ovsd3.runtime.inpaint import crop_region

    width, height = data.draw(st.integers(1, 96)), data.draw(st.integers(1, 96))
    x1, y1 = data.draw(st.integers(0, width - 1)), data.draw(st.integers(0, height - 1))
    x2, y2 = data.draw(st.integers(x1 + 1, width)), data.draw(st.integers(y1 + 1, height))
    pad = data.draw(st.integers(0, 200))
    out_width, out_height = (16 * side for side in data.draw(st.tuples(st.integers(1, 8), st.integers(1, 8))))
    mask = box_mask(width, height, (x1, y1, x2, y2))
    assert crop_region(mask, out_width, out_height, pad) == \
        VaeImageProcessor.get_crop_region(mask, out_width, out_height, pad=pad)


@pytest.mark.parametrize("call, message", [
    (dict(padding_mask_crop=-1), "padding_mask_crop must be between 0 and 16384"),
    (dict(padding_mask_crop=16385), "padding_mask_crop must be between 0 and 16384"),
    (dict(padding_mask_crop=float("nan")), "padding_mask_crop"),
    (dict(padding_mask_crop=2.5), "padding_mask_crop"),
    (dict(padding_mask_crop="8"), "padding_mask_crop"),
    (dict(padding_mask_crop=True), "padding_mask_crop"),
    (dict(padding_mask_crop=8, mask_image=None), "padding_mask_crop crops around mask_image"),
    (dict(padding_mask_crop=8, output_type="latent"), "output_type 'pil' or 'np'"),
    (dict(padding_mask_crop=8, mask_image=np.zeros((SIZE, SIZE))), "padding_mask_crop needs mask_image as a picture"),
    (dict(padding_mask_crop=8, image=np.zeros((SIZE, SIZE, 3))), "padding_mask_crop needs image as a picture"),
    (dict(padding_mask_crop=8, mask_image=box_mask(SIZE, SIZE, (0, 0, 0, 0))), "mask_image is all black"),
], ids=["negative", "too-large", "nan", "fraction", "text", "bool", "no-mask", "latent", "mask-array",
        "image-array", "all-black"])
def test_bad_padding_mask_crop_is_a_value_error(pipes, call, message):
    call = {"image": start_image(), "mask_image": square_mask(), **call}
    with pytest.raises(InvalidRequest, match=message):
        pipes[0]("a cat", num_inference_steps=2, width=SIZE, height=SIZE, **call)


def test_padding_mask_crop_from_the_command_line(ov_sd3, tmp_path, capsys):
    from ovsd3.cli import EXIT_ERROR, main

    picture(96, 80).save(tmp_path / "in.png")
    box_mask(96, 80, (50, 10, 70, 30)).save(tmp_path / "mask.png")
    common = ["run", str(ov_sd3), "--prompt", "a cat", "--image", str(tmp_path / "in.png"), "--steps", "3",
              "--seed", "1", "--width", str(SIZE), "--height", str(SIZE)]
    assert main([*common, "--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "4",
                 "--output", str(tmp_path / "out")]) == 0
    saved = list((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (96, 80)  # the picture's size, not the generation's
    for extra, words in ((["--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "-3"],
                          "--padding-mask-crop must be between 0 and 16384"),
                         (["--padding-mask-crop", "4"], "--padding-mask-crop needs --mask")):
        assert main([*common, *extra, "--output", str(tmp_path / "bad")]) == EXIT_ERROR
        assert words in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_padding_mask_crop_on_the_edits_endpoint(ov_sd3):
    """The form field reaches the pipeline: the server's picture is the pipeline's own, at the upload's size;
    a bad value or one without a mask is a 400 naming the field."""
    import base64
    import io

    import httpx

    from ovsd3.serve.launch import serving

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    image, mask = picture(96, 80), box_mask(96, 80, (50, 10, 70, 30))
    expected = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)(
        "a cat", image=image, mask_image=mask, num_inference_steps=3, seed=9, width=SIZE, height=SIZE,
        padding_mask_crop=4).images[0]
    form = {"prompt": "a cat", "size": f"{SIZE}x{SIZE}", "num_inference_steps": "3", "rng_seed": "9"}
    uploads = {"image": ("in.png", png(image), "image/png"), "mask": ("m.png", png(mask), "image/png")}
    with serving(ov_sd3, "--device", "CPU") as base:
        answer = httpx.post(f"{base}/v3/images/edits", data={**form, "padding_mask_crop": "4"}, files=uploads,
                            timeout=120)
        negative = httpx.post(f"{base}/v3/images/edits", data={**form, "padding_mask_crop": "-1"}, files=uploads)
        maskless = httpx.post(f"{base}/v3/images/edits", data={**form, "padding_mask_crop": "4"},
                              files={"image": uploads["image"]})
    got = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert got.size == (96, 80) and np.array_equal(np.asarray(got), np.asarray(expected))
    for refused in (negative, maskless):
        assert refused.status_code == 400 and "padding_mask_crop" in refused.json()["error"]["message"]
