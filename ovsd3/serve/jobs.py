"""Generation jobs and the workers that run them.

Each worker is a thread with its own pipeline, a clone of the first one: all share one compiled model per
component (one copy of the weights) and each runs them on infer requests of its own (OpenVINO releases the
GIL while it infers, so workers overlap); jobs wait in one bounded queue. A job records its events (queued, step with preview,
done, error, cancelled) in order, so any number of readers can follow it from any point.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ovsd3.errors import OvsdError
from ovsd3.serve.runner import run_job


class QueueFull(Exception):
    """The bounded queue has no room: the caller answers 429."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work: the caller answers 503."""


# Bounds of a pool, checked before anything starts: every worker holds its own infer requests (their
# activations: gigabytes at 1024x1024), and every queued job holds its request, uploads included (up to 33 MB).
MAX_WORKERS = 64
MAX_QUEUE = 1024
KEEP_FINISHED = 256  # finished jobs kept for GET /v1/jobs/{id}
KEEP_FINISHED_BYTES = 256 * 2**20  # ... and at most this much of their images and previews


@dataclass
class GenerationRequest:
    """What one call asks for, already validated (see bodies.py), in SD3Pipeline's keywords."""

    prompt: str
    prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt: str | None = None
    negative_prompt_2: str | None = None
    negative_prompt_3: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    max_sequence_length: int = 256
    noise: str = "torch"
    image: bytes | None = None  # image-to-image: the start picture (PNG/JPEG bytes)
    mask: bytes | None = None  # inpainting: white (or, with transparency, alpha 0) is redrawn
    padding_mask_crop: int | None = None  # inpainting: redraw a box around the mask, pasted back (diffusers')
    strength: float = 0.6
    preview_every: int = 1  # 0: no previews
    cache: str | None = None  # step caching spec (ovsd3.runtime.cache); None: the server's default
    output_format: str = "png"  # png, jpeg or webp
    output_compression: int | None = None  # 0-100 for jpeg and webp (OpenAI's meaning: 100 = least compressed)
    skip_guidance_layers: list[int] | None = None  # skip-layer guidance, diffusers' keywords
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    control_image: list[bytes] | None = None  # ControlNet: one picture (PNG/JPEG bytes) per ControlNet
    control_mask: bytes | None = None  # an inpainting ControlNet's mask (white is redrawn; diffusers' meaning)
    controlnet_conditioning_scale: float | list[float] = 1.0
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0

    def pipeline_settings(self) -> dict:
        settings = dict(prompt_2=self.prompt_2, prompt_3=self.prompt_3, negative_prompt=self.negative_prompt,
                        negative_prompt_2=self.negative_prompt_2, negative_prompt_3=self.negative_prompt_3,
                        num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                        width=self.width, height=self.height, seed=self.seed, noise=self.noise,
                        max_sequence_length=self.max_sequence_length, num_images_per_prompt=self.n, cache=self.cache,
                        skip_guidance_layers=self.skip_guidance_layers,
                        skip_layer_guidance_scale=self.skip_layer_guidance_scale,
                        skip_layer_guidance_start=self.skip_layer_guidance_start,
                        skip_layer_guidance_stop=self.skip_layer_guidance_stop)
        if self.image is not None:
            from PIL import Image

            settings.update(image=Image.open(io.BytesIO(self.image)).convert("RGB"), strength=self.strength)
        if self.mask is not None:
            from PIL import Image

            from ovsd3.runtime.inpaint import openai_mask

            settings.update(mask_image=openai_mask(Image.open(io.BytesIO(self.mask))),
                            padding_mask_crop=self.padding_mask_crop)
        if self.control_image:
            settings.update(self._control_settings())
        return settings

    def _control_settings(self) -> dict:
        from PIL import Image

        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in self.control_image]
        mask = None if self.control_mask is None else Image.open(io.BytesIO(self.control_mask))
        return dict(control_image=images[0] if len(images) == 1 else images, control_mask=mask,
                    controlnet_conditioning_scale=self.controlnet_conditioning_scale,
                    control_guidance_start=self.control_guidance_start,
                    control_guidance_end=self.control_guidance_end)

    def encode(self, image) -> str:
        """One image as base64, in the asked format."""
        return image_base64(image, self.output_format, self.output_compression)

    def to_record(self) -> dict:
        """As JSON takes it (uploads in base64), for the broker."""
        record = dataclasses.asdict(self)
        for name in ("image", "mask", "control_mask"):
            if record[name] is not None:
                record[name] = base64.b64encode(record[name]).decode("ascii")
        if record["control_image"] is not None:
            record["control_image"] = [base64.b64encode(data).decode("ascii") for data in record["control_image"]]
        return record

    @classmethod
    def from_record(cls, record: dict) -> GenerationRequest:
        record = dict(record)
        for name in ("image", "mask", "control_mask"):
            if record.get(name) is not None:
                record[name] = base64.b64decode(record[name])
        if record.get("control_image") is not None:
            record["control_image"] = [base64.b64decode(text) for text in record["control_image"]]
        return cls(**record)


def image_base64(image, output_format: str = "png", compression: int | None = None) -> str:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=output_format.upper(), quality=100 if compression is None else compression)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Job:
    request: GenerationRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued, running, then one of FINAL
    events: list[dict] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    FINAL = ("done", "error", "cancelled")  # each is also the name of the job's last event

    @property
    def finished(self) -> bool:
        return self.status in self.FINAL

    @property
    def error(self) -> str | None:
        return self.events[-1]["message"] if self.status == "error" else None

    @property
    def caller_error(self) -> bool:
        """Whether the job failed on the request's values (4xx) rather than inside ovsd3 (500)."""
        return self.status == "error" and self.events[-1].get("type") == "invalid_request_error"

    @property
    def images(self) -> list[str]:
        """The finished job's images, base64 PNG."""
        return self.events[-1]["images"] if self.status == "done" else []

    def emit(self, event: str, **data) -> None:
        """Append an event; a final one (see FINAL) also sets the status."""
        with self._changed:
            if event in self.FINAL:
                self.status = event
            self.events.append({"event": event, "index": len(self.events), **data})
            self._changed.notify_all()

    def events_from(self, index: int, timeout: float) -> list[dict]:
        """Events from ``index`` on, waiting up to ``timeout`` seconds for one if there is none yet."""
        with self._changed:
            if len(self.events) <= index and not self.finished:
                self._changed.wait(timeout)
            return self.events[index:]

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.finished, timeout)

    def cancel(self) -> None:
        self._cancel.set()
        with self._changed:
            if self.status == "queued":  # not picked up yet: the worker will skip it
                self.emit("cancelled")  # the condition's lock is re-entrant

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def held_bytes(self) -> int:
        """What the job's events hold in images and previews (base64 text), about its memory."""
        with self._changed:
            return sum(len(text) for event in self.events for key in ("images", "previews")
                       for text in event.get(key, ()))


@dataclass
class Metrics:
    """What /metrics reports (Prometheus), filled by the workers."""

    images: int = 0
    requests: int = 0
    failed: int = 0
    rejected: int = 0
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=1000))  # recent sampling steps


class WorkerPool:
    """``workers`` threads, each with its own pipeline: ``load()``'s and its clones; a queue of at most
    ``max_queue``."""

    def __init__(self, load: Callable[[], object], workers: int, max_queue: int, job_timeout: float | None = None):
        for name, value, most in (("--workers", workers, MAX_WORKERS), ("--max-queue", max_queue, MAX_QUEUE)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise OvsdError(f"{name} must be a whole number from 1 to {most} (got {value!r})")
        self.job_timeout = job_timeout  # seconds a job may run (--job-timeout); None: no limit
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[str, Job] = {}
        self.metrics = Metrics()
        self.busy = 0
        self.closing = False  # set on shutdown: new requests get 503
        self._lock = threading.Lock()
        self.pipelines = worker_pipelines(load, workers)  # compiled before the server answers
        self._threads = [threading.Thread(target=self._work, args=(pipe,), daemon=True, name=f"ovsd3-worker-{i}")
                         for i, pipe in enumerate(self.pipelines)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        return self.pending.qsize()

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def limits_for(self, model: str | None) -> tuple[int | None, int]:
        """(largest side, what sides must be multiples of) of the model a request names; one model here, so
        its name is not checked (as before: any name, OVMS's client default included)."""
        pipe = self.pipelines[0]
        return getattr(pipe, "max_size", None), getattr(pipe, "size_multiple", 16)

    def health(self) -> dict:
        return {"status": "ok", "workers": len(self.pipelines), "busy": self.busy, "queued": self.queued}

    def metric_families(self):
        """What /metrics reports (prometheus_client's metric families)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        metrics = self.metrics
        yield GaugeMetricFamily("ovsd3_queue_length", "jobs waiting for a worker", value=self.queued)
        yield GaugeMetricFamily("ovsd3_workers_busy", "workers generating now", value=self.busy)
        yield CounterMetricFamily("ovsd3_images", "images generated", value=metrics.images)
        yield CounterMetricFamily("ovsd3_requests", "jobs accepted", value=metrics.requests)
        yield CounterMetricFamily("ovsd3_rejected", "requests refused with 429", value=metrics.rejected)
        yield CounterMetricFamily("ovsd3_failed", "jobs that failed", value=metrics.failed)
        steps = list(metrics.step_seconds)
        yield SummaryMetricFamily("ovsd3_step_seconds", "sampling step latency (last 1000 steps)",
                                  count_value=len(steps), sum_value=sum(steps))

    def submit(self, request: GenerationRequest, model: str | None = None) -> Job:
        if self.closing:
            raise ShuttingDown
        job = Job(request)
        job.emit("queued", position=self.queued + 1)  # before a worker can see it, so events stay in order
        with self._lock:
            try:
                self.pending.put_nowait(job)
            except queue.Full:
                self.metrics.rejected += 1
                raise QueueFull from None
            self.jobs[job.id] = job
            self.metrics.requests += 1
            self._forget_old_jobs()
        return job

    def _forget_old_jobs(self) -> None:
        """Keep the newest finished jobs (for GET /v1/jobs/{id}), at most KEEP_FINISHED of them and
        KEEP_FINISHED_BYTES of images and previews: a few large images must not fill memory."""
        finished = [job for job in self.jobs.values() if job.finished]  # oldest first (insertion order)
        held = sum(job.held_bytes for job in finished)
        for index, job in enumerate(finished):
            if len(finished) - index <= KEEP_FINISHED and held <= KEEP_FINISHED_BYTES:
                break
            held -= job.held_bytes
            del self.jobs[job.id]

    def cancel_all(self) -> tuple[int, int]:
        """Stop taking work and cancel every job: queued ones at once, running ones at their next step.
        Returns (queued, running) counts. Safe from any thread."""
        self.closing = True
        counts = [0, 0]
        for job in list(self.jobs.values()):
            if not job.finished:
                counts[job.status != "queued"] += 1
                job.cancel()
        return counts[0], counts[1]

    def close(self, timeout: float = 30.0) -> bool:
        """Cancel what is left, end the workers; False if one is still inside a model call after ``timeout``."""
        self.cancel_all()
        for _ in self._threads:
            self.pending.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self, pipe) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            if job.finished:  # cancelled while queued
                continue
            with self._lock:
                self.busy += 1
            try:
                self._run(pipe, job)
            finally:
                with self._lock:
                    self.busy -= 1

    def _run(self, pipe, job: Job) -> None:
        job.status = "running"
        run_job(pipe, job.request, PoolEvents(self, job), self.job_timeout)


@dataclass
class PoolEvents:
    """A running job's events, kept in the job (see runner.JobEvents)."""

    pool: WorkerPool
    job: Job
    passes_through = ()

    def emit(self, event: str, **data) -> None:
        self.job.emit(event, **data)

    @property
    def cancel_requested(self) -> bool:
        return self.job.cancel_requested

    def step_timed(self, seconds: float) -> None:
        with self.pool._lock:
            self.pool.metrics.step_seconds.append(seconds)

    def images_made(self, count: int) -> None:
        with self.pool._lock:
            self.pool.metrics.images += count

    def failed(self) -> None:
        with self.pool._lock:
            self.pool.metrics.failed += 1


def worker_pipelines(load: Callable[[], object], workers: int) -> list:
    """One pipeline per worker: ``load()``'s and ``workers - 1`` clones of it, which share its compiled models.
    A pipeline with model offload compiles each component per call and keeps none, so there is nothing to
    share: each worker then loads its own."""
    first = load()
    if workers > 1 and getattr(first, "offload", False):
        return [first, *(load() for _ in range(workers - 1))]
    return [first, *(first.clone() for _ in range(workers - 1))]


def load_pipeline(folder: Path, device: str, adapters=(), workers: int = 1,
                  lora_mode: str | None = None) -> Callable[[], object]:
    """What loads the workers' pipeline, compiled for ``workers`` calls at once (SD3Pipeline.load's
    concurrency); with model offload each call compiles its own, as if alone. ``lora_mode``: SD3Pipeline.load's."""
    def load():
        from ovsd3.runtime import SD3Pipeline
        from ovsd3.runtime.pipeline import offload_advised

        offload = offload_advised(folder)
        return SD3Pipeline.load(folder, device=device, adapters=list(adapters), offload=offload,
                                concurrency=1 if offload else workers, lora_mode=lora_mode)

    return load
