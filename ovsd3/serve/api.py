"""The HTTP API of ``ovsd3 serve`` (FastAPI).

- ``POST /v3/images/generations`` and ``POST /v3/images/edits``: the OpenAI-style image API that OpenVINO Model
  Server serves too, with SD3's options (negative_prompt, num_inference_steps, guidance_scale, seed); a client
  moves between the two by changing its base URL.
- ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (server-sent events: progress and
  previews while sampling), ``DELETE /v1/jobs/{id}`` (cancel).
- ``GET /health``, ``GET /metrics`` (Prometheus).

Bad input gets a 4xx with an OpenAI-style JSON error ({"error": {"message", "type"}}); a full queue gets 429
with Retry-After.
"""

# No `from __future__ import annotations`: FastAPI reads the request models from the endpoints' annotations,
# which must be real classes (they are defined inside create_app, with the limits in force).

import asyncio
import dataclasses
import io
import json
from dataclasses import dataclass

from ovsd3.runtime.cache import CacheConfig, CacheSettingError
from ovsd3.serve.jobs import GenerationRequest, Job, QueueFull, WorkerPool


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_images: int = 8  # n per call
    max_side: int = 2048
    min_side: int = 16
    max_steps: int = 100
    max_guidance: float = 30.0
    max_upload_bytes: int = 16 * 1024 * 1024
    retry_after_seconds: int = 5


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_size(size: str | None, limits: Limits, multiple: int) -> tuple[int | None, int | None]:
    """"WxH" (or "auto"/None: the model's own size) -> (width, height)."""
    if size in (None, "", "auto"):
        return None, None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise BadRequest(f"size must look like 512x512 (got {size!r})") from None
    for side in (width, height):
        if not limits.min_side <= side <= limits.max_side or side % multiple:
            raise BadRequest(f"size sides must be multiples of {multiple} between {limits.min_side} and "
                             f"{limits.max_side} (got {size})")
    return width, height


def create_app(pool: WorkerPool, *, limits: Limits = Limits(), model_name: str = "ovsd3",
               default_cache: str | None = None):
    """``default_cache``: the step caching a request gets when it names none (``ovsd3 serve --cache``)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    pipe = pool.pipelines[0]
    size_multiple = getattr(pipe, "size_multiple", 16)
    if getattr(pipe, "max_size", None):
        limits = dataclasses.replace(limits, max_side=min(limits.max_side, pipe.max_size))

    class GenerationBody(BaseModel):
        model_config = ConfigDict(extra="forbid")  # an unknown field is a mistake worth hearing about

        prompt: str = Field(min_length=1, max_length=limits.max_prompt_chars)
        model: str | None = None
        n: int = Field(1, ge=1, le=limits.max_images)
        size: str | None = None
        response_format: str = "b64_json"
        negative_prompt: str | None = Field(None, max_length=limits.max_prompt_chars)
        num_inference_steps: int | None = Field(None, ge=1, le=limits.max_steps)
        guidance_scale: float | None = Field(None, ge=0.0, le=limits.max_guidance)
        seed: int | None = Field(None, ge=0, lt=2**32)
        preview_every: int = Field(1, ge=0, le=limits.max_steps)
        cache: str | None = Field(None, max_length=200)  # step caching, as `ovsd3 run --cache`

        def to_request(self, *, previews: bool = True, **extra) -> GenerationRequest:
            """``previews``: False where nobody would see them (the calls that answer with the images)."""
            if self.response_format != "b64_json":
                raise BadRequest("response_format must be b64_json (images are not stored for URLs)")
            width, height = parse_size(self.size, limits, size_multiple)
            try:
                cache = str(CacheConfig.parse(self.cache if self.cache is not None else default_cache))
            except CacheSettingError as problem:
                raise BadRequest(f"cache: {problem}") from None
            return GenerationRequest(prompt=self.prompt, n=self.n, width=width, height=height,
                                     negative_prompt=self.negative_prompt,
                                     num_inference_steps=self.num_inference_steps,
                                     guidance_scale=self.guidance_scale, seed=self.seed,
                                     preview_every=self.preview_every if previews else 0, cache=cache, **extra)

    class EditBody(GenerationBody):
        """The multipart fields of an edit (text, which pydantic converts as it validates), less the image."""

        strength: float = Field(0.6, gt=0.0, le=1.0)

    app = FastAPI(title="ovsd3 serve", description="Stable Diffusion 3 on OpenVINO")

    def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, _first_problem(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown paths, wrong methods
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                     "invalid_request_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error(429, "the queue is full; try again shortly", "rate_limit_error",
                     headers={"Retry-After": str(limits.retry_after_seconds)})

    async def finished(job: Job) -> Job:
        await asyncio.to_thread(job.wait)
        return job

    def images_response(job: Job):
        if job.status == "error":
            return error(400, job.error)
        if job.status == "cancelled":
            return error(409, "the job was cancelled")
        return {"created": int(job.created), "data": _image_data(job)}

    @app.post("/v3/images/generations")
    async def generations(body: GenerationBody):
        return images_response(await finished(pool.submit(body.to_request(previews=False))))

    @app.post("/v3/images/edits")
    async def edits(request: Request):
        form = await request.form(max_part_size=limits.max_upload_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadRequest("image: an image file is required (multipart field 'image')")
        data = await upload.read()
        if len(data) > limits.max_upload_bytes:
            raise BadRequest(f"image: larger than {limits.max_upload_bytes} bytes", status=413)
        _check_image(data)
        try:
            body = EditBody.model_validate({key: value for key, value in form.items() if key != "image"})
        except ValidationError as invalid_form:
            raise BadRequest(_first_problem(invalid_form.errors())) from None
        request = body.to_request(previews=False, image=data, strength=body.strength)
        return images_response(await finished(pool.submit(request)))

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: GenerationBody):
        job = pool.submit(body.to_request())
        return {"id": job.id, "status": job.status}

    def find(job_id: str) -> Job:
        job = pool.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id}", status=404)
        return job

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        job = find(job_id)
        answer = {"id": job.id, "status": job.status, "events": len(job.events)}
        if job.status == "done":
            answer["data"] = _image_data(job)
        if job.error:
            answer["error"] = job.error
        return answer

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = find(job_id)
        job.cancel()
        return {"id": job.id, "status": job.status if job.finished else "cancelled"}  # a running one stops next step

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = find(job_id)

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

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "workers": len(pool.pipelines), "busy": pool.busy,
                "queued": pool.queued}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(_registry(pool)), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return (files("ovsd3.serve") / "page.html").read_text()

    return app


def _first_problem(errors: list[dict]) -> str:
    """pydantic's first complaint as one line naming the field ("n: Input should be less than or equal to 8")."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int))
    return f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")


def _image_data(job: Job) -> list[dict]:
    return [{"b64_json": image} for image in job.images]


def _check_image(data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise BadRequest("image: not a PNG/JPEG/WebP image Pillow can read") from None


def _registry(pool: WorkerPool):
    """A registry per scrape, read from the pool (no module-level metric objects)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    class PoolCollector:
        def collect(self):
            metrics = pool.metrics
            yield GaugeMetricFamily("ovsd3_queue_length", "jobs waiting for a worker", value=pool.queued)
            yield GaugeMetricFamily("ovsd3_workers_busy", "workers generating now", value=pool.busy)
            yield CounterMetricFamily("ovsd3_images", "images generated", value=metrics.images)
            yield CounterMetricFamily("ovsd3_requests", "jobs accepted", value=metrics.requests)
            yield CounterMetricFamily("ovsd3_rejected", "requests refused with 429", value=metrics.rejected)
            yield CounterMetricFamily("ovsd3_failed", "jobs that failed", value=metrics.failed)
            steps = list(metrics.step_seconds)
            yield SummaryMetricFamily("ovsd3_step_seconds", "sampling step latency (last 1000 steps)",
                                      count_value=len(steps), sum_value=sum(steps))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector())
    return registry
