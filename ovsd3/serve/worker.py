"""``ovsd3 worker MODEL_DIR --broker URL``: a Celery worker that draws the jobs of one model.

It holds one compiled pipeline and ``--concurrency`` clones of it (sharing its weights); its Celery threads
(concurrency x ``--max-batch``) each claim a job and hand it to the :class:`Batcher`, which draws waiting jobs on
free pipelines with the runner ``ovsd3 serve`` uses (:func:`ovsd3.serve.runner.run_jobs`), writing each job's
events to the broker. A heartbeat thread announces the worker and keeps its running jobs' messages from being
handed on (see :mod:`ovsd3.serve.broker`).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

from ovsd3.errors import OvsdError
from ovsd3.serve import broker
from ovsd3.serve.jobs import GenerationRequest
from ovsd3.serve.runner import batch_key, run_jobs


@dataclass
class Identity:
    """What the worker says of itself at each heartbeat (``ovsd3 cluster status``, the API's routing)."""

    name: str
    model: str
    device: str
    concurrency: int
    max_batch: int
    max_size: int
    size_multiple: int
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # this process, whatever its name

    def record(self, busy: int, steps_per_second: float) -> dict:
        return {"name": self.name, "model": self.model, "device": self.device, "concurrency": self.concurrency,
                "max_batch": self.max_batch,
                "max_size": self.max_size, "size_multiple": self.size_multiple, "busy": busy,
                "steps_per_second": round(steps_per_second, 4), "host": socket.gethostname(),
                "pid": os.getpid(), "heartbeat": time.time()}


def default_name() -> str:
    return f"ovsd3-{os.getpid()}@{socket.gethostname()}"


@dataclass
class Worker:
    """The state one ``ovsd3 worker`` process shares between its Celery threads and its heartbeat."""

    settings: broker.BrokerSettings
    identity: Identity
    client: object  # redis.Redis
    batcher: Batcher
    running: dict = field(default_factory=dict)  # job id -> its message's delivery tag
    step_times: deque = field(default_factory=lambda: deque(maxlen=200))  # (when, seconds) of recent steps
    lock: threading.Lock = field(default_factory=threading.Lock)

    def steps_per_second(self) -> float:
        with self.lock:
            recent = [seconds for when, seconds in self.step_times if when > time.time() - 60]
        return len(recent) / 60.0

    def heartbeat(self) -> None:
        """Say we are alive and what we serve; keep our running jobs' messages young (kombu hands on a message
        older than the visibility timeout: only a dead worker's must be)."""
        now = time.time()
        with self.lock:
            tags = [tag for tag in self.running.values() if tag]
            busy = len(self.running)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(broker.WORKERS, {self.identity.name: now})
        pipe.zadd(broker.INSTANCES, {self.identity.instance: now})
        pipe.hset(broker.worker_key(self.identity.name),
                  mapping={key: str(value) for key, value in self.identity.record(busy, self.steps_per_second()).items()})
        pipe.expire(broker.worker_key(self.identity.name), int(self.settings.requeue_after * 10))
        for tag in tags:
            pipe.zadd(broker.UNACKED_INDEX, {tag: now}, xx=True)
        pipe.execute()

    def beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat):
            self.heartbeat_quietly()  # the broker away: the next beat tries again (Celery reconnects on its own)

    def leave(self) -> None:
        import redis

        try:
            self.client.zrem(broker.WORKERS, self.identity.name)
            self.client.zrem(broker.INSTANCES, self.identity.instance)
            self.client.delete(broker.worker_key(self.identity.name))
        except redis.RedisError:
            pass

    @contextmanager
    def holding(self, job_id: str, tag: str | None):
        """The job counted as this worker's (busy; its message kept young) while it waits and draws."""
        with self.lock:
            self.running[job_id] = tag
        try:
            self.heartbeat_quietly()
            yield
        finally:
            with self.lock:
                self.running.pop(job_id, None)
            self.heartbeat_quietly()  # busy as it is now, for status and routing

    def heartbeat_quietly(self) -> None:
        import redis

        try:
            self.heartbeat()
        except redis.RedisError:
            pass


@dataclass
class RemoteEvents:
    """A running job's events, written to the broker (see runner.JobEvents). An event the broker refuses (the
    job was handed to another worker, or is over) stops this run at its next step."""

    worker: Worker
    job_id: str
    model: str
    attempt: int
    emit_script: object
    superseded: bool = False

    @property
    def passes_through(self):
        import redis

        return (redis.ConnectionError, redis.TimeoutError)

    def emit(self, event: str, **data) -> None:
        final = event in broker.FINAL
        counter = "cancelled" if event == "cancelled" else ""
        args = [self.job_id, self.attempt, event, json.dumps(data), int(final), time.time(),
                self.worker.settings.keep_finished, counter]
        call = lambda: self.emit_script(keys=broker.job_keys(self.job_id, self.model), args=args)  # noqa: E731
        accepted = patiently(call, self.worker.settings.requeue_after) if final else best_effort(call)
        if accepted == 0:
            self.superseded = True

    @property
    def cancel_requested(self) -> bool:
        import redis

        if self.superseded:
            return True
        try:
            cancel, attempt = self.worker.client.hmget(broker.job_key(self.job_id), "cancel", "attempt")
        except redis.RedisError:
            return False  # the broker is away: go on drawing; the result waits for it (emit is patient)
        return cancel == b"1" or attempt is None or int(attempt) != self.attempt

    def step_timed(self, seconds: float) -> None:
        with self.worker.lock:
            self.worker.step_times.append((time.time(), seconds))
        best_effort(lambda: self.worker.client.hincrby(broker.STATS, "steps", 1))

    def images_made(self, count: int) -> None:
        best_effort(lambda: self.worker.client.hincrby(broker.STATS, "images", count))

    def failed(self) -> None:
        best_effort(lambda: self.worker.client.hincrby(broker.STATS, "failed", 1))


def best_effort(call):
    """``call()``, or None while the broker is away (a step's event or a counter may be lost, not a result)."""
    import redis

    try:
        return call()
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def patiently(call, patience: float):
    """``call()``, tried again for ``patience`` seconds while the broker is away; then its error (the job's
    message is not acknowledged, so the job is run again once the broker is back)."""
    import redis

    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def run_task(worker: Worker, scripts: dict, job_id: str, delivery_tag: str | None) -> str:
    """The body of one Celery task: claim the job, run it, say how it ended."""
    client = worker.client
    model = worker.identity.model
    attempt, previous = scripts["CLAIM"](keys=[*broker.job_keys(job_id, model), broker.WORKERS, broker.INSTANCES],
                                         args=[job_id, worker.identity.name, time.time(),
                                               worker.settings.keep_finished, worker.identity.instance,
                                               worker.settings.dead_after])
    if not attempt:
        return "skipped"  # over, cancelled, expired, or taken by another attempt
    record = json.loads(client.hget(broker.job_key(job_id), "request"))
    request = GenerationRequest.from_record(record["request"])
    events = RemoteEvents(worker, job_id, model, int(attempt), scripts["EMIT"])
    with worker.holding(job_id, delivery_tag):
        return worker.batcher.draw(request, events, record.get("timeout"))


def register_task(app, worker: Worker) -> None:
    scripts = {name: worker.client.register_script(getattr(broker, name)) for name in ("CLAIM", "EMIT")}

    @app.task(name=broker.TASK, bind=True)
    def generate(task, job_id: str) -> str:
        properties = getattr(task.request, "properties", None) or {}
        return run_task(worker, scripts, job_id, properties.get("delivery_tag"))


def check_name_free(client, name: str, within: float) -> None:
    last = client.zscore(broker.WORKERS, name)
    if last is not None and last > time.time() - within:  # alive (a just-killed one is silent past ``within``)
        raise OvsdError(f"--name {name}: a worker of that name is alive (heartbeat {time.time() - last:.0f} s "
                        f"ago); give another name")


@dataclass
class Waiting:
    """A job a Celery thread holds until a pipeline draws it (alone or in a batch)."""

    request: GenerationRequest
    events: RemoteEvents
    timeout: float | None
    key: tuple | None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str | None = None
    error: BaseException | None = None


@dataclass
class Batcher:
    """Hands free pipelines to waiting jobs: whoever gets a pipeline draws the oldest waiting job and up to
    ``max_batch - 1`` others that share its batch key (runner.batch_key) in one call. Batches form from the
    backlog only: an idle worker starts a lone job at once."""

    pipelines: queue.Queue
    max_batch: int = 1
    waiting: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def draw(self, request: GenerationRequest, events: RemoteEvents, timeout: float | None) -> str:
        entry = Waiting(request, events, timeout, batch_key(request) if self.max_batch > 1 else None)
        with self.lock:
            self.waiting.append(entry)
        while not entry.done.is_set():
            try:
                pipe = self.pipelines.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._run(pipe, self._take())
            finally:
                self.pipelines.put(pipe)
        if entry.error is not None:
            raise entry.error
        return entry.outcome

    def _take(self) -> list[Waiting]:
        with self.lock:
            if not self.waiting:
                return []
            first = self.waiting[0]
            batch = [first] + ([other for other in self.waiting[1:] if other.key == first.key]
                               [:self.max_batch - 1] if first.key is not None else [])
            for entry in batch:
                self.waiting.remove(entry)
        return batch

    def _run(self, pipe, batch: list[Waiting]) -> None:
        if not batch:
            return
        try:
            timeouts = [entry.timeout for entry in batch if entry.timeout is not None]
            outcomes = run_jobs(pipe, [(entry.request, entry.events) for entry in batch],
                                min(timeouts) if timeouts else None)
            for entry, outcome in zip(batch, outcomes):
                entry.outcome = outcome
        except BaseException as error:  # the broker gone: each job's task fails unacknowledged (redelivered)
            for entry in batch:
                entry.error = error
        finally:
            for entry in batch:
                entry.done.set()
