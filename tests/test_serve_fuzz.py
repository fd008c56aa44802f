"""Schemathesis over `ovsd3 serve`'s own OpenAPI schema, against the real server on the tiny folder: every
generated request, valid by the schema (positive) or not (negative), ends in a 2xx or a 4xx JSON error naming
the problem, never a 500, never a hang.

The schema is the one the server publishes at /openapi.json: the JSON bodies from the request models (bounds
included), the edit's multipart form stated by the route. A fixed seed (derandomize) and example count keep the
run to about a minute; to keep it there, values inside the bounds that would make a slow generation (100 steps,
2048x2048, 8 images) are scaled down before sending (values outside them are sent as generated, to be refused),
and half the edits get a real PNG instead of random bytes, so that their numbers reach the pipeline.
"""

from __future__ import annotations

import io
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from ovsd3.serve import launch
from ovsd3.serve.launch import serving

EXAMPLES = 20  # per operation and mode
REQUEST_TIMEOUT = 60.0  # seconds; a generation of the tiny model takes well under one

OPERATIONS = [("POST", "/v3/images/generations"), ("POST", "/v3/images/edits"), ("POST", "/v1/jobs"),
              ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/events"),
              ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module", params=["embedded", "broker"])
def service(request, ov_sd3, tmp_path_factory):
    """`ovsd3 serve FOLDER`, and `ovsd3 serve --broker` in front of one `ovsd3 worker` (a real Redis)."""
    if request.param == "embedded":
        with serving(ov_sd3, "--device", "CPU", "--max-queue", "4") as base:
            yield base, schemathesis.openapi.from_url(f"{base}/openapi.json")
        return
    redis = launch.RedisServer(tmp_path_factory.mktemp("fuzz-redis")).start()
    worker = launch.start_worker(ov_sd3, redis.url, "fuzz")
    api, base = launch.start_api(redis.url, "--max-queue", "4")
    try:
        yield base, schemathesis.openapi.from_url(f"{base}/openapi.json")
    finally:
        launch.stop(api), launch.stop(worker), redis.stop()


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = small_png()


def quick(body) -> None:
    """Scale down what is valid but slow (see the module's docstring); leave everything else as generated."""
    if not isinstance(body, dict):
        return
    shrink = {"num_inference_steps": 2, "n": 2, "num_images_per_prompt": 2, "width": 64, "height": 64,
              "preview_every": 2}
    for name, most in shrink.items():
        value = body.get(name)
        if type(value) is int and 1 <= value <= 2048:
            body[name] = min(value, most)
    size = body.get("size")
    if isinstance(size, str) and re.fullmatch(r"\d{2,4}x\d{2,4}", size):
        body["size"] = "64x64"
    if isinstance(body.get("image"), bytes) and len(body["image"]) % 2 == 0:
        body["image"] = PNG


def test_the_schema_states_the_real_bodies(service):
    """Generated cases mean something only if the schema says what the routes take: the bounds of the numbers
    and the edit's form with its files."""
    _, schema = service
    raw = schema.raw_schema
    generation = raw["components"]["schemas"]["GenerationBody"]["properties"]
    assert generation["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert generation["guidance_scale"]["anyOf"][0]["maximum"] == 30.0
    form = raw["paths"]["/v3/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"] == {"type": "string", "format": "binary",
                                           "description": "the start image (PNG, JPEG, WebP)"}
    assert form["properties"]["strength"]["minimum"] == 0 and form["properties"]["strength"]["maximum"] == 1
    assert set(form["required"]) == {"prompt", "image"}


# Negative cases exist only where the schema constrains something a client sends: the bodies (any string is a
# valid job id, and /health and /metrics take nothing)
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + \
    [(method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{method} {path} {mode}" for method, path, mode in CASES])
def test_generated_requests_end_in_2xx_or_a_json_4xx(service, method, path, mode):
    base, schema = service
    operation = schema[path][method]
    answers: list[int] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        quick(case.body)
        response = case.call_and_validate(base_url=base, checks=[not_a_server_error], timeout=REQUEST_TIMEOUT)
        answers.append(response.status_code)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and "\n" not in error["message"] and "internal error" not in error["message"]

    check()
    assert answers and all(status < 500 for status in answers)
    if mode is GenerationMode.NEGATIVE and method == "POST":
        assert any(400 <= status < 500 for status in answers)  # the invalid bodies were refused, not drawn


# -- every number of a body, given what it cannot take ---------------------------------------------------------

# field: (lowest, highest, whole number?) as GenerationBody states them
NUMBERS = {"n": (1, 8, True), "num_images_per_prompt": (1, 8, True), "width": (16, 2048, True),
           "height": (16, 2048, True), "num_inference_steps": (1, 100, True), "guidance_scale": (0, 30, False),
           "strength": (0, 1, False), "rng_seed": (0, 2**64 - 1, True), "seed": (0, 2**64 - 1, True),
           "max_sequence_length": (1, 512, True), "output_compression": (0, 100, True),
           "partial_images": (0, 3, True), "preview_every": (0, 100, True),
           "skip_layer_guidance_scale": (0, 100, False), "skip_layer_guidance_start": (0, 1, False),
           "skip_layer_guidance_stop": (0, 1, False)}


def wrong_values(low, high, whole: bool):
    """What a field must refuse: past its bounds, NaN and infinities (Python's JSON reads them), true/false,
    text, lists, objects, and a fraction where a whole number goes."""
    from hypothesis import strategies as st

    kinds = [st.integers(max_value=low - 1), st.integers(min_value=high + 1),
             st.sampled_from([float("nan"), float("inf"), float("-inf"), True, False]),
             st.text(alphabet="abcxyz ", max_size=5), st.lists(st.integers(), max_size=2),
             st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)]
    kinds.append(st.floats(low, min(high, 1e6)).filter(lambda value: value != int(value)) if whole
                 else st.floats(min_value=high, exclude_min=True, allow_infinity=False))
    return st.one_of(kinds)


def test_every_number_refuses_what_it_cannot_take(service):
    import json

    import httpx
    from hypothesis import strategies as st

    base, _ = service
    fields = st.sampled_from(sorted(NUMBERS))

    @settings(max_examples=150, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), field=fields, route=st.sampled_from(["/v3/images/generations", "/v1/jobs"]))
    def check(data, field, route):
        value = data.draw(wrong_values(*NUMBERS[field]), label=field)
        body = json.dumps({"prompt": "a digit", field: value})  # NaN and Infinity written as Python's JSON reads
        answer = httpx.post(f"{base}{route}", content=body, headers={"content-type": "application/json"},
                            timeout=REQUEST_TIMEOUT)
        assert answer.status_code == 400, (field, value, answer.text)
        assert answer.json()["error"]["message"].startswith(f"{field}:"), (field, value, answer.text)

    check()


def test_n_zero_is_refused_not_drawn_as_one(service):
    import httpx

    base, _ = service
    for body in ({"prompt": "a", "n": 0}, {"prompt": "a", "num_images_per_prompt": 0}, {"prompt": "a", "n": -1}):
        answer = httpx.post(f"{base}/v3/images/generations", json=body, timeout=REQUEST_TIMEOUT)
        assert answer.status_code == 400 and "greater than or equal to 1" in answer.json()["error"]["message"]


# -- bodies bounded as a whole ------------------------------------------------------------------------------

def edit_parts(extra_files: int, extra_size: int) -> tuple[bytes, str]:
    """A multipart edit: prompt, image, and ``extra_files`` more file parts of ``extra_size`` bytes."""
    boundary = "ovsd3-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na digit\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
             f'Content-Type: image/png\r\n\r\n'.encode() + PNG + b"\r\n"]
    for index in range(extra_files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="extra{index}"; filename="x.bin"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + b"x" * extra_size + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def in_chunks(body: bytes):
    """The body sent without a Content-Length, as a client streaming it would."""
    for start in range(0, len(body), 2**20):
        yield body[start:start + 2**20]


@pytest.mark.parametrize("extra_files, extra_size, chunked, status, message", [
    # six extra 15 MB parts: refused from the declared length, before a byte is read ...
    (6, 15 * 2**20, False, 413, "the request body is larger than this server takes ({cap} bytes)"),
    # ... and without one, at the sixth file part (image, mask, two control images, a control mask: after about
    # 60 MB, not 90)
    (6, 15 * 2**20, True, 400, "multipart form: Too many files. Maximum number of files is 5."),
    # one 90 MB part, streamed: refused once the sum passes the cap (5 x 16 MB + the text fields)
    (1, 90 * 2**20, True, 413, "the request body is larger than this server takes ({cap} bytes)"),
], ids=["6x15MB-declared", "6x15MB-chunked", "90MB-chunked"])
def test_an_edit_is_bounded_as_a_whole(service, extra_files, extra_size, chunked, status, message):
    """Each part below the upload limit, their sum far above what an edit can hold."""
    import httpx

    from ovsd3.serve.bodies import LIMITS

    base, _ = service
    body, content_type = edit_parts(extra_files, extra_size)
    answer = httpx.post(f"{base}/v3/images/edits", content=in_chunks(body) if chunked else body,
                        headers={"content-type": content_type}, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["message"].startswith(message.format(cap=LIMITS.max_form_bytes)), answer.text


def test_a_sixth_file_part_is_refused_by_name(service):
    import httpx

    base, _ = service
    body, content_type = edit_parts(5, 10)  # image + 5 more: six files (image, mask, two control images, a mask)
    answer = httpx.post(f"{base}/v3/images/edits", content=body, headers={"content-type": content_type},
                        timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith("multipart form: Too many files. Maximum number of files "
                                                        "is 5.")


def test_a_json_body_past_1_mib_is_refused(service):
    import httpx

    base, _ = service
    answer = httpx.post(f"{base}/v1/jobs", json={"prompt": "a", "user": "x" * 2**20}, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 413 and "larger than this server takes (1048576 bytes)" in answer.text
