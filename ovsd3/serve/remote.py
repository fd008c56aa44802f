"""The API server's side of the broker (``ovsd3 serve --broker URL``): jobs queued in Redis for Celery,
followed through their event streams. Nothing lives here that a restart would lose."""

from __future__ import annotations

import json
import re
import threading
import time

from ovsd3.serve import broker
from ovsd3.serve.bodies import BadRequest, Unavailable
from ovsd3.serve.jobs import QueueFull, ShuttingDown

BROKER_DOWN = "the broker cannot be reached; try again shortly"
SUBMIT_PATIENCE = 5.0  # seconds a submission waits for the broker to come back before its 503
JOB_ID = re.compile("[0-9a-f]{32}")


class BrokerQueue:
    """A backend of :func:`ovsd3.serve.api.create_app` with no model of its own: it checks, queues and follows."""

    def __init__(self, settings: broker.BrokerSettings, max_queue: int, job_timeout: float | None = None):
        self.settings = settings
        self.max_queue = max_queue
        self.job_timeout = job_timeout
        self.client = broker.connect(settings)  # unreachable at start: a one-line error, exit 2
        self.celery = broker.celery_app(settings)
        self.scripts = {name: self.client.register_script(getattr(broker, name))
                        for name in ("SUBMIT", "CANCEL")}
        self.closing = False
        self._stop = threading.Event()
        threading.Thread(target=self.tend, args=(self._stop,), daemon=True, name="ovsd3-resend").start()

    def _workers(self) -> list[dict]:
        return broker.alive_workers(self.client, self.settings.requeue_after)

    def _served(self, model: str | None) -> tuple[str, dict]:
        """The model a request goes to and one of its workers' records; 404 if no worker serves it."""
        workers = self._workers()
        models = sorted({worker["model"] for worker in workers})
        if model is None:
            if len(models) == 1:
                model = models[0]
            elif not models:
                raise Unavailable("no worker is serving any model; start one with `ovsd3 worker`")
            else:
                raise BadRequest(f"model: required, this service serves {len(models)} ({', '.join(models)})")
        for worker in workers:
            if worker["model"] == model:
                return model, worker
        served = f" (it serves: {', '.join(models)})" if models else ""
        raise BadRequest(f"model {model[:64]!r}: no worker serves it{served}", status=404)

    def limits_for(self, model: str | None) -> tuple[int | None, int]:
        with reachable():
            _, worker = self._served(model)
        return int(worker["max_size"]) or None, int(worker["size_multiple"])

    def submit(self, request, model: str | None = None) -> RemoteJob:
        """The job recorded, then its task sent; while the broker is away, tried again for a few seconds (one
        job id throughout: a retry never makes a second job), then 503."""
        if self.closing:
            raise ShuttingDown
        job_id, created = broker.new_job_id(), time.time()
        deadline = time.monotonic() + SUBMIT_PATIENCE
        while True:
            try:
                with reachable():
                    model = self._queue(job_id, model, request, created)
                return RemoteJob(self, job_id, model, created, "queued")
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _queue(self, job_id: str, model: str | None, request, created: float) -> str:
        model, _ = self._served(model)
        record = {"request": request.to_record(), "timeout": self.job_timeout}
        position = self.scripts["SUBMIT"](keys=broker.job_keys(job_id, model),
                                          args=[job_id, model, json.dumps(record), created, self.max_queue])
        if position == 0:
            raise QueueFull
        self._send(job_id, model)
        return model

    def _send(self, job_id: str, model: str) -> None:
        """The job's Celery task; a job recorded whose task was not sent is sent by :meth:`resend_unsent`."""
        self.celery.send_task(broker.TASK, args=[job_id], task_id=job_id, queue=broker.queue_name(model))
        self.client.hset(broker.job_key(job_id), "sent", 1)

    def resend_unsent(self, older_than: float = 10.0) -> int:
        """Send the task of every queued job recorded more than ``older_than`` seconds ago without one (its
        API server stopped, or lost the broker, between the two); a second message for a job that had one
        is dropped by the worker (broker.CLAIM). Returns how many were sent."""
        sent = 0
        for key in self.client.scan_iter("ovsd3:queued:*"):
            model = key.decode().split(":", 2)[2]
            for raw in self.client.zrangebyscore(key, "-inf", time.time() - older_than):
                job_id = raw.decode()
                if self.client.hget(broker.job_key(job_id), "sent") == b"0":
                    self._send(job_id, model)
                    sent += 1
        return sent

    def tend(self, stop: threading.Event, every: float = 10.0) -> None:
        """Until ``stop``: resend_unsent every ``every`` seconds (in a thread of the API server)."""
        import kombu.exceptions
        import redis

        while not stop.wait(every):
            try:
                self.resend_unsent()
            except (redis.RedisError, kombu.exceptions.OperationalError):
                pass  # the broker is away: next time

    def job(self, job_id: str) -> RemoteJob | None:
        if not JOB_ID.fullmatch(job_id):  # ids are uuid4 hex; anything else would name another key
            return None
        with reachable():
            record = self.client.hmget(broker.job_key(job_id), "model", "created", "status")
        if record[0] is None:
            return None
        job = RemoteJob(self, job_id, record[0].decode(), float(record[1]), record[2].decode())
        job.events_from(0, 0)  # what happened so far (GET /v1/jobs/{id} counts and shows it)
        return job

    def cancel(self, job: RemoteJob) -> None:
        with reachable():
            outcome = self.scripts["CANCEL"](keys=broker.job_keys(job.id, job.model),
                                             args=[job.id, time.time(), self.settings.keep_finished])
            if outcome == 1:  # running: its worker sees the flag at its next step; revoked, a redelivery is dropped
                self.celery.control.revoke(job.id)

    def health(self) -> dict:
        try:
            with reachable():
                workers = self._workers()
                queued = {model: self.client.zcard(broker.queued_key(model))
                          for model in sorted({worker["model"] for worker in workers})}
        except Unavailable:
            return {"status": "unavailable", "broker": self.settings.shown_url, "error": BROKER_DOWN}
        return {"status": "ok", "broker": self.settings.shown_url, "workers": len(workers),
                "busy": sum(int(worker["busy"]) for worker in workers), "queued": sum(queued.values()),
                "models": {model: {"workers": sum(worker["model"] == model for worker in workers),
                                   "queued": count} for model, count in queued.items()}}

    def metric_families(self):
        from ovsd3.serve.cluster import cluster_metric_families

        with reachable():
            yield from cluster_metric_families(self.client, self.settings)

    def cancel_all(self) -> None:
        """On shutdown: take no new work. The jobs live on in the broker, so none is cancelled."""
        self.closing = True

    def close(self, timeout: float = 0.0) -> bool:
        self.closing = True
        self._stop.set()
        self.client.close()
        return True


class RemoteJob:
    """A job in the broker, as the HTTP layer reads it (the embedded server's Job offers the same)."""

    def __init__(self, queue: BrokerQueue, job_id: str, model: str, created: float, status: str):
        self.queue, self.id, self.model, self.created, self.status = queue, job_id, model, created, status
        self.events: list[dict] = []
        self._last = b"0-0"  # the stream id of the last event read

    @property
    def finished(self) -> bool:
        return self.status in broker.FINAL

    @property
    def error(self) -> str | None:
        return self._final().get("message") if self.status == "error" else None

    @property
    def caller_error(self) -> bool:
        return self.status == "error" and self._final().get("type") == "invalid_request_error"

    @property
    def images(self) -> list[str]:
        return self._final().get("images", []) if self.status == "done" else []

    def _final(self) -> dict:
        if self.finished and not (self.events and self.events[-1]["event"] in broker.FINAL):
            self.events_from(len(self.events), 0)
        return self.events[-1] if self.events and self.events[-1]["event"] in broker.FINAL else {}

    def events_from(self, index: int, timeout: float) -> list[dict]:
        """Events from ``index`` on, waiting up to ``timeout`` seconds for one if there is none yet; while the
        broker is away, none (the caller asks again)."""
        import redis

        client = self.queue.client
        try:
            entries = client.xrange(broker.events_key(self.id), self._exclusive_last(), "+")
            if not entries and len(self.events) <= index and not self.finished and timeout > 0:
                answer = client.xread({broker.events_key(self.id): self._last}, block=int(timeout * 1000), count=100)
                entries = answer[0][1] if answer else []
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(min(timeout, 0.5))
            return []
        self._read(entries)
        return self.events[index:]

    def _exclusive_last(self) -> str:
        return "-" if self._last == b"0-0" else "(" + self._last.decode()

    def _read(self, entries) -> None:
        if not entries:
            return
        self._last = entries[-1][0]
        self.events.extend(broker.read_events(entries))
        for event in self.events[-len(entries):]:
            if event["event"] in broker.FINAL:
                self.status = event["event"]
            elif event["event"] in ("started", "requeued"):
                self.status = "running"

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = 15.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            self.events_from(len(self.events), min(left, 15.0))
        return self.finished

    def cancel(self) -> None:
        self.queue.cancel(self)


class reachable:
    """Turns the broker's connection errors into 503 (Unavailable) for the HTTP layer."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        import kombu.exceptions
        import redis

        if error is not None and isinstance(error, (redis.ConnectionError, redis.TimeoutError,
                                                    kombu.exceptions.OperationalError)):
            raise Unavailable(BROKER_DOWN) from None
        return False
