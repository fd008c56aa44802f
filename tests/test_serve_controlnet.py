"""`ovsd3 serve` with diffusers' ControlNet keywords: ``control_image`` (base64 in JSON bodies, files on
/v3/images/edits), ``controlnet_conditioning_scale``, ``control_guidance_start``/``_end``, on a real server over a
tiny folder with one ControlNet; bad values answered 4xx JSON naming the field; the broker backend too."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from ovsd3.metrics import psnr
from ovsd3.serve.launch import serving

FAST = {"prompt": "a red digit on grey", "num_inference_steps": 3, "size": "64x64", "seed": 7,
        "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def server(cn_folder):
    with serving(cn_folder, "--device", "CPU", "--workers", "1") as base:
        yield base


def png(seed: int = 5, side: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def picture(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    raw = base64.b64decode(answer.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float64)


def generate(base: str, **fields) -> httpx.Response:
    return httpx.post(f"{base}/v3/images/generations", json={**FAST, **fields}, timeout=120)


def in_process(folder, **call) -> np.ndarray:
    """What SD3Pipeline draws for FAST with ``call``: the server must draw the same."""
    from ovsd3.runtime import SD3Pipeline

    pipe = SD3Pipeline.from_pretrained(folder, cache_dir=None)
    image = pipe(FAST["prompt"], width=64, height=64, num_inference_steps=3, guidance_scale=5.0, seed=7,
                 noise="torch", **call).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_json_control_image_draws_what_the_pipeline_draws(server, cn_folder):
    control = Image.open(io.BytesIO(png()))
    got = picture(generate(server, control_image=b64(png()), controlnet_conditioning_scale=0.8,
                           control_guidance_end=0.7))
    expected = in_process(cn_folder, control_image=control, controlnet_conditioning_scale=0.8,
                          control_guidance_end=0.7)
    assert psnr(expected, got, data_range=255.0) >= 40.0
    plain = picture(generate(server))
    assert psnr(plain, got, data_range=255.0) < 30.0  # the control counts
    # a list (one per ControlNet) and scale 0: the plain picture
    assert np.array_equal(picture(generate(server, control_image=[b64(png())], controlnet_conditioning_scale=[0.0])),
                          plain)


def test_edit_takes_control_image_files(server):
    start = png(seed=9)
    files = [("image", ("start.png", start, "image/png")), ("control_image", ("c.png", png(), "image/png"))]
    data = {"prompt": FAST["prompt"], "num_inference_steps": "3", "size": "64x64", "seed": "7", "strength": "0.8",
            "guidance_scale": "5.0"}
    controlled = picture(httpx.post(f"{server}/v3/images/edits", files=files, data=data, timeout=120))
    plain = picture(httpx.post(f"{server}/v3/images/edits", files=files[:1], data=data, timeout=120))
    zero = picture(httpx.post(f"{server}/v3/images/edits", files=files,
                              data={**data, "controlnet_conditioning_scale": "0"}, timeout=120))
    assert psnr(plain, controlled, data_range=255.0) < 35.0 and np.array_equal(plain, zero)


def refused(answer: httpx.Response, field: str, statuses=(400, 413, 422)) -> None:
    assert answer.status_code in statuses, answer.text
    message = answer.json()["error"]["message"]
    assert field in message and "\n" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("fields, field", [
    ({"control_image": "not base64!"}, "control_image"),
    ({"control_image": b64(b"not an image")}, "control_image"),
    ({"control_image": []}, "control_image"),
    ({"control_image": [b64(png())] * 3}, "control_image"),  # more than an edit's upload limit
    ({"control_image": [b64(png()), b64(png())]}, "control_image"),  # two images for one ControlNet
    ({"controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale"),  # no control_image
    ({"control_image": b64(png()), "controlnet_conditioning_scale": [0.5, 0.5]}, "controlnet_conditioning_scale"),
    ({"control_image": b64(png()), "control_guidance_start": 0.8, "control_guidance_end": 0.2},
     "control_guidance_start"),
    ({"control_image": b64(png()), "controlnet_conditioning_scale": True}, "controlnet_conditioning_scale"),
], ids=["bad-base64", "not-an-image", "empty-list", "three", "two-for-one", "scale-alone", "two-scales",
        "window", "bool"])
def test_bad_control_fields_are_refused_by_name(server, fields, field):
    refused(generate(server, **fields), field)


def test_a_folder_without_controlnet_refuses_control(ov_sd3):
    with serving(ov_sd3, "--device", "CPU", "--workers", "1") as base:
        answer = generate(base, control_image=b64(png()))
    assert answer.status_code == 400, answer.text
    assert "control_image" in answer.json()["error"]["message"]


def test_too_many_control_files_on_an_edit(server):
    files = [("image", ("s.png", png(), "image/png"))] + [("control_image", (f"{i}.png", png(i), "image/png"))
                                                         for i in range(3)]
    answer = httpx.post(f"{server}/v3/images/edits", files=files, data={"prompt": "a"}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == "control_image: at most 2 per edit (got 3)"


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), st.booleans(),
                    st.text(max_size=5), st.none(), st.lists(st.floats(-5, 200), max_size=10))


@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"]),
       value=NUMBERS)
def test_generated_control_values_end_in_an_image_or_a_named_4xx(server, name, value):
    body = {**FAST, "num_inference_steps": 1, "control_image": b64(png()), name: value}
    answer = httpx.post(f"{server}/v3/images/generations", content=json.dumps(body, allow_nan=True),
                        headers={"content-type": "application/json"}, timeout=120)
    if answer.status_code != 200:
        refused(answer, name if name in answer.json()["error"]["message"] else "control")


def test_request_record_carries_control_images():
    """What the broker stores in its job hash (JSON) gives the same request back."""
    from ovsd3.serve.jobs import GenerationRequest
    from ovsd3.serve.runner import batch_key

    request = GenerationRequest(prompt="a", control_image=[png(1), png(2)], controlnet_conditioning_scale=[0.5, 1.0],
                                control_guidance_end=0.6)
    record = json.loads(json.dumps(request.to_record()))
    assert GenerationRequest.from_record(record) == request
    assert batch_key(request) is None  # control jobs are drawn alone
    settings_ = request.pipeline_settings()
    assert len(settings_["control_image"]) == 2 and settings_["controlnet_conditioning_scale"] == [0.5, 1.0]


def test_broker_backend_draws_with_control(tmp_path, cn_folder):
    from ovsd3.serve import launch

    redis = launch.RedisServer(tmp_path / "redis", password="cn2-test")
    redis.start()
    processes = []
    try:
        processes.append(launch.start_worker(cn_folder, redis.url, "w1"))
        process, base = launch.start_api(redis.url)
        processes.append(process)
        got = picture(generate(base, control_image=b64(png()), controlnet_conditioning_scale=0.8,
                               control_guidance_end=0.7))
        refused(generate(base, control_image=[b64(png()), b64(png())]), "control_image")
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
        redis.stop()
    expected = in_process(cn_folder, control_image=Image.open(io.BytesIO(png())), controlnet_conditioning_scale=0.8,
                          control_guidance_end=0.7)
    assert psnr(expected, got, data_range=255.0) >= 40.0
