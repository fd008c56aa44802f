"""`ovsd3 serve MODEL_DIR`: the web service (FastAPI on uvicorn)."""

from __future__ import annotations

from pathlib import Path

from ovsd3.errors import OvsdError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve image generation over HTTP",
        description="Serve an OpenVINO SD3 folder over HTTP: the OpenAI-style image API OpenVINO Model Server "
                    "serves (/v3/images/generations, /v3/images/edits), jobs with live previews (/v1/jobs), "
                    "/health, /metrics and a web page at /.")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                        help="folder from `ovsd3 convert` or optimum-intel")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="AUTO", help="OpenVINO device or plan, as for `ovsd3 run`")
    parser.add_argument("--workers", type=int, default=1, help="pipelines generating at once (each compiled once)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429")
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
    if args.write_ovms_config is not None:
        return write_ovms(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise OvsdError("serving needs FastAPI and uvicorn: pip install 'ovsd3[serve]'") from None
    from ovsd3.runtime.cache import CacheConfig
    from ovsd3.layout import ModelFolder
    from ovsd3.serve.api import create_app
    from ovsd3.serve.jobs import WorkerPool, load_pipeline

    ModelFolder.open(args.model_dir)
    default_cache = str(CacheConfig.parse(args.cache))  # refused before the pipelines compile
    if not 0 < args.port < 65536:
        raise OvsdError(f"--port must be between 1 and 65535 (got {args.port})")
    pool = WorkerPool(load_pipeline(args.model_dir, args.device), args.workers, args.max_queue)
    try:
        app = create_app(pool, model_name=args.model_dir.name, default_cache=default_cache,
                         default_noise=args.noise)
        print(f"ovsd3 serve: {args.model_dir} on http://{args.host}:{args.port} ({args.workers} worker(s), "
              f"queue {args.max_queue})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        pool.close()
    return 0
