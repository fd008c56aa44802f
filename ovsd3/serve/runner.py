"""Run one generation job on one pipeline: the code both serving backends share.

``ovsd3 serve FOLDER`` runs it in its worker threads, ``ovsd3 worker`` in its Celery tasks; each hands it a
:class:`JobEvents` that records events where its readers look for them (the job's memory, or the broker).
"""

from __future__ import annotations

import time
from typing import Protocol

from ovsd3.errors import InvalidRequest


class Cancelled(Exception):
    """The job's cancel was asked for; raised between two steps."""


class TimedOut(Exception):
    """The job ran past its time limit (``--job-timeout``)."""


class JobEvents(Protocol):
    """Where a running job's events go, and what its runner asks between steps."""

    def emit(self, event: str, **data) -> None: ...

    @property
    def cancel_requested(self) -> bool: ...

    def step_timed(self, seconds: float) -> None:
        """One sampling step took ``seconds`` (for /metrics)."""

    def images_made(self, count: int) -> None: ...

    def failed(self) -> None:
        """The job failed inside ovsd3 (for /metrics)."""

    #: errors that do not end the job but its run (the broker gone: the job is redelivered, see broker.py)
    passes_through: tuple[type[Exception], ...]


def run_job(pipe, request, events: JobEvents, timeout: float | None = None) -> str:
    """Draw ``request`` (a GenerationRequest) on ``pipe``, emitting started, step (with previews), then one of
    done, error or cancelled; returns that last event's name. Errors inside ovsd3 end the job, not the caller.
    ``timeout``: seconds the job may run, checked between steps."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        prepared = _prepare(pipe, request)
        events.emit("started", seed=prepared.params["seed"], steps=len(prepared.sigmas) - 1)
        _sample(pipe, prepared, request, events, deadline)
        images = pipe.decode(prepared.latents)
        events.images_made(len(images))
        events.emit("done", seed=prepared.params["seed"], images=[request.encode(image) for image in images],
                    cache={"mode": prepared.params["cache"], **prepared.cache_stats.as_dict()})
        return "done"
    except Cancelled:
        events.emit("cancelled")
        return "cancelled"
    except TimedOut:
        events.failed()
        events.emit("error", message=f"the job ran past its time limit of {timeout:g} s (--job-timeout) and "
                                     f"was stopped", type="server_error")
        return "error"
    except InvalidRequest as error:
        events.emit("error", message=str(error), type="invalid_request_error")
        return "error"
    except Exception as error:  # inside ovsd3, not the caller's doing; it must not take its worker down
        if isinstance(error, events.passes_through):
            raise
        events.failed()
        events.emit("error", message=f"internal error: {type(error).__name__}: {error}", type="server_error")
        return "error"


def _prepare(pipe, request):
    settings = request.pipeline_settings()
    if settings["num_inference_steps"] is None:  # OVMS's (openvino.genai's) default, edits included
        settings["num_inference_steps"] = pipe.defaults.num_inference_steps
    return pipe.prepare(request.prompt, **settings)


def _sample(pipe, prepared, request, events: JobEvents, deadline: float | None) -> None:
    from ovsd3.serve.jobs import image_base64
    from ovsd3.runtime.preview import preview_images

    sampling = pipe.steps(prepared)
    while True:
        started = time.perf_counter()  # the step alone, not the previews and events around it
        step = next(sampling, None)
        if step is None:
            return
        events.step_timed(time.perf_counter() - started)
        if events.cancel_requested:
            raise Cancelled
        if deadline is not None and time.monotonic() > deadline:
            raise TimedOut
        data = {"step": step.index + 1, "total": step.total}
        every = request.preview_every
        if every and ((step.index + 1) % every == 0 or step.index + 1 == step.total):
            data["previews"] = [image_base64(image) for image in preview_images(step.denoised)]
        events.emit("step", **data)
