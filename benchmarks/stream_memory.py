"""What an OpenVINO CPU stream costs in memory for one transformer, by compile setting (issue 26's `serve
--workers` memory): each mode in a child process, its peak RSS after one 512x512 call per request at once.

    PYTHONPATH=$PWD python benchmarks/stream_memory.py FOLDER [--modes latency,throughput,...]

Modes: latency (1 stream, 1 request), throughput (2 streams, 2 requests at once), throughput-static (the same,
the model reshaped to the call's static shapes first), throughput-nocache (CPU_RUNTIME_CACHE_CAPACITY 0: no
per-stream cache of shape-specific kernels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

MODES = ("latency", "throughput", "throughput-static", "throughput-nocache")


def child(folder: Path, mode: str) -> dict:
    import numpy as np
    import openvino as ov

    sys.path.insert(0, str(Path(__file__).parent))
    from quantize_full_size import synthetic_inputs

    inputs = synthetic_inputs(1, 512, np.random.default_rng(0))
    core = ov.Core()
    model = core.read_model(folder / "transformer" / "openvino_model.xml")
    names = {port.get_any_name() for port in model.inputs}
    inputs = {name: value for name, value in inputs.items() if name in names}
    if mode.endswith("static"):
        model.reshape({name: list(value.shape) for name, value in inputs.items()})
    config = {"PERFORMANCE_HINT": "LATENCY"} if mode == "latency" else \
        {"PERFORMANCE_HINT": "THROUGHPUT", "PERFORMANCE_HINT_NUM_REQUESTS": 2}
    if mode.endswith("nocache"):
        config["CPU_RUNTIME_CACHE_CAPACITY"] = 0
    compiled = core.compile_model(model, "CPU", config)
    requests = [compiled.create_infer_request() for _ in range(1 if mode == "latency" else 2)]
    threads = [threading.Thread(target=request.infer, args=(inputs,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    streams = compiled.get_property("NUM_STREAMS")
    return {"mode": mode, "streams": int(streams), "requests": len(requests),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, args.child)))
        return
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:  # no model cache from an earlier run
            done = subprocess.run([sys.executable, __file__, str(args.folder), "--child", mode], capture_output=True,
                                  text=True, env={"XDG_CACHE_HOME": cache, "PATH": "/usr/bin:/bin"}, timeout=1800)
        print(done.stdout.strip() or done.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
