"""`ovsd3 serve`: the real server on loopback, driven over HTTP as clients drive it."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from helpers import main  # noqa: F401  (sys.path set by pytest for tests/)
from ovsd3.serve.launch import serving

SIZE = 64
FAST = {"num_inference_steps": 2, "size": f"{SIZE}x{SIZE}"}
SLOW = {"num_inference_steps": 100, "size": "384x384"}  # tiny model's largest: slow enough to cancel


def running_server(folder, *extra):
    return serving(folder, "--device", "CPU", *map(str, extra))


@pytest.fixture(scope="module")
def server(ov_sd3):
    with running_server(ov_sd3, "--workers", "2", "--max-queue", "64") as base:
        yield base


def decode_png(data: str) -> Image.Image:
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def test_generations_returns_n_pngs(server):
    answer = httpx.post(f"{server}/v3/images/generations",
                        json={"prompt": "a photo of a cat", "n": 3, "seed": 5, **FAST}, timeout=60)
    assert answer.status_code == 200
    body = answer.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 3
    images = [decode_png(item["b64_json"]) for item in body["data"]]
    assert all(image.size == (SIZE, SIZE) for image in images)
    again = httpx.post(f"{server}/v3/images/generations",
                       json={"prompt": "a photo of a cat", "n": 3, "seed": 5, **FAST}, timeout=60).json()
    assert again["data"] == body["data"]  # same seed, same pictures


def png_upload(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_edits_start_from_the_uploaded_image(server, ov_sd3):
    """Two uploads, the same seed and settings: each answer is the pipeline's picture from that upload (so the
    upload is what the job started from), and the two differ."""
    import numpy as np

    from ovsd3.metrics import psnr
    from ovsd3.runtime import SD3Pipeline

    fields = {"prompt": "a blue digit seven", "n": "2", "strength": "0.5", "num_inference_steps": "4",
              "size": f"{SIZE}x{SIZE}", "seed": "1"}
    colours = [(200, 30, 30), (20, 40, 220)]
    answers = []
    for colour in colours:
        upload = {"image": ("start.png", png_upload(colour), "image/png")}
        answer = httpx.post(f"{server}/v3/images/edits", files=upload, data=fields, timeout=60)
        assert answer.status_code == 200, answer.text
        answers.append([np.asarray(decode_png(item["b64_json"]), float) for item in answer.json()["data"]])
    # compiled as the server's 2 workers are (2 calls at once: cores / 2 threads per call, whose sums can round
    # a pixel one level off a pipeline that has every core; tests/test_serve_workers.py)
    pipe = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, concurrency=2)
    expected = [[np.asarray(image, float) for image in pipe(
        fields["prompt"], image=Image.new("RGB", (SIZE, SIZE), colour), strength=0.5, num_inference_steps=4, seed=1,
        num_images_per_prompt=2, width=SIZE, height=SIZE).images] for colour in colours]
    for got, own, other in ((answers[0], expected[0], expected[1]), (answers[1], expected[1], expected[0])):
        assert len(got) == 2 and got[0].shape == (SIZE, SIZE, 3)
        assert all(np.array_equal(image, mine) for image, mine in zip(got, own))
        assert psnr(got[0], other[0], data_range=255.0) < 30.0  # the other upload's picture is another picture
    upload = {"image": ("start.png", png_upload(colours[0]), "image/png")}
    weaker = httpx.post(f"{server}/v3/images/edits", files=upload, data=dict(fields, strength="1.0"), timeout=60).json()
    assert not np.array_equal(np.asarray(decode_png(weaker["data"][0]["b64_json"]), float), answers[0][0])


def test_output_format_and_compression_are_honoured(server):
    """OpenAI's output_format (png, jpeg, webp) and output_compression (100 = least compressed)."""
    def draw(**fields) -> bytes:
        answer = httpx.post(f"{server}/v3/images/generations",
                            json={"prompt": "a photo of a cat", "seed": 3, **FAST, **fields}, timeout=60)
        assert answer.status_code == 200, answer.text
        return base64.b64decode(answer.json()["data"][0]["b64_json"])

    webp = draw(output_format="webp")
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    assert Image.open(io.BytesIO(webp)).size == (SIZE, SIZE)
    for kind, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        small, large = draw(output_format=kind, output_compression=5), draw(output_format=kind, output_compression=100)
        assert small.startswith(magic) and large.startswith(magic)
        assert len(small) < len(large), (kind, len(small), len(large))


def test_stream_true_is_refused(server):
    answer = httpx.post(f"{server}/v3/images/generations", json={"prompt": "cat", "stream": True, **FAST}, timeout=30)
    assert answer.status_code == 400 and "stream" in answer.json()["error"]["message"]
    assert "/v1/jobs/{id}/events" in answer.json()["error"]["message"]


def test_finished_jobs_are_bounded_by_count(monkeypatch):
    from ovsd3.serve import jobs

    assert (jobs.KEEP_FINISHED, jobs.KEEP_FINISHED_BYTES) == (256, 256 * 2**20)  # the README's limits
    monkeypatch.setattr(jobs, "KEEP_FINISHED", 3)
    pool = jobs.WorkerPool(lambda: None, workers=1, max_queue=4)
    try:
        finished = []
        for index in range(10):  # ten small finished jobs
            job = jobs.Job(jobs.GenerationRequest(prompt=f"a cat {index}"))
            job.emit("done", seed=index, images=["x"])
            pool.jobs[job.id] = job
            finished.append(job.id)
        pool._forget_old_jobs()
        assert list(pool.jobs) == finished[-3:]  # the newest three
    finally:
        pool.close()


def read_events(response) -> list[dict]:
    events, name, data = [], None, None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
        elif line == "" and name is not None:
            events.append(data)
            name = None
            if data["event"] in ("done", "error", "cancelled"):
                break
    return events


def test_job_events_arrive_in_order_with_previews(server):
    job = httpx.post(f"{server}/v1/jobs", json={"prompt": "a lighthouse", "preview_every": 2, "seed": 3,
                                                "num_inference_steps": 6, "size": f"{SIZE}x{SIZE}"}).json()
    with httpx.stream("GET", f"{server}/v1/jobs/{job['id']}/events", timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    kinds = [event["event"] for event in events]
    assert kinds == ["queued", "started"] + ["step"] * 6 + ["done"]
    assert [event["index"] for event in events] == list(range(len(events)))
    steps = [event for event in events if event["event"] == "step"]
    assert [step["step"] for step in steps] == list(range(1, 7))
    assert [("previews" in step) for step in steps] == [False, True, False, True, False, True]
    assert decode_png(steps[1]["previews"][0]).size == (SIZE, SIZE)
    status = httpx.get(f"{server}/v1/jobs/{job['id']}").json()
    assert status["status"] == "done" and status["data"][0]["b64_json"] == events[-1]["images"][0]


def job_events(server: str, body: dict) -> list[dict]:
    job = httpx.post(f"{server}/v1/jobs", json=body).json()
    with httpx.stream("GET", f"{server}/v1/jobs/{job['id']}/events", timeout=60) as response:
        return read_events(response)


def test_step_caching_per_request_and_server_default(server, ov_sd3):
    body = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 12, "guidance_scale": 5.0,
            "size": f"{SIZE}x{SIZE}", "preview_every": 0}
    cached = job_events(server, {**body, "cache": "taylorseer"})[-1]
    assert cached["event"] == "done"
    assert cached["cache"]["mode"] == "taylorseer" and cached["cache"]["full_calls"] == 9  # genai's schedule
    assert job_events(server, body)[-1]["cache"] == {**cached["cache"], "mode": "off", "full_calls": 12,
                                                     "skipped_calls": 0, "work": 12.0,
                                                     "full_work": 12.0, "share": 1.0}
    with running_server(ov_sd3, "--cache", "taylorseer:interval=2") as other:
        assert job_events(other, body)[-1]["cache"]["mode"] == "taylorseer:cache_interval=2"
        assert job_events(other, {**body, "cache": "off"})[-1]["cache"]["full_calls"] == 12


def test_cancel_stops_a_running_job(server):
    job = httpx.post(f"{server}/v1/jobs", json={"prompt": "a horse", "preview_every": 0, **SLOW}).json()
    with httpx.stream("GET", f"{server}/v1/jobs/{job['id']}/events", timeout=120) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if events[-1]["event"] == "step" and events[-1]["step"] == 1:
                    assert httpx.delete(f"{server}/v1/jobs/{job['id']}").status_code == 200
                if events[-1]["event"] in ("done", "error", "cancelled"):
                    break
    assert events[-1]["event"] == "cancelled"
    assert max(event.get("step", 0) for event in events) < 100
    assert httpx.get(f"{server}/v1/jobs/{job['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize("body, status, expected", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 2001}, 400, "prompt"),
    ({"prompt": "cat", "n": 9}, 400, "n"),
    ({"prompt": "cat", "size": "100x100"}, 400, "multiples of 16"),
    ({"prompt": "cat", "size": "400x400"}, 400, "between 16 and 384"),  # the tiny model's position embedding
    ({"prompt": "cat", "size": "big"}, 400, "512x512"),
    ({"prompt": "cat", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "cat", "num_inference_steps": 1000}, 400, "num_inference_steps"),
    ({"prompt": "cat", "colour": "red"}, 400, "colour"),  # an unknown field
    ({"prompt": "cat", "style": "baroque"}, 400, "style"),  # OpenAI's field, a value it does not have
    ({"prompt": "cat", "n": 2, "num_images_per_prompt": 2}, 400, "give one"),
    ({"prompt": "cat", "size": "64x64", "width": 64, "height": 64}, 400, "size and width/height"),
    ({"prompt": "cat", "strength": 0.5}, 400, "/v3/images/edits"),
    ({"prompt": "cat", "max_sequence_length": 600}, 400, "max_sequence_length"),
    ({"prompt": "cat", "rng_seed": -1}, 400, "rng_seed"),
    ({"prompt": "cat", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "cat", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "cat", "output_compression": 101}, 400, "output_compression"),
    ({"prompt": "cat", "cache": "warp-speed"}, 400, "unknown cache mode 'warp-speed'"),
    ({"prompt": "cat", "cache": "taylorseer:interval=-1"}, 400, "cache_interval must be at least 2"),
])
def test_bad_generation_requests_get_a_json_4xx(server, body, status, expected):
    answer = httpx.post(f"{server}/v3/images/generations", json=body, timeout=30)
    assert answer.status_code == status
    assert expected in answer.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # and it keeps serving


def test_bad_uploads_get_a_json_4xx(server):
    not_an_image = {"image": ("x.png", b"hello", "image/png")}
    answer = httpx.post(f"{server}/v3/images/edits", files=not_an_image, data={"prompt": "cat"})
    assert answer.status_code == 400 and "not a PNG" in answer.json()["error"]["message"]
    answer = httpx.post(f"{server}/v3/images/edits", data={"prompt": "cat"})
    assert answer.status_code == 400 and "image" in answer.json()["error"]["message"]
    too_big = {"image": ("big.png", b"\0" * (16 * 1024 * 1024 + 1), "image/png")}
    answer = httpx.post(f"{server}/v3/images/edits", files=too_big, data={"prompt": "cat"}, timeout=60)
    assert answer.status_code == 413 and "larger than" in answer.json()["error"]["message"]
    answer = httpx.post(f"{server}/v3/images/generations", content=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]["message"]
    assert httpx.get(f"{server}/v3/nothing-here").json()["error"]["type"] == "not_found_error"
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buffer, format="PNG")
    image = {"image": ("x.png", buffer.getvalue(), "image/png")}
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")  # a few kB that decode to 25 million pixels
    answer = httpx.post(f"{server}/v3/images/edits", files={"image": ("bomb.png", bomb.getvalue(), "image/png")},
                        data={"prompt": "cat"})
    assert answer.status_code == 400 and "5000x5000 is more than" in answer.json()["error"]["message"]
    bad_fields = (({"prompt": "cat", "quality": "hd"}, "quality"), ({"prompt": "cat", "n": "two"}, "n"),
                  ({"prompt": "cat", "strength": "0"}, "strength"), ({"prompt": "cat", "strength": "x"}, "strength"),
                  ({"prompt": ""}, "prompt"))
    for fields, expected in bad_fields:
        answer = httpx.post(f"{server}/v3/images/edits", files=image, data=fields)
        assert answer.status_code == 400 and expected in answer.json()["error"]["message"], answer.text
    assert httpx.get(f"{server}/v1/jobs/nope").status_code == 404
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_load_every_request_answered(server):
    """50 generation calls from 8 concurrent clients: every one answered with its picture, none lost."""
    def call(index: int) -> tuple[int, int]:
        answer = httpx.post(f"{server}/v3/images/generations",
                            json={"prompt": f"a photo of a cat {index}", "seed": index, **FAST}, timeout=300)
        return answer.status_code, len(answer.json().get("data", []))

    before = float(_metric(httpx.get(f"{server}/metrics").text, "ovsd3_images_total"))
    with ThreadPoolExecutor(max_workers=8) as clients:
        results = list(clients.map(call, range(50)))
    assert results == [(200, 1)] * 50
    metrics = httpx.get(f"{server}/metrics").text
    assert float(_metric(metrics, "ovsd3_images_total")) - before == 50
    assert float(_metric(metrics, "ovsd3_queue_length")) == 0
    assert float(_metric(metrics, "ovsd3_step_seconds_count")) > 0


def _metric(text: str, name: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith(name + " "))


def test_full_queue_answers_429(ov_sd3):
    with running_server(ov_sd3, "--workers", "1", "--max-queue", "1") as base:
        holding = httpx.post(f"{base}/v1/jobs", json={"prompt": "a", "preview_every": 0, **SLOW}).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health").json()["busy"] == 0:  # the worker has it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = httpx.post(f"{base}/v1/jobs", json={"prompt": "b", **FAST})
        assert waiting.status_code == 202
        refused = httpx.post(f"{base}/v3/images/generations", json={"prompt": "c", **FAST})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "ovsd3_rejected_total 1.0" in httpx.get(f"{base}/metrics").text
        httpx.delete(f"{base}/v1/jobs/{holding['id']}")


def test_serve_refuses_a_missing_folder(tmp_path, capsys):
    from ovsd3.cli import EXIT_ERROR

    assert main(["serve", str(tmp_path / "nope")]) == EXIT_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("ovsd3 serve: error: ") and "\n" not in error


def test_web_page_generates_with_a_live_preview(ov_sd3):
    """The page at / in headless Chromium (Debian's chromium and chromedriver): generate, see previews while
    sampling, then the result."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromedriver not found (apt-get install chromium chromium-driver; .ci/run does)"
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with running_server(ov_sd3, "--workers", "1") as base:
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            browser.get(base + "/")
            seen = set()
            browser.find_element(By.ID, "prompt").clear()
            browser.find_element(By.ID, "prompt").send_keys("a lighthouse on a rocky coast")
            browser.find_element(By.ID, "steps").send_keys("40")
            browser.find_element(By.ID, "n").clear()
            browser.find_element(By.ID, "n").send_keys("2")
            browser.find_element(By.ID, "generate").click()

            def finished(driver):
                status = driver.find_element(By.ID, "status").text
                seen.add(status)
                return status in ("done", "cancelled") or status.startswith("error")

            WebDriverWait(browser, 120, poll_frequency=0.02).until(finished)
            assert browser.find_element(By.ID, "status").text == "done"
            assert any(status.startswith("step ") for status in seen)  # progress shown while sampling
            previews = browser.find_elements(By.CSS_SELECTOR, "#preview img")
            results = browser.find_elements(By.CSS_SELECTOR, "#results img")
            assert len(previews) == 2 and len(results) == 2
            for image in previews + results:
                assert image.get_attribute("src").startswith("data:image/png;base64,")
                assert browser.execute_script("return arguments[0].naturalWidth", image) > 0  # it decoded
        finally:
            browser.quit()


def test_ovms_request_body_with_its_meaning(server):
    """OVMS's documented fields: rng_seed seeds (seed is its alias), num_images_per_prompt is n, width and
    height are size, prompt_2/prompt_3 and the negatives reach their encoders."""
    body = {"model": "ovsd3", "prompt": "a photo of a cat", "rng_seed": 11, "num_images_per_prompt": 2,
            "width": SIZE, "height": SIZE, "num_inference_steps": 2, "guidance_scale": 4.0,
            "max_sequence_length": 64, "negative_prompt": "blurry", "response_format": "b64_json"}
    first = httpx.post(f"{server}/v3/images/generations", json=body, timeout=60).json()
    assert len(first["data"]) == 2 and decode_png(first["data"][0]["b64_json"]).size == (SIZE, SIZE)
    alias = {key: value for key, value in body.items() if key not in ("rng_seed", "num_images_per_prompt")}
    second = httpx.post(f"{server}/v3/images/generations", json={**alias, "seed": 11, "n": 2}, timeout=60).json()
    assert second["data"] == first["data"]
    for extra in ({"prompt_2": "a dog"}, {"prompt_3": "a dog"}, {"negative_prompt_2": "a dog"}):
        other = httpx.post(f"{server}/v3/images/generations", json={**body, **extra}, timeout=60).json()
        assert other["data"][0] != first["data"][0], extra


def test_openai_client_against_the_server(server):
    """The official client, as a user of OpenAI's API or of OVMS writes it (base_url .../v3)."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v3", api_key="unused")
    ovms_extras = {"rng_seed": 7, "num_inference_steps": 2, "prompt_2": "a red sofa", "max_sequence_length": 77}
    answer = client.images.generate(model="ovsd3", prompt="a photo of a cat", n=2, size=f"{SIZE}x{SIZE}",
                                    response_format="b64_json", extra_body=ovms_extras)
    assert len(answer.data) == 2 and decode_png(answer.data[0].b64_json).size == (SIZE, SIZE)
    again = client.images.generate(model="ovsd3", prompt="a photo of a cat", n=2, size=f"{SIZE}x{SIZE}",
                                   response_format="b64_json", extra_body=ovms_extras)
    assert [item.b64_json for item in again.data] == [item.b64_json for item in answer.data]  # seeded
    openai_fields = client.images.generate(prompt="a photo of a cat", size=f"{SIZE}x{SIZE}", quality="high",
                                           style="natural", user="someone", background="auto", moderation="low",
                                           output_format="jpeg", output_compression=80,
                                           extra_body={"num_inference_steps": 1})
    raw = base64.b64decode(openai_fields.data[0].b64_json)
    assert raw[:3] == b"\xff\xd8\xff"  # output_format honoured: a JPEG
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (30, 200, 30)).save(buffer, format="PNG")
    edited = client.images.edit(model="ovsd3", image=("start.png", buffer.getvalue(), "image/png"),
                                prompt="a green digit", n=1, size=f"{SIZE}x{SIZE}", input_fidelity="low",
                                extra_body={"strength": 0.5, "num_inference_steps": 4, "rng_seed": 1})
    assert decode_png(edited.data[0].b64_json).size == (SIZE, SIZE)
    listed = client.images.edit(model="ovsd3", image=[("start.png", buffer.getvalue(), "image/png")],
                                prompt="a green digit", size=f"{SIZE}x{SIZE}",
                                extra_body={"strength": 0.5, "num_inference_steps": 4, "rng_seed": 1})
    assert listed.data[0].b64_json == edited.data[0].b64_json  # the client's list form, image[]
    with pytest.raises(openai.BadRequestError, match="colour"):
        client.images.generate(prompt="a cat", extra_body={"colour": "red"})


class BrokenPipeline:
    """A pipeline that fails inside (not on the request): the server must answer 500, not blame the caller."""

    size_multiple, max_size = 16, None
    defaults = __import__("ovsd3.layout", fromlist=["GenerationDefaults"]).GenerationDefaults()

    def prepare(self, prompt, **settings):
        raise RuntimeError("the accelerator caught fire")


def test_an_internal_failure_is_a_500():
    from starlette.testclient import TestClient

    from ovsd3.serve.api import create_app
    from ovsd3.serve.jobs import WorkerPool

    pool = WorkerPool(BrokenPipeline, workers=1, max_queue=4)
    try:
        with TestClient(create_app(pool)) as client:
            answer = client.post("/v3/images/generations", json={"prompt": "a cat"})
    finally:
        pool.close()
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "server_error" and "fire" in answer.json()["error"]["message"]


def test_write_ovms_config(ov_sd3, tmp_path):
    """The files OVMS documents for an image generation graph (docs/image_generation/reference.md)."""
    import subprocess
    import sys

    out = tmp_path / "ovms"
    done = subprocess.run([sys.executable, "-m", "ovsd3", "serve", str(ov_sd3), "--write-ovms-config", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ovms --rest_port 8000 --config_path" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_config_list": [{"config": {"name": ov_sd3.name, "base_path": ov_sd3.name}}]}
    graph = (out / ov_sd3.name / "graph.pbtxt").read_text()
    for line in ('input_stream: "HTTP_REQUEST_PAYLOAD:input"', 'output_stream: "HTTP_RESPONSE_PAYLOAD:output"',
                 'calculator: "ImageGenCalculator"', 'input_side_packet: "IMAGE_GEN_NODE_RESOURCES:pipes"',
                 "[type.googleapis.com / mediapipe.ImageGenCalculatorOptions]"):
        assert line in graph
    options = dict(line.strip().split(": ", 1) for line in graph.splitlines()
                   if line.startswith("          "))
    proto_fields = {"models_path", "device", "plugin_config", "max_resolution", "default_resolution",
                    "max_num_images_per_prompt", "default_num_inference_steps", "max_num_inference_steps",
                    "resolution", "num_images_per_prompt", "guidance_scale"}
    assert set(options) <= proto_fields
    assert json.loads(options["models_path"]) == str(ov_sd3.resolve())
    assert options["device"] == '"CPU"' and options["default_num_inference_steps"] == "28"
    assert options["default_resolution"] == '"128x128"' and options["max_resolution"] == '"384x384"'
    refused = subprocess.run([sys.executable, "-m", "ovsd3", "serve", str(ov_sd3), "--write-ovms-config", str(out)],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "already exists" in refused.stderr and "Traceback" not in refused.stderr


def test_sigterm_stops_the_server_cleanly(ov_sd3):
    """The README: on SIGTERM, as on Ctrl-C, serve stops taking work, cancels the running job at its next step,
    answers its client 503 and exits with code 0."""
    import signal
    import subprocess
    import sys

    from ovsd3.serve.launch import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "ovsd3", "serve", str(ov_sd3), "--port", str(port), "--device",
                                "CPU"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _answers(f"{base}/health"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        with ThreadPoolExecutor(1) as client:
            answer = client.submit(httpx.post, f"{base}/v3/images/generations",
                                   json={"prompt": "a cat", **SLOW}, timeout=600)
            while httpx.get(f"{base}/health").json()["busy"] == 0:
                assert not answer.done(), answer.result().text
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=600)
            status = answer.result().status_code
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert status == 503 and "cancelled 0 queued and 1 running job(s)" in output, (status, output)
    assert output.strip().endswith("ovsd3 serve: stopped") and "Traceback" not in output, output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
