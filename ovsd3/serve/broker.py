"""ovsd3 past one process: jobs kept in Redis and run by ``ovsd3 worker``s through Celery.

- A job is a Redis hash (status, model, the request, its attempt) and a Redis stream of its events (queued,
  requeued, started, step with previews, then done, error or cancelled); every change is one Lua script, so two
  processes never interleave half a change, and a job takes one final event only (its images reach a reader once).
- Its Celery task (``ovsd3.generate``, the job id as its one argument) waits in a queue per model,
  ``ovsd3.<model>``: requests are routed by their ``model`` field to the workers that serve it.
- Celery runs with acks late: a task's message stays unacknowledged in Redis until its job ends, and a message
  whose worker died goes back to its queue once older than the visibility timeout. A running worker keeps its
  messages young with every heartbeat (``heartbeat`` below), so a live worker's long job is never handed to a
  second one, and a dead worker's job is handed on ``requeue_after`` seconds after its last heartbeat at most.
- Workers announce themselves (``ovsd3:workers``: name -> last heartbeat; ``ovsd3:worker:NAME``: what they serve).

API servers hold nothing of their own (:class:`BrokerQueue`); any number of them can stand behind a balancer.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass

from ovsd3.errors import OvsdError

TASK = "ovsd3.generate"
WORKERS = "ovsd3:workers"  # sorted set: worker name -> time of its last heartbeat
INSTANCES = "ovsd3:instances"  # sorted set: worker process (a uuid each start) -> time of its last heartbeat
STATS = "ovsd3:stats"  # hash of counters: requests, rejected, images, failed, cancelled, redelivered, steps
FINAL = ("done", "error", "cancelled")
MIN_REQUEUE_AFTER = 6
UNACKED_INDEX = "unacked_index"  # kombu's Redis transport: delivery tag -> when it was delivered


def job_key(job_id: str) -> str:
    return f"ovsd3:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"ovsd3:job:{job_id}:events"


def queued_key(model: str) -> str:
    return f"ovsd3:queued:{model}"  # sorted set of the model's waiting job ids (for --max-queue, across servers)


def worker_key(name: str) -> str:
    return f"ovsd3:worker:{name}"


def queue_name(model: str) -> str:
    return f"ovsd3.{model}"


@dataclass(frozen=True)
class BrokerSettings:
    """``requeue_after``: seconds after a worker's last heartbeat by which its running job is handed on."""

    url: str
    requeue_after: float = 60.0
    keep_finished: int = 3600  # seconds a finished job stays readable (GET /v1/jobs/{id})

    def __post_init__(self):
        if not MIN_REQUEUE_AFTER <= self.requeue_after <= 86400:
            raise OvsdError(f"--requeue-after must be from {MIN_REQUEUE_AFTER} to 86400 seconds "
                            f"(got {self.requeue_after:g})")

    @property
    def heartbeat(self) -> float:
        """Seconds between a worker's heartbeats: a dozen within ``requeue_after``, at most 5 s apart."""
        return min(5.0, self.requeue_after / 12)

    @property
    def dead_after(self) -> float:
        """A worker silent this long is dead (its running job may be taken over); well before kombu hands
        its message on (``visibility_timeout``), so that the taking over is not refused."""
        return 3 * self.heartbeat

    @property
    def visibility_timeout(self) -> float:
        """kombu returns a message older than this at its next sweep (every ``heartbeat`` seconds)."""
        return self.requeue_after - self.heartbeat

    @property
    def shown_url(self) -> str:
        """The URL without its password, for messages and logs."""
        return shown(self.url)


def shown(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("redis", "rediss"):
        raise OvsdError(f"--broker must be a redis:// or rediss:// URL (got {shown(url)!r})")
    return url


def connect(settings: BrokerSettings):
    """A Redis client, checked: a broker that cannot be reached is a one-line error."""
    import redis

    try:
        client = redis.Redis.from_url(check_url(settings.url), socket_connect_timeout=5, socket_timeout=30,
                                      health_check_interval=10, retry_on_timeout=True)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as error:
        raise OvsdError(f"cannot reach the broker at {settings.shown_url}: {one_line(error)}") from None
    return client


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def celery_app(settings: BrokerSettings):
    """The Celery app of API servers and workers: Redis as broker and result store, acks late."""
    import ssl

    from celery import Celery

    app = Celery("ovsd3", broker=settings.url, backend=settings.url, set_as_current=False)
    # kombu sweeps unacknowledged messages every heartbeat, under a lock in Redis that outlives a holder killed
    # mid-sweep (or a Redis killed then) by its expiry: 300 s by default, which would hold every redelivery up
    # for five minutes. A sweep takes milliseconds, and one message restored twice is impossible anyway (each
    # restore is a transaction on the message), so the lock expires after a heartbeat.
    transport = {"visibility_timeout": settings.visibility_timeout, "unacked_mutex_expire": settings.heartbeat,
                 "unacked_restore_interval": settings.heartbeat, "unacked_restore_throttle": 1}
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,  # a run the broker's loss broke: its message is handed on
        worker_prefetch_multiplier=1,  # a worker takes what it runs now, no more: waiting jobs stay shared
        broker_transport_options=transport, result_backend_transport_options=transport,
        result_expires=settings.keep_finished, task_serializer="json", result_serializer="json",
        accept_content=["json"], broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        worker_hijack_root_logger=False, worker_cancel_long_running_tasks_on_connection_loss=False,
        task_send_sent_event=False, worker_send_task_events=False)
    if urllib.parse.urlsplit(settings.url).scheme == "rediss" and "ssl_cert_reqs" not in settings.url:
        app.conf.update(broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
                        redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED})
    return app


# -- the job's record: each change one script ------------------------------------------------------------

# KEYS: job, events, queued, stats. ARGV: job id, model, request JSON, created, max queue.
# Returns the job's place in its queue; 0: the queue is full; -1: the job exists (a retried submission)
SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
  redis.call('HINCRBY', KEYS[4], 'rejected', 1)
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'model', ARGV[2], 'request', ARGV[3], 'created', ARGV[4],
           'attempt', 0, 'sent', 0)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
local position = redis.call('ZCARD', KEYS[3])
redis.call('XADD', KEYS[2], '*', 'event', 'queued', 'index', 0, 'data', cjson.encode({position = position}))
redis.call('HINCRBY', KEYS[4], 'requests', 1)
return position
"""

FINISH = """
local function finish(event, data, now, ttl, counter)
  local index = redis.call('XLEN', KEYS[2])
  redis.call('XADD', KEYS[2], '*', 'event', event, 'index', index, 'data', data)
  redis.call('HSET', KEYS[1], 'status', event, 'finished', now)
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  if counter ~= '' then redis.call('HINCRBY', KEYS[4], counter, 1) end
end
local function final(status)
  return status == 'done' or status == 'error' or status == 'cancelled'
end
"""

# KEYS: job, events, queued, stats. ARGV: job id, attempt, event, data JSON, final?, now, ttl, counter
EMIT = FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or final(status) then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
if ARGV[5] == '1' then
  finish(ARGV[3], ARGV[4], ARGV[6], ARGV[7], ARGV[8])
else
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[3], 'index', redis.call('XLEN', KEYS[2]), 'data', ARGV[4])
end
return 1
"""

# KEYS: job, events, queued, stats. ARGV: job id, now, ttl. Returns -1 (no such job), 0 (already over),
# 1 (a running job: its worker stops at its next step), 2 (a queued job: cancelled now)
CANCEL = FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if final(status) then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
if status == 'queued' then
  finish('cancelled', '{}', ARGV[2], ARGV[3], 'cancelled')
  return 2
end
return 1
"""

# KEYS: job, events, queued, stats, workers, instances. ARGV: job id, worker, now, ttl, worker instance,
# seconds without a heartbeat after which a worker counts as dead.
# Returns {attempt, previous worker}; attempt 0: nothing to run (over, cancelled, unknown, or running on a live
# worker: a second message for one job, which a re-sent task or a late redelivery can make)
CLAIM = FINISH + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or final(status) then return {0, ''} end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  finish('cancelled', '{}', ARGV[3], ARGV[4], 'cancelled')
  return {0, ''}
end
local previous = redis.call('HGET', KEYS[1], 'worker') or ''
local last = redis.call('ZSCORE', KEYS[6], redis.call('HGET', KEYS[1], 'instance') or '')
if status == 'running' and last and tonumber(ARGV[3]) - tonumber(last) < tonumber(ARGV[6]) then
  return {0, previous}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started', ARGV[3], 'instance', ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[1])
if status == 'running' then
  local silent = last and (tonumber(ARGV[3]) - tonumber(last)) or -1
  redis.call('XADD', KEYS[2], '*', 'event', 'requeued', 'index', redis.call('XLEN', KEYS[2]), 'data',
             cjson.encode({from_worker = previous, to_worker = ARGV[2], attempt = attempt,
                           seconds_since_heartbeat = silent}))
  redis.call('HINCRBY', KEYS[4], 'redelivered', 1)
end
return {attempt, previous}
"""


def job_keys(job_id: str, model: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), queued_key(model), STATS]


def new_job_id() -> str:
    return uuid.uuid4().hex


def read_events(entries) -> list[dict]:
    """Stream entries -> the events as the embedded server records them ({"event", "index", ...data})."""
    events = []
    for _, fields in entries:
        data = json.loads(fields[b"data"])
        events.append({"event": fields[b"event"].decode(), "index": int(fields[b"index"]), **data})
    return events


def alive_workers(client, within: float) -> list[dict]:
    """The workers heard from within ``within`` seconds: what each said of itself at its last heartbeat."""
    names = client.zrangebyscore(WORKERS, time.time() - within, "+inf")
    workers = []
    for name in names:
        record = client.hgetall(worker_key(name.decode()))
        if record:
            workers.append({key.decode(): value.decode() for key, value in record.items()})
    return workers
