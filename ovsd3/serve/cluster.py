"""``ovsd3 worker`` and ``ovsd3 cluster status``: the command lines of serving on many machines, and what the
broker says of the cluster (``cluster status``, the API servers' /metrics)."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import warnings
from pathlib import Path

from ovsd3.arguments import check_options, integer, number, path_fits
from ovsd3.errors import OvsdError
from ovsd3.serve import broker
from ovsd3.serve.jobs import MAX_WORKERS

MAX_BATCH = 16  # as AIME's API server batches at most
WORKER_RULES = {"model_dir": path_fits, "concurrency": integer(1, MAX_WORKERS), "max_batch": integer(1, MAX_BATCH),
                "requeue_after": number(6, 86400)}
MAX_NAME = 128


def add_parsers(subparsers) -> None:
    worker = subparsers.add_parser(
        "worker", help="draw the jobs of an `ovsd3 serve --broker` service",
        description="Hold one compiled pipeline of MODEL_DIR and draw the jobs that requests for its model put "
                    "in the broker (Celery on Redis), from any machine that reaches it. Example: ovsd3 worker "
                    "models/sd3-int8 --broker redis://:PASSWORD@broker-host:6379/0 --concurrency 2")
    worker.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="folder from `ovsd3 convert`")
    worker.add_argument("--broker", required=True, metavar="URL", help="redis://[:PASSWORD@]HOST:PORT/DB, or "
                        "rediss:// for TLS")
    worker.add_argument("--device", default="AUTO", help="OpenVINO device or plan, as for `ovsd3 run`")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="jobs drawn at once; they share one compiled model per component (default 1)")
    worker.add_argument("--name", default=None, help="how `ovsd3 cluster status` names this worker (default: "
                        "ovsd3-PID@HOST); two live workers cannot share one")
    worker.add_argument("--model", default=None, help="the model name requests use for this folder (their "
                        "`model` field; default: the folder's name)")
    worker.add_argument("--max-batch", type=int, default=1,
                        help=f"draw up to this many waiting jobs of one size, steps, guidance and cache mode in one "
                             f"batched call (1 to {MAX_BATCH}; default 1: one job per call); the worker then holds "
                             f"up to concurrency x max-batch jobs")
    worker.add_argument("--requeue-after", type=float, default=60.0, metavar="SECONDS",
                        help="a dead worker's job goes to another within this many seconds of its last "
                             "heartbeat (6 to 86400, default 60; a heartbeat every twelfth of it, at most 5 s)")
    worker.set_defaults(handler=run_worker)
    cluster = subparsers.add_parser(
        "cluster", help="what an `ovsd3 serve --broker` service's workers and queues are doing",
        description="Example: ovsd3 cluster status --broker redis://broker-host:6379/0")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="workers (name, model, device, busy, last heartbeat) and queue "
                                               "length per model")
    status.add_argument("--broker", required=True, metavar="URL")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=run_status)


def run_worker(args) -> int:
    from ovsd3.layout import ModelFolder
    from ovsd3.serve.worker import Batcher, Identity, Worker, check_name_free, default_name, register_task

    check_options(args, WORKER_RULES)
    name = args.name or default_name()
    model = args.model or args.model_dir.resolve().name
    for option, value in (("--name", name), ("--model", model)):
        if not value or len(value) > MAX_NAME or not value.isprintable() or any(c.isspace() for c in value):
            raise OvsdError(f"{option} must be 1 to {MAX_NAME} printable characters without spaces")
    settings = broker.BrokerSettings(broker.check_url(args.broker), requeue_after=args.requeue_after)
    client = broker.connect(settings)  # unreachable: one line, exit 2, before minutes of compiling
    ModelFolder.open(args.model_dir)  # damaged: one line, exit 2
    check_name_free(client, name, settings.dead_after)
    pipelines = _load(args)
    first = pipelines.queue[0]  # not drawing yet: no other thread touches the queue
    identity = Identity(name, model, args.device, args.concurrency, args.max_batch, getattr(first, "max_size", 0) or 0,
                        getattr(first, "size_multiple", 16))
    worker = Worker(settings, identity, client, Batcher(pipelines, args.max_batch))
    app = broker.celery_app(settings)
    register_task(app, worker)
    worker.heartbeat()
    stop = threading.Event()
    threading.Thread(target=worker.beat, args=(stop,), daemon=True, name="ovsd3-heartbeat").start()
    print(f"ovsd3 worker {name}: {model} on {args.device} ({args.concurrency} at once, batches of up to "
          f"{args.max_batch}), taking jobs from "
          f"{settings.shown_url}", flush=True)
    # Celery warns against root because of pickle; ovsd3's Celery takes JSON only (containers often run as root)
    warnings.filterwarnings("ignore", message=".*superuser privileges.*")
    try:
        celery_worker = app.Worker(pool_cls="threads", concurrency=args.concurrency * args.max_batch, hostname=name,
                                   queues=[broker.queue_name(model)], loglevel="WARNING", without_gossip=True,
                                   without_mingle=True, without_heartbeat=True, optimization="fair", quiet=True)
        celery_worker.start()
    finally:
        stop.set()
        worker.leave()
    print(f"ovsd3 worker {name}: stopped", file=sys.stderr)
    return 0


def _load(args) -> queue.Queue:
    from ovsd3.serve.jobs import load_pipeline, worker_pipelines

    pipelines = queue.Queue()
    for pipe in worker_pipelines(load_pipeline(args.model_dir, args.device, (), args.concurrency),
                                 args.concurrency):
        pipelines.put(pipe)
    return pipelines


def cluster_status(client, settings: broker.BrokerSettings) -> dict:
    """Workers heard from within a day (alive: within ``requeue_after``) and the queue of each model."""
    now = time.time()
    workers = broker.alive_workers(client, 86400)
    for worker in workers:
        worker["alive"] = now - float(worker["heartbeat"]) <= settings.requeue_after
        worker["seconds_since_heartbeat"] = round(now - float(worker["heartbeat"]), 1)
    models = sorted({worker["model"] for worker in workers} |
                    {key.decode().split(":", 2)[2] for key in client.scan_iter("ovsd3:queued:*")})
    return {"workers": workers, "queues": {model: client.zcard(broker.queued_key(model)) for model in models}}


def run_status(args) -> int:
    settings = broker.BrokerSettings(broker.check_url(args.broker))
    status = cluster_status(broker.connect(settings), settings)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'worker':32} {'model':20} {'device':8} {'busy':>6} {'heartbeat':>10}")
    for worker in status["workers"]:
        busy = f"{worker['busy']}/{worker['concurrency']}"
        beat = f"{worker['seconds_since_heartbeat']:.0f} s ago" + ("" if worker["alive"] else " (lost)")
        print(f"{worker['name'][:32]:32} {worker['model'][:20]:20} {worker['device'][:8]:8} {busy:>6} {beat:>10}")
    if not status["workers"]:
        print("(no worker has announced itself)")
    print()
    print(f"{'model':20} {'queued':>6}")
    for model, length in status["queues"].items():
        print(f"{model[:20]:20} {length:>6}")
    return 0


def cluster_metric_families(client, settings: broker.BrokerSettings):
    """/metrics of an API server: the cluster as the broker holds it."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    status = cluster_status(client, settings)
    alive = [worker for worker in status["workers"] if worker["alive"]]
    queue_length = GaugeMetricFamily("ovsd3_queue_length", "jobs waiting for a worker", labels=["model"])
    workers_alive = GaugeMetricFamily("ovsd3_workers_alive", "workers heard from", labels=["model"])
    workers_busy = GaugeMetricFamily("ovsd3_workers_busy", "jobs being drawn now", labels=["model"])
    for model, length in status["queues"].items():
        queue_length.add_metric([model], length)
        workers_alive.add_metric([model], sum(worker["model"] == model for worker in alive))
        workers_busy.add_metric([model], sum(int(worker["busy"]) for worker in alive if worker["model"] == model))
    yield from (queue_length, workers_alive, workers_busy)
    yield GaugeMetricFamily("ovsd3_steps_per_second", "sampling steps per second, all workers (last minute)",
                            value=sum(float(worker["steps_per_second"]) for worker in alive))
    stats = {key.decode(): int(value) for key, value in client.hgetall(broker.STATS).items()}
    for name, meaning in (("requests", "jobs accepted"), ("rejected", "requests refused with 429"),
                          ("images", "images generated"), ("steps", "sampling steps drawn"),
                          ("redelivered", "jobs handed to another worker after theirs died"),
                          ("failed", "jobs that failed inside ovsd3"), ("cancelled", "jobs cancelled")):
        metric = "ovsd3_jobs_" + name if name in ("redelivered", "failed", "cancelled") else "ovsd3_" + name
        yield CounterMetricFamily(metric, meaning, value=stats.get(name, 0))
