"""The SD3 inpainting ControlNet (alimama-creative/SD3-Controlnet-Inpainting's kind: extra_conditioning_channels
1) fed as diffusers' StableDiffusion3ControlNetInpaintingPipeline feeds it: ``control_mask`` beside
``control_image``, drawn against diffusers on the same tiny weights, prompt, seed and fp32 IR; one mask for two
such nets; plain nets of the same folder keep the plain path; the one-line refusals (Python, CLI, service)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from controlnet_folders import controlnet_source
from helpers import last_line
from ovsd3 import layout
from ovsd3.cli import main
from ovsd3.errors import InvalidRequest
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline

# The issue's bar is 35 dB; with diffusers' T5 kept (as ovsd3 runs it) the pictures agree to float precision:
# measured 127-131 dB. Without the global draws of a net ahead in the folder, 13.5 dB.
MIN_PSNR = 100.0
CALL = dict(prompt="a red digit on grey", num_inference_steps=3, guidance_scale=4.0, output_type="np",
            width=64, height=64)
GLOBAL_SEED, SEED = 11, 3  # torch's global generator (the posteriors), the request's generator (the latents)


def inpainting_controlnet(tiny_sd3: Path, out: Path, seed: int) -> Path:
    """An inpainting ControlNet of the tiny transformer (16 latent channels + the mask), its zero-initialised
    control layers randomised so that image and mask count."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    torch.manual_seed(0)
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [*controlnet.controlnet_blocks.parameters(), *controlnet.pos_embed_input.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    controlnet.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(workdir, tiny_sd3) -> dict[str, Path]:
    return {"a": inpainting_controlnet(tiny_sd3, workdir / "cni-a", 4),
            "b": inpainting_controlnet(tiny_sd3, workdir / "cni-b", 6),
            "plain": controlnet_source(tiny_sd3, workdir / "cni-plain", seed=1)}


@pytest.fixture(scope="module")
def folders(workdir, tiny_sd3, ov_sd3_fp32, sources) -> dict[str, Path]:
    """inpaint: [a]; two: [a, b]; mixed: [a, plain]; plain: [plain]. Three ControlNet exports, the rest copied."""
    from controlnet_folders import with_controlnets

    every = with_controlnets(tiny_sd3, ov_sd3_fp32, [sources["a"], sources["b"], sources["plain"]],
                             workdir / "ov-cni-all", "fp32")
    made = {}
    for name, components in (("inpaint", ["controlnet"]), ("two", ["controlnet", "controlnet_1"]),
                             ("mixed", ["controlnet", "controlnet_2"]), ("plain", ["controlnet_2"])):
        folder = Path(shutil.copytree(ov_sd3_fp32, workdir / f"ov-cni-{name}"))
        for index, component in enumerate(components):
            shutil.copytree(every / component, folder / layout.controlnet_component(index))
        made[name] = folder
    return made


@pytest.fixture(scope="module")
def pipes(folders):
    """One pipeline per folder, made when first asked for."""
    made = {}

    def pipe(name: str) -> SD3Pipeline:
        if name not in made:
            made[name] = SD3Pipeline.from_pretrained(folders[name], precision="f32", cache_dir=None)
        return made[name]
    return pipe


def control_image(seed: int = 5) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def control_mask(box=(8, 16, 40, 48)) -> Image.Image:
    """White (redrawn) inside ``box`` (x1, y1, x2, y2), edges off the 8-pixel latent grid."""
    mask = np.zeros((64, 64), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask, "L")


def ovsd3_images(pipe, **call) -> np.ndarray:
    torch.manual_seed(GLOBAL_SEED)  # diffusers samples the masked images' posteriors from torch's global generator
    return pipe(generator=torch.Generator().manual_seed(SEED), **{**CALL, **call}).images


def diffusers_images(tiny_sd3: Path, nets: list[Path], inpainting: bool = True, draws_before=None,
                     **call) -> np.ndarray:
    """diffusers' picture; ``draws_before``: a shape drawn from torch's global generator first (what a net
    ahead of these in an ovsd3 folder draws)."""
    from diffusers import (SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline,
                           StableDiffusion3ControlNetPipeline)

    models = [SD3ControlNetModel.from_pretrained(folder) for folder in nets]
    kind = StableDiffusion3ControlNetInpaintingPipeline if inpainting else StableDiffusion3ControlNetPipeline
    pipe = kind.from_pretrained(tiny_sd3, controlnet=models if len(models) > 1 else models[0])  # with T5, as ovsd3
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(GLOBAL_SEED)
    if draws_before is not None:
        torch.randn(draws_before)
    return pipe(generator=torch.Generator().manual_seed(SEED), **{**CALL, **call}).images


def db(expected, got) -> float:
    return psnr(np.asarray(expected, np.float64), np.asarray(got, np.float64), data_range=1.0)


def test_an_inpainting_controlnet_draws_diffusers_pictures(pipes, sources, tiny_sd3):
    """Two images per prompt under guidance: one posterior per image, the same for both halves (diffusers)."""
    call = dict(control_image=control_image(), control_mask=control_mask(), controlnet_conditioning_scale=0.8,
                num_images_per_prompt=2)
    got = ovsd3_images(pipes("inpaint"), **call)
    expected = diffusers_images(tiny_sd3, [sources["a"]], **call)
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert db(expected, got) >= MIN_PSNR
    plain = ovsd3_images(pipes("inpaint"), **{**call, "controlnet_conditioning_scale": 0.0})
    assert db(plain, got) < 30.0  # the control counts


def test_one_mask_serves_two_inpainting_controlnets(pipes, sources, tiny_sd3):
    call = dict(control_image=[control_image(5), control_image(6)], control_mask=control_mask(),
                controlnet_conditioning_scale=[0.7, 1.2], control_guidance_end=[1.0, 0.7])
    got = ovsd3_images(pipes("two"), **call)
    expected = diffusers_images(tiny_sd3, [sources["a"], sources["b"]], **call)
    assert db(expected, got) >= MIN_PSNR


def test_the_mask_counts(pipes):
    """All black (nothing hidden: the whole image seen, the mask channel all ones) against a real mask; the same
    mask as a path, a numpy array and a torch tensor draws the same picture."""
    image = control_image()
    real = ovsd3_images(pipes("inpaint"), control_image=image, control_mask=control_mask())
    black = ovsd3_images(pipes("inpaint"), control_image=image, control_mask=np.zeros((64, 64), np.float32))
    assert db(black, real) < 30.0
    mask = np.asarray(control_mask(), np.float32) / 255.0
    for form in (mask, torch.from_numpy(mask)[None, None]):
        np.testing.assert_array_equal(ovsd3_images(pipes("inpaint"), control_image=image, control_mask=form), real)


def test_plain_nets_beside_an_inpainting_one_keep_the_plain_path(pipes, sources, tiny_sd3):
    """[inpainting a, plain] with the plain net at scale 0 draws a's picture; with a at 0, the plain net's
    picture as diffusers' plain pipeline draws it (after the global draws a's posterior took)."""
    image, mask = control_image(), control_mask()
    alone = ovsd3_images(pipes("inpaint"), control_image=image, control_mask=mask, controlnet_conditioning_scale=0.8)
    mixed = ovsd3_images(pipes("mixed"), control_image=[image, control_image(7)], control_mask=mask,
                         controlnet_conditioning_scale=[0.8, 0.0])
    np.testing.assert_array_equal(mixed, alone)
    got = ovsd3_images(pipes("mixed"), control_image=[image, control_image(7)], control_mask=mask,
                       controlnet_conditioning_scale=[0.0, 0.9])
    expected = diffusers_images(tiny_sd3, [sources["plain"]], inpainting=False, draws_before=(1, 16, 8, 8),
                                control_image=control_image(7), controlnet_conditioning_scale=0.9)
    assert db(expected, got) >= MIN_PSNR


@pytest.mark.parametrize("folder, settings_, message", [
    ("inpaint", dict(control_image=control_image()),
     r"^controlnet is an inpainting ControlNet \(one extra conditioning channel\): give control_mask"),
    ("mixed", dict(control_image=[control_image(), control_image()]), "controlnet is an inpainting ControlNet"),
    ("plain", dict(control_image=control_image(), control_mask=control_mask()),
     "control_mask given, but no ControlNet of .* takes a mask"),
    ("plain", dict(control_mask=control_mask()), "^control_mask needs a control_image$"),
    ("inpaint", dict(control_image=control_image(), control_mask=np.zeros((2, 64, 64))),
     r"^control_mask must be one grey mask \(H, W\)"),
    ("inpaint", dict(control_image=control_image(), control_mask=np.full((64, 64), np.nan)),
     "^control_mask is empty or holds NaN"),
    ("inpaint", dict(control_image=control_image(), control_mask="missing-mask.png"),
     "^cannot read control_mask missing-mask.png"),
    ("inpaint", dict(control_image=control_image(), control_mask=Image.new("I;16", (64, 64))),
     "^control_mask has mode I;16"),
    ("inpaint", dict(control_image=control_image(), control_mask=[control_mask(), control_mask()]),
     "^control_mask must be .*a list of 2: pass one image"),
], ids=["no-mask", "no-mask-mixed", "no-taker", "no-image", "shape", "nan", "no-file", "mode", "two-masks"])
def test_bad_mask_requests_are_refused_in_one_line(pipes, folder, settings_, message):
    with pytest.raises(InvalidRequest, match=message) as refused:
        pipes(folder).prepare("a cat", num_inference_steps=2, width=64, height=64, **settings_)
    assert "\n" not in str(refused.value)


def test_extra_channels_other_than_one_are_refused(folders, tmp_path):
    folder = Path(shutil.copytree(folders["inpaint"], tmp_path / "two-channels"))
    config_path = folder / "controlnet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "extra_conditioning_channels": 2}))
    pipe = SD3Pipeline.from_pretrained(folder, cache_dir=None)
    with pytest.raises(InvalidRequest, match="^controlnet takes 2 extra conditioning channels: ovsd3 feeds one "
                                             "extra channel, the mask"):
        pipe.prepare("a cat", control_image=control_image(), control_mask=control_mask(), width=64, height=64)


masks = st.one_of(
    st.none(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.builds(lambda shape, fill: np.full(shape, fill, np.float32),
              st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
              st.sampled_from([0.0, 0.3, 0.5, 1.0, -0.5, 2.0, float("nan"), float("inf")])),
    st.builds(lambda side, mode: Image.new(mode, (side, side)), st.integers(1, 80),
              st.sampled_from(["L", "1", "RGB", "RGBA", "F", "CMYK"])))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mask=masks)
def test_any_control_mask_runs_or_is_refused_in_one_line(pipes, mask):
    """Whatever the mask, the request's ControlJob is made (its latents the net's 17 channels) or one
    InvalidRequest line says why."""
    try:
        job = pipes("inpaint").prepare("a cat", num_inference_steps=1, width=64, height=64,
                                       control_image=control_image(), control_mask=mask)
    except InvalidRequest as error:
        assert "\n" not in str(error)
        return
    assert job.control.latents[0].shape == (2, 17, 8, 8)
    assert set(np.unique(job.control.latents[0][:, 16])) <= {0.0, 1.0}


def test_cli_runs_with_a_control_mask_and_refuses_bad_ones(folders, tmp_path, capsys):
    control_image().save(tmp_path / "c.png")
    control_mask().save(tmp_path / "m.png")
    run = ["run", str(folders["inpaint"]), "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64",
           "--no-cache", "--output", str(tmp_path / "out"), "--control-image", str(tmp_path / "c.png")]
    assert main(run + ["--control-mask", str(tmp_path / "m.png")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    assert main(run) == 2
    assert "without --control-mask, but controlnet/ of" in last_line(capsys)
    assert main(run + ["--control-mask", str(tmp_path / "missing.png")]) == 2
    assert "cannot read --control-mask" in last_line(capsys)
    assert main(run[:-2] + ["--control-mask", str(tmp_path / "m.png")]) == 2
    assert last_line(capsys).endswith("control_mask needs a control_image")
    plain = ["run", str(folders["plain"]), *run[2:]]
    assert main(plain + ["--control-mask", str(tmp_path / "m.png")]) == 2
    assert "--control-mask given, but no ControlNet of" in last_line(capsys)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_the_service_takes_a_control_mask(folders):
    from ovsd3.serve.launch import serving

    body = {"prompt": "a red digit on grey", "num_inference_steps": 2, "size": "64x64", "seed": 7,
            "control_image": png_base64(control_image())}
    with serving(folders["inpaint"], "--device", "CPU", "--workers", "1") as base:
        answer = httpx.post(f"{base}/v3/images/generations", json={**body, "control_mask": png_base64(control_mask())},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        drawn = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert drawn.size == (64, 64)
        missing = httpx.post(f"{base}/v3/images/generations", json=body, timeout=120)
        assert missing.status_code == 400 and "control_mask" in missing.json()["error"]["message"], missing.text
        alone = httpx.post(f"{base}/v3/images/generations",
                           json={**body, "control_image": None, "control_mask": png_base64(control_mask())},
                           timeout=120)
        assert alone.status_code == 400, alone.text
        assert alone.json()["error"]["message"] == "control_mask: needs a control_image"
        files = [("image", ("s.png", base64.b64decode(body["control_image"]), "image/png")),
                 ("control_image", ("c.png", base64.b64decode(body["control_image"]), "image/png")),
                 ("control_mask", ("m.png", base64.b64decode(png_base64(control_mask())), "image/png"))]
        fields = {"prompt": "a cat", "num_inference_steps": "2", "size": "64x64", "strength": "0.8"}
        edit = httpx.post(f"{base}/v3/images/edits", files=files, data=fields, timeout=120)
        assert edit.status_code == 200, edit.text
        text_mask = httpx.post(f"{base}/v3/images/edits", files=files[:2],
                               data={**fields, "control_mask": png_base64(control_mask())}, timeout=120)
        assert text_mask.status_code == 400 and "control_mask" in text_mask.json()["error"]["message"]


def test_the_broker_record_carries_the_control_mask():
    from ovsd3.serve.jobs import GenerationRequest

    mask = base64.b64decode(png_base64(control_mask()))
    request = GenerationRequest(prompt="a", control_image=[mask], control_mask=mask)
    assert GenerationRequest.from_record(json.loads(json.dumps(request.to_record()))) == request
    assert np.array_equal(np.asarray(request.pipeline_settings()["control_mask"]), np.asarray(control_mask()))


def test_control_mask_composes_with_image_to_image_inpainting_and_step_caching(pipes):
    """The inpainting ControlNet's mask is its own input, apart from the pipeline's image and mask_image: with
    image-to-image and inpainting the control still changes the picture, and a step cache skips the ControlNet
    with the transformer (a cached run near the uncached one, with fewer whole calls)."""
    pipe, image = pipes("inpaint"), control_image()
    control = dict(control_image=image, control_mask=control_mask())
    start, region = control_image(seed=9), Image.new("L", (64, 64), 255)
    for extra in (dict(image=start, strength=0.8), dict(image=start, mask_image=region, strength=0.8)):
        with_control = ovsd3_images(pipe, **control, **extra)
        assert np.isfinite(with_control).all()
        assert db(ovsd3_images(pipe, control_image=image, control_mask=control_mask(), **extra,
                               controlnet_conditioning_scale=0.0), with_control) < 30.0
    steps = {**control, "num_inference_steps": 8}
    exact = ovsd3_images(pipe, **steps)
    torch.manual_seed(GLOBAL_SEED)  # the same posterior sample of the masked image as the exact run's
    cached = pipe(generator=torch.Generator().manual_seed(SEED), cache="taylorseer:interval=2,before=1,after=-1",
                  **{**CALL, **steps})
    assert cached.cache_stats.full_calls < cached.cache_stats.steps
    uncontrolled = ovsd3_images(pipe, **steps, controlnet_conditioning_scale=0.0)
    assert db(exact, cached.images) > db(exact, uncontrolled) + 3.0, (db(exact, cached.images),
                                                                      db(exact, uncontrolled))
