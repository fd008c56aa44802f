"""`ovsd3 serve MODEL_DIR`: the web service (FastAPI on uvicorn)."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from ovsd3.arguments import check_options, integer, number, path_fits
from ovsd3.errors import OvsdError
from ovsd3.serve.jobs import MAX_QUEUE, MAX_WORKERS

# Checked before anything opens or starts
RULES = {"model_dir": path_fits, "write_ovms_config": path_fits, "lora": path_fits, "port": integer(1, 65535),
         "workers": integer(1, MAX_WORKERS), "max_queue": integer(1, MAX_QUEUE), "api_key_file": path_fits,
         "job_timeout": number(1, 7 * 86400), "requeue_after": number(6, 86400)}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve image generation over HTTP",
        description="Serve an OpenVINO SD3 folder over HTTP: the OpenAI-style image API OpenVINO Model Server "
                    "serves (/v3/images/generations, /v3/images/edits), jobs with live previews (/v1/jobs), "
                    "/health, /metrics and a web page at /. With --broker instead of MODEL_DIR: the same API "
                    "in front of `ovsd3 worker`s on any machines. Examples: ovsd3 serve models/sd3-int8 "
                    "--workers 2; ovsd3 serve --broker redis://:PASSWORD@broker-host:6379/0 --port 8000")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", nargs="?",
                        help="folder from `ovsd3 convert` or optimum-intel (not with --broker)")
    parser.add_argument("--broker", default=None, metavar="URL",
                        help="serve the jobs of `ovsd3 worker`s through this Redis (redis://[:PASSWORD@]HOST:PORT/"
                             "DB, rediss:// for TLS) instead of a model of its own; any number of such servers "
                             "can stand behind one balancer")
    parser.add_argument("--requeue-after", type=float, default=60.0, metavar="SECONDS",
                        help="with --broker: a worker silent this long no longer counts as serving its model "
                             "(as its `ovsd3 worker --requeue-after`; default 60)")
    parser.add_argument("--job-timeout", type=float, default=None, metavar="SECONDS",
                        help="a job drawing longer than this ends with an error (default: no limit)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="requests must send `Authorization: Bearer KEY` (the openai client's api_key); "
                             "others get 401. /health stays open")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help="as --api-key, the keys read from FILE (one per line), so they stay off the "
                             "command line")
    parser.add_argument("--log-requests", action="store_true",
                        help="log each request's prompt, size and job id to stderr (off by default: prompts "
                             "and images are not written anywhere)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="AUTO", help="OpenVINO device or plan, as for `ovsd3 run`")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a LoRA adapter applied to the transformer of every worker, as `ovsd3 run --lora`; "
                             "repeatable")
    parser.add_argument("--lora-mode", default=None, metavar="merge|branch",
                        help="how --lora is applied, as `ovsd3 run --lora-mode` (default: merge on a float folder, "
                             "branch on a quantized one)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"pipelines generating at once (1 to {MAX_WORKERS}; default 1); they share one "
                             "compiled model per component, so one copy of the weights, and split the cores")
    parser.add_argument("--max-queue", type=int, default=16,
                        help=f"requests that may wait, 1 to {MAX_QUEUE} (default 16); more get 429")
    parser.add_argument("--cache", default=None, metavar="MODE",
                        help="step caching for requests that name none (their `cache` field), as `ovsd3 run "
                             "--cache`; default off")
    parser.add_argument("--noise", choices=("torch", "numpy"), default="torch",
                        help="random stream for requests that name none (their `noise` field): torch (default; a "
                             "seed draws diffusers' picture) or numpy")
    parser.add_argument("--write-ovms-config", type=Path, default=None, metavar="DIR",
                        help="instead of serving, write the config.json and graph.pbtxt with which OpenVINO Model "
                             "Server serves MODEL_DIR (then: ovms --rest_port 8000 --config_path DIR/config.json); "
                             "--device must then be CPU, GPU or NPU")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --write-ovms-config DIR")
    parser.set_defaults(handler=run)


def write_ovms(args) -> int:
    from ovsd3.serve.bodies import Limits
    from ovsd3.serve.ovms import write_ovms_config

    device = "CPU" if args.device == "AUTO" else args.device  # OVMS's graph takes no AUTO
    limits = Limits()
    config = write_ovms_config(args.model_dir, args.write_ovms_config, device=device, max_images=limits.max_images,
                               max_steps=limits.max_steps, overwrite=args.overwrite)
    print(f"wrote {config} and {config.parent / args.model_dir.name / 'graph.pbtxt'}; serve it with:\n"
          f"  ovms --rest_port 8000 --config_path {config}")
    return 0


def run(args) -> int:
    check_options(args, RULES)
    if (args.model_dir is None) == (args.broker is None):
        raise OvsdError("give MODEL_DIR (serve it here) or --broker URL (serve `ovsd3 worker`s' jobs), one of them")
    if args.write_ovms_config is not None:
        if args.model_dir is None:
            raise OvsdError("--write-ovms-config needs MODEL_DIR")
        return write_ovms(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise OvsdError("serving needs FastAPI and uvicorn: pip install 'ovsd3[serve]'") from None
    keys = api_keys(args)
    if args.broker is not None:
        given = [option for option, value in (("--workers", args.workers), ("--lora", args.lora),
                                              ("--lora-mode", args.lora_mode),
                                              ("--device", args.device != "AUTO" or None)) if value]
        if given:
            raise OvsdError(f"{given[0]}: a --broker server holds no model; give it to `ovsd3 worker`")
        return run_broker(args, keys)
    args.workers = args.workers or 1
    from ovsd3.layout import ModelFolder
    from ovsd3.runtime.adapters import AdapterEdit, parse_adapters, parse_lora_mode
    from ovsd3.runtime.cache import CacheConfig
    from ovsd3.serve.api import create_app
    from ovsd3.serve.bodies import Limits
    from ovsd3.serve.jobs import WorkerPool, load_pipeline

    limits = Limits()
    model = ModelFolder.open(args.model_dir)
    model.check_defaults_within(limits.max_steps, limits.max_guidance, "ovsd3 serve")
    parse_lora_mode(args.lora_mode, "--lora-mode")
    AdapterEdit(parse_adapters(args.lora), model.block_count)  # a bad --lora file: refused before binding
    default_cache = str(CacheConfig.parse(args.cache))  # refused before the pipelines compile
    listening = bind(args.host, args.port)  # a taken port is said before minutes of compiling, not after
    try:
        pool = WorkerPool(load_pipeline(args.model_dir, args.device, args.lora, args.workers, args.lora_mode),
                          args.workers,
                          args.max_queue, job_timeout=args.job_timeout)
    except BaseException:
        listening.close()
        raise
    try:
        app = create_app(pool, model_name=args.model_dir.name, default_cache=default_cache,
                         default_noise=args.noise, api_keys=keys, log_requests=args.log_requests)
        print(f"ovsd3 serve: {args.model_dir} on http://{args.host}:{args.port} ({args.workers} worker(s), "
              f"queue {args.max_queue}); Ctrl-C stops it, cancelling queued and running jobs", flush=True)
        serve(app, pool, listening)
    finally:
        if not pool.close(timeout=SHUTDOWN_SECONDS):
            print("ovsd3 serve: a worker is still inside a model call; leaving it", file=sys.stderr)
    return 0


SHUTDOWN_SECONDS = 10.0  # for open connections to finish once their jobs are cancelled, then for the workers
DRAIN_SECONDS = 60.0  # with --broker: for waiting requests to get their images (the jobs outlive the server)


def run_broker(args, keys: list[str]) -> int:
    """An API server with no model: jobs go to the broker, ``ovsd3 worker``s draw them."""
    from ovsd3.runtime.cache import CacheConfig
    from ovsd3.serve.api import create_app
    from ovsd3.serve.broker import BrokerSettings, check_url
    from ovsd3.serve.remote import BrokerQueue

    settings = BrokerSettings(check_url(args.broker), requeue_after=args.requeue_after)
    default_cache = str(CacheConfig.parse(args.cache))
    listening = bind(args.host, args.port)
    try:
        backend = BrokerQueue(settings, args.max_queue, job_timeout=args.job_timeout)  # unreachable: exit 2
    except BaseException:
        listening.close()
        raise
    app = create_app(backend, default_cache=default_cache, default_noise=args.noise, api_keys=keys,
                     log_requests=args.log_requests)
    print(f"ovsd3 serve: the workers of {settings.shown_url} on http://{args.host}:{args.port} (queue "
          f"{args.max_queue} per model); Ctrl-C stops taking requests, waits up to {DRAIN_SECONDS:.0f} s for "
          f"those waiting, and leaves their jobs to the workers", flush=True)
    try:
        serve(app, backend, listening, graceful=DRAIN_SECONDS)
    finally:
        backend.close()
    return 0


def api_keys(args) -> list[str]:
    """--api-key and the lines of --api-key-file: the keys a request may send."""
    keys = [args.api_key] if args.api_key is not None else []
    if args.api_key_file is not None:
        try:
            text = args.api_key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise OvsdError(f"--api-key-file {args.api_key_file}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise OvsdError(f"--api-key-file {args.api_key_file}: holds no key")
    for key in keys:
        if not key or len(key) > 1024 or not key.isprintable() or any(char.isspace() for char in key):
            raise OvsdError("--api-key: a key is 1 to 1024 printable characters without spaces")
    return keys


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use or an unknown host is a one-line error."""
    if not 0 < port < 65536:
        raise OvsdError(f"--port must be between 1 and 65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise OvsdError(f"--host {host}: {error.strerror}") from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
    try:
        listening.bind(address)
    except OSError as error:
        listening.close()
        raise OvsdError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listening


def serve(app, pool, listening: socket.socket, graceful: float = SHUTDOWN_SECONDS) -> None:
    """uvicorn on ``listening``; on Ctrl-C or SIGTERM the pool stops taking work and cancels its jobs first,
    so that requests waiting for images end (503) and uvicorn's graceful shutdown does not wait for them."""
    import threading

    import uvicorn

    from ovsd3.atomic import restore_handlers

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:  # the first signal; a second one forces uvicorn's exit
                threading.Thread(target=_report_cancelled, args=(pool,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful)
    # Once shut down, uvicorn raises the signal again with the handlers it found: SIGTERM then ends here too, and
    # neither is recorded by ovsd3's Interrupts, for which a signal caught here would still stop the command (main
    # would report `serve` interrupted instead of its normal end)
    previous = {signum: signal.signal(signum, signal.default_int_handler)
                for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        Server(config).run(sockets=[listening])
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM, after the graceful shutdown: the normal end of `ovsd3 serve`
    finally:
        restore_handlers(previous)
    print("ovsd3 serve: stopped", file=sys.stderr)


def _report_cancelled(pool) -> None:
    counts = pool.cancel_all()  # in a thread: a signal handler must not wait for the pool's locks
    if counts is None:  # --broker: the jobs live on in the broker
        print("ovsd3 serve: stopping; taking no new requests, the workers go on with every job", file=sys.stderr,
              flush=True)
        return
    print(f"ovsd3 serve: stopping; cancelled {counts[0]} queued and {counts[1]} running job(s)", file=sys.stderr,
          flush=True)
