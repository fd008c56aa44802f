"""The HTTP API of ``ovsd3 serve`` (FastAPI): one function per route, registered by :func:`create_app`.

- ``POST /v3/images/generations`` and ``POST /v3/images/edits``: the image API of OpenVINO Model Server and
  OpenAI, with both their request fields (see :mod:`ovsd3.serve.bodies`); a client moves between ovsd3 and
  OVMS by changing its base URL.
- ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (server-sent events: progress and
  previews while sampling), ``DELETE /v1/jobs/{id}`` (cancel).
- ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (a web page).

Bad input gets a 4xx with an OpenAI-style JSON error ({"error": {"message", "type"}}); a full queue gets 429
with Retry-After; a failure inside ovsd3 gets 500 with the same shape.
"""

# No `from __future__ import annotations`: FastAPI reads the request models from the endpoints' annotations.

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ovsd3.serve.access import BearerKey
from ovsd3.serve.bodies import (BadRequest, EditBody, GenerationBody, Limits, ServerSettings, Unavailable,
                                check_image)
from ovsd3.serve.jobs import QueueFull, ShuttingDown

DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting image request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class AppState:
    """``backend``: where jobs run, a :class:`~ovsd3.serve.jobs.WorkerPool` in this process or a
    :class:`~ovsd3.serve.broker.BrokerQueue` in front of ``ovsd3 worker``s; both offer submit, job, limits_for,
    health, metric_families and closing."""

    backend: object
    limits: Limits
    default_cache: str | None
    default_noise: str
    model_name: str | None
    log_requests: bool = False

    def settings(self, model: str | None) -> ServerSettings:
        """How a body for ``model`` becomes a request (the model's own largest side and size multiple)."""
        max_size, size_multiple = self.backend.limits_for(model)
        limits = self.limits
        if max_size:
            limits = dataclasses.replace(limits, max_side=min(limits.max_side, max_size))
        return ServerSettings(limits, size_multiple, self.default_cache, self.default_noise)

    def submit(self, body, **extra):
        """``body`` checked against its model's limits and queued; the job."""
        request = body.to_request(self.settings(body.model), **extra)
        job = self.backend.submit(request, body.model)
        if self.log_requests:
            print(f"ovsd3 serve: job {job.id} model={body.model!r} {request.width}x{request.height} n={request.n} "
                  f"steps={request.num_inference_steps} prompt={request.prompt!r}", file=sys.stderr, flush=True)
        return job


def create_app(backend, *, limits: Limits = Limits(), model_name: str | None = None,
               default_cache: str | None = None, default_noise: str = "torch", api_keys: list[str] = (),
               log_requests: bool = False) -> FastAPI:
    """``default_cache``/``default_noise``: what a request gets when it names none (``ovsd3 serve`` options);
    ``model_name``: what /health calls the one model of an embedded server; ``api_keys``: if any, requests
    must bear one; ``log_requests``: each job's prompt and size to stderr."""
    app = FastAPI(title="ovsd3 serve", description="Stable Diffusion 3 on OpenVINO", lifespan=waiting_threads)
    app.state.ovsd3 = AppState(backend, limits, default_cache, default_noise, model_name, log_requests)
    for status_type, handler in ((RequestValidationError, invalid_body), (StarletteHTTPException, http_error),
                                 (BadRequest, bad_request), (QueueFull, queue_full), (ShuttingDown, shutting_down),
                                 (ClientDisconnect, client_gone), (Unavailable, unavailable),
                                 (Exception, internal_error)):
        app.add_exception_handler(status_type, handler)
    for method, path, endpoint in (("POST", "/v3/images/generations", generations),
                                   ("POST", "/v1/jobs", create_job),
                                   ("GET", "/v1/jobs/{job_id}", job_status),
                                   ("DELETE", "/v1/jobs/{job_id}", cancel_job),
                                   ("GET", "/v1/jobs/{job_id}/events", job_events),
                                   ("GET", "/health", health),
                                   ("GET", "/metrics", metrics)):
        app.add_api_route(path, endpoint, methods=[method], status_code=202 if path == "/v1/jobs" else 200,
                          responses=ERROR_RESPONSES)
    app.add_api_route("/v3/images/edits", edits, methods=["POST"], responses=ERROR_RESPONSES,
                      openapi_extra={"requestBody": {"required": True, "content": {
                          "multipart/form-data": {"schema": edit_form_schema()}}}})
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_middleware(BodyLimit, caps={"/v3/images/edits": limits.max_form_bytes}, default=limits.max_json_bytes)
    if api_keys:
        app.add_middleware(BearerKey, keys=list(api_keys))  # added last: it runs first, before a body is read
    return app


WAITING_THREADS = 512  # requests that wait for their job at once, each polling in a thread (asyncio's default: 6)


@contextlib.asynccontextmanager
async def waiting_threads(app):
    """A request waiting for its images polls its job in a thread; with asyncio's default pool (cores + 4) a
    few dozen waiting requests would hold every thread and new requests would queue behind them."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=WAITING_THREADS, thread_name_prefix="ovsd3-http")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=False, cancel_futures=True)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, cap: int):
        super().__init__(413, f"the request body is larger than this server takes ({cap} bytes)")


class BodyLimit:
    """ASGI middleware: a request body past its route's cap is refused (413) as soon as that shows, from its
    Content-Length before a byte of it is read, or as it arrives when it is sent in chunks; the route's own
    limits (one upload, one mask, each field) are checked after, on what is left."""

    def __init__(self, app, caps: dict[str, int], default: int):
        self.app, self.caps, self.default = app, caps, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.caps.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > cap):
            return await error(413, BodyTooLarge(cap).detail)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)  # inside the route: its exception handler answers, in JSON
            return message

        await self.app(scope, limited, send)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}}
ERROR_RESPONSES = {status: {"description": meaning, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                   for status, meaning in ((400, "invalid request: the message names the field"),
                                           (404, "no such job"), (409, "the job was cancelled"),
                                           (413, "request body or upload too large"),
                                           (429, "the queue is full (Retry-After)"),
                                           (503, "shutting down, or the broker cannot be reached (Retry-After)"))}


def edit_form_schema() -> dict:
    """The multipart form of /v3/images/edits, as OpenAPI states it: EditBody's fields as text (a form has no
    null: a field is given or left out) plus the image and mask files."""
    schema = EditBody.model_json_schema()
    properties = {}
    for name, field in schema["properties"].items():
        options = [option for option in field.get("anyOf", [field]) if option.get("type") != "null"]
        if options:  # a field that only takes null (style, moderation: not edit fields) is left out
            properties[name] = {key: value for key, value in {**field, **options[0]}.items() if key != "anyOf"}
    properties["image"] = {"type": "string", "format": "binary", "description": "the start image (PNG, JPEG, WebP)"}
    properties["mask"] = {"type": "string", "format": "binary",
                          "description": "inpainting: white (or transparent) is redrawn"}
    properties["control_image"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "description": "ControlNet: one control image per ControlNet of the folder"}
    properties["control_mask"] = {"type": "string", "format": "binary",
                                  "description": "an inpainting ControlNet's mask: white is redrawn"}
    return {"type": "object", "required": ["prompt", "image"], "properties": properties,
            "additionalProperties": False}


def state_of(request: Request) -> AppState:
    return request.app.state.ovsd3


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


# -- errors ---------------------------------------------------------------------------------------------

async def invalid_body(request: Request, exc: RequestValidationError):
    return error(400, _first_problem(exc.errors()))


async def http_error(request: Request, exc: StarletteHTTPException):  # unknown paths, wrong methods
    return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                 "invalid_request_error", headers=getattr(exc, "headers", None))


async def bad_request(request: Request, exc: BadRequest):
    return error(exc.status, str(exc))


async def queue_full(request: Request, exc: QueueFull):
    return error(429, "the queue is full; try again shortly", "rate_limit_error",
                 headers={"Retry-After": str(state_of(request).limits.retry_after_seconds)})


async def unavailable(request: Request, exc: Unavailable):
    return error(503, str(exc), "server_error",
                 headers={"Retry-After": str(state_of(request).limits.retry_after_seconds)})


async def shutting_down(request: Request, exc: ShuttingDown):
    return error(503, "the server is shutting down", "server_error")


async def client_gone(request: Request, exc: ClientDisconnect):  # mid-upload: nobody reads the answer
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception):
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


# -- the image API (OVMS, OpenAI) ---------------------------------------------------------------------

async def finished(job, request: Request):
    """The job once it ends; cancelled if the client goes away first (nobody would receive its images)."""
    while not await asyncio.to_thread(job.wait, DISCONNECT_POLL_SECONDS):
        if await request.is_disconnected():
            job.cancel()
            await asyncio.to_thread(job.wait)
    return job


def images_response(job, backend):
    if job.status == "error":
        return error(400, job.error) if job.caller_error else error(500, job.error, "server_error")
    if job.status == "cancelled" and backend.closing:
        return error(503, "the server is shutting down; the job was cancelled", "server_error")
    if job.status == "cancelled":
        return error(409, "the job was cancelled")
    return {"created": int(job.created), "data": _image_data(job)}


async def generations(body: GenerationBody, request: Request):
    state = state_of(request)
    job = await asyncio.to_thread(state.submit, body, previews=False)
    return images_response(await finished(job, request), state.backend)


async def edits(request: Request):
    state = state_of(request)
    limits = state.limits
    # files: image, mask, control images; fields each below max_field_bytes; BodyLimit caps the whole
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_form_fields,
                                  max_part_size=limits.max_field_bytes)
    except StarletteHTTPException as refused:  # starlette's multipart limits, said without naming them
        if refused.status_code != 400:
            raise
        raise BadRequest(f"multipart form: {refused.detail} (an edit is text fields, one 'image' file, at most "
                         f"one 'mask' file, {limits.max_control_images} 'control_image' files and one "
                         f"'control_mask' file; each text field "
                         f"at most {limits.max_field_bytes} bytes)") from None
    data = await _upload(form, limits)
    mask = await _mask_upload(form, limits)
    controls = await _control_uploads(form, limits)
    control_mask = await _control_mask_upload(form, limits)
    fields = _form_fields(form)
    try:
        body = EditBody.model_validate({key: value for key, value in fields.items() if value != ""})
    except ValidationError as invalid_form:
        raise BadRequest(_first_problem(invalid_form.errors())) from None
    job = await asyncio.to_thread(state.submit, body, previews=False, image=data, mask=mask, strength=body.strength,
                                  control_image=controls, control_mask=control_mask)
    return images_response(await finished(job, request), state.backend)


FILE_FIELDS = ("image", "image[]", "mask", "control_image", "control_image[]", "control_mask")
LIST_FIELDS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def _form_fields(form) -> dict:
    """The edit's text fields; a ControlNet keyword given several times is one value per ControlNet; a file
    under another name is refused by name."""
    fields = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{key}: not a file field (an edit's files are 'image', 'mask', 'control_image' and "
                             f"'control_mask')")
        values = [item for item in form.getlist(key) if item != ""]
        if values:
            fields[key] = values if key in LIST_FIELDS and len(values) > 1 else values[-1]
    return fields


async def _control_uploads(form, limits: Limits) -> list[bytes] | None:
    """The control images (multipart field ``control_image``, repeatable: one per ControlNet); None without."""
    uploads = [value for key in ("control_image", "control_image[]") for value in form.getlist(key) if value != ""]
    if not uploads:
        return None
    if any(isinstance(upload, str) for upload in uploads):
        raise BadRequest("control_image: an image file is expected (multipart field 'control_image')")
    if len(uploads) > limits.max_control_images:
        raise BadRequest(f"control_image: at most {limits.max_control_images} per edit (got {len(uploads)})")
    images = []
    for index, upload in enumerate(uploads):
        data = await upload.read()
        check_image(data, limits, f"control_image[{index}]" if len(uploads) > 1 else "control_image")
        images.append(data)
    return images


async def _control_mask_upload(form, limits: Limits) -> bytes | None:
    """An inpainting ControlNet's mask (multipart field ``control_mask``), one file; None without."""
    uploads = [value for value in form.getlist("control_mask") if value != ""]
    if not uploads:
        return None
    if len(uploads) > 1 or isinstance(uploads[0], str):
        raise BadRequest("control_mask: one mask image file (multipart field 'control_mask')")
    data = await uploads[0].read()
    check_image(data, limits, "control_mask")
    return data


async def _upload(form, limits: Limits) -> bytes:
    """The start image: multipart field ``image`` (OVMS, one file from the openai client) or ``image[]``
    (the openai client's list form), one file."""
    uploads = [value for key in ("image", "image[]") for value in form.getlist(key)]
    if not uploads or any(isinstance(upload, str) for upload in uploads):
        raise BadRequest("image: an image file is required (multipart field 'image')")
    if len(uploads) > 1:
        raise BadRequest(f"image: one start image per edit (got {len(uploads)})")
    data = await uploads[0].read()
    if len(data) > limits.max_upload_bytes:
        raise BadRequest(f"image: larger than {limits.max_upload_bytes} bytes", status=413)
    _check_image(data, limits.max_upload_pixels)
    return data


async def _mask_upload(form, limits: Limits) -> bytes | None:
    """The optional inpainting mask (multipart field ``mask``, as OpenAI and OVMS name it), one file."""
    masks = form.getlist("mask")
    if not masks or masks == [""]:
        return None
    if len(masks) > 1 or isinstance(masks[0], str):
        raise BadRequest("mask: one mask image file (multipart field 'mask')")
    data = await masks[0].read()
    if len(data) > limits.max_upload_bytes:
        raise BadRequest(f"mask: larger than {limits.max_upload_bytes} bytes", status=413)
    try:
        _check_image(data, limits.max_upload_pixels)
    except BadRequest as problem:
        raise BadRequest(str(problem).replace("image:", "mask:", 1)) from None
    return data


# -- jobs with live previews ----------------------------------------------------------------------------

async def create_job(body: GenerationBody, request: Request):
    job = await asyncio.to_thread(state_of(request).submit, body)
    return {"id": job.id, "status": job.status}


def find(request: Request, job_id: str):
    job = state_of(request).backend.job(job_id)
    if job is None:
        shown = repr(job_id) if len(job_id) <= 40 else f"{job_id[:32]!r}..."  # said on one line, whatever it holds
        raise BadRequest(f"no job {shown}", status=404)
    return job


async def job_status(job_id: str, request: Request):
    job = await asyncio.to_thread(find, request, job_id)
    answer = {"id": job.id, "status": job.status, "events": len(job.events)}
    if job.status == "done":
        answer["data"] = _image_data(job)
    if job.error:
        answer["error"] = job.error
    return answer


async def cancel_job(job_id: str, request: Request):
    job = await asyncio.to_thread(find, request, job_id)
    await asyncio.to_thread(job.cancel)
    return {"id": job.id, "status": job.status if job.finished else "cancelled"}  # a running one stops next step


async def job_events(job_id: str, request: Request):
    job = await asyncio.to_thread(find, request, job_id)

    async def stream():
        sent = 0
        while True:
            events = await asyncio.to_thread(job.events_from, sent, 15.0)
            if not events:
                yield ": keep-alive\n\n"
            for event in events:
                yield f"event: {event['event']}\nid: {event['index']}\ndata: {json.dumps(event)}\n\n"
            sent += len(events)
            if job.finished and sent >= len(job.events):
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- the service itself ---------------------------------------------------------------------------------

async def health(request: Request):
    state = state_of(request)
    answer = await asyncio.to_thread(state.backend.health)
    if state.model_name is not None:
        answer = {"status": answer.pop("status"), "model": state.model_name, **answer}
    return JSONResponse(answer, status_code=200 if answer["status"] == "ok" else 503)


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = _registry(state_of(request).backend)
    return Response(await asyncio.to_thread(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)


async def page():
    from importlib.resources import files

    return (files("ovsd3.serve") / "page.html").read_text()


def _first_problem(errors: list[dict]) -> str:
    """pydantic's first complaint as one line naming the field ("n: Input should be less than or equal to 8")."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int))
    return f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")


def _image_data(job) -> list[dict]:
    return [{"b64_json": image} for image in job.images]


def _check_image(data: bytes, max_pixels: int) -> None:
    check_image(data, Limits(max_upload_pixels=max_pixels, max_upload_bytes=len(data)))


def _registry(backend):
    """A registry per scrape, read from the backend (no module-level metric objects)."""
    from prometheus_client import CollectorRegistry

    class BackendCollector:
        def collect(self):
            yield from backend.metric_families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackendCollector())
    return registry
