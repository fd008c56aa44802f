"""Run one generation job on one pipeline: the code both serving backends share.

``ovsd3 serve FOLDER`` runs it in its worker threads, ``ovsd3 worker`` in its Celery tasks; each hands it a
:class:`JobEvents` that records events where its readers look for them (the job's memory, or the broker).
"""

from __future__ import annotations

import time
from typing import Protocol

from ovsd3.errors import InvalidRequest


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
    return run_jobs(pipe, [(request, events)], timeout)[0]


def batch_key(request) -> tuple | None:
    """Requests with one key can be drawn in one batched call (size, steps, guidance, cache, text length,
    noise stream); None: drawn alone (image-to-image, inpainting, skip-layer guidance and ControlNet)."""
    if request.image is not None or request.mask is not None or request.skip_guidance_layers or \
            request.control_image:
        return None
    return (request.width, request.height, request.num_inference_steps, request.guidance_scale, request.cache,
            request.max_sequence_length, request.noise)


def run_jobs(pipe, jobs: list[tuple], timeout: float | None = None) -> list[str]:
    """Draw several (request, events) at once, in one batched call per step (see ``batch_key``); each job gets
    its own events, its own outcome and its own pictures, as if drawn alone."""
    deadline = None if timeout is None else time.monotonic() + timeout
    outcomes: list[str | None] = [None] * len(jobs)
    prepared = {}
    for index, (request, events) in enumerate(jobs):
        outcome = _guarded(events, timeout, lambda: prepared.__setitem__(index, _prepare(pipe, request)))
        if outcome is not None:
            outcomes[index] = outcome
    drawn = [index for index in range(len(jobs)) if index in prepared]
    if drawn:
        batch = _Batch(pipe, [jobs[index] for index in drawn], [prepared[index] for index in drawn], deadline)
        everyone = batch.events[0] if len(drawn) == 1 else _Everyone(batch)
        ended = _guarded(everyone, timeout, batch.run)  # what ended the whole batch, if anything did
        for index, outcome in zip(drawn, batch.outcomes):
            outcomes[index] = outcome or ended
    return outcomes


def _guarded(events, timeout: float | None, work) -> str | None:
    """``work()``; what ended it early as the job's last event (its name), or None if it ran through."""
    try:
        work()
        return None
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


class _Batch:
    """Prepared jobs sampled together; a job cancelled on the way ends at once (its rows are drawn on)."""

    def __init__(self, pipe, jobs: list[tuple], prepared: list, deadline: float | None):
        self.pipe, self.prepared, self.deadline = pipe, prepared, deadline
        self.requests = [request for request, _ in jobs]
        self.events = [events for _, events in jobs]
        self.outcomes: list[str | None] = [None] * len(jobs)

    @property
    def open(self) -> list[int]:
        return [index for index, outcome in enumerate(self.outcomes) if outcome is None]

    def run(self) -> None:
        from ovsd3.runtime.pipeline import Job

        for job, events in zip(self.prepared, self.events):
            events.emit("started", seed=job.params["seed"], steps=len(job.sigmas) - 1)
        merged = Job.together(self.prepared)
        self._sample(merged)
        if not self.open:
            return
        images = self.pipe.pictures(merged)  # inpainting's crop pasted back
        for index in self.open:
            start = sum(job.rows for job in self.prepared[:index])
            mine = images[start:start + self.prepared[index].rows]
            job, events, request = self.prepared[index], self.events[index], self.requests[index]
            events.images_made(len(mine))
            events.emit("done", seed=job.params["seed"], images=[request.encode(image) for image in mine],
                        cache={"mode": job.params["cache"], **merged.cache_stats.as_dict()})
            self.outcomes[index] = "done"

    def _sample(self, merged) -> None:
        from ovsd3.runtime.pipeline import Job
        from ovsd3.serve.jobs import image_base64
        from ovsd3.runtime.preview import preview_images

        sampling = self.pipe.steps(merged)
        while self.open:
            started = time.perf_counter()  # the step alone, not the previews and events around it
            step = next(sampling, None)
            if step is None:
                return
            seconds = time.perf_counter() - started
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise TimedOut
            denoised = Job.split(step.denoised, self.prepared)
            for index in self.open:
                events = self.events[index]
                events.step_timed(seconds)
                if events.cancel_requested:  # this job ends here; the batch draws on for the others
                    events.emit("cancelled")
                    self.outcomes[index] = "cancelled"
                    continue
                data = {"step": step.index + 1, "total": step.total}
                every = self.requests[index].preview_every
                if every and ((step.index + 1) % every == 0 or step.index + 1 == step.total):
                    data["previews"] = [image_base64(image) for image in preview_images(denoised[index])]
                events.emit("step", **data)


class _Everyone:
    """The events of every open job of a batch at once: what ends the whole batch ends each of them."""

    def __init__(self, batch: _Batch):
        self.batch = batch
        self.passes_through = tuple({kind for events in batch.events for kind in events.passes_through})

    def emit(self, event: str, **data) -> None:
        for index in self.batch.open:
            self.batch.events[index].emit(event, **data)

    def failed(self) -> None:
        for index in self.batch.open:
            self.batch.events[index].failed()
