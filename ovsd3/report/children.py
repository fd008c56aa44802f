"""Running one measurement in a child process.

Peak RSS is per process and only grows, and OpenVINO keeps compiled models alive inside a process: to measure
each folder's memory and a true first start, and to hold only one pipeline in memory at a time (full-size
models), every measurement runs in a fresh interpreter. The child gets a JSON task and writes a JSON result.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from ovsd3.errors import OvsdError

# task name -> "module:function"; each function takes the task dict and returns a JSON-able dict.
TASKS = {
    "ovsd3_generate": "ovsd3.report.measure:generate",
    "ovsd3_first_start": "ovsd3.report.measure:first_start",
    "ovsd3_batches": "ovsd3.report.measure:batches",
    "genai_generate": "ovsd3.report.peers:genai_generate",
    "genai_batches": "ovsd3.report.peers:genai_batches",
    "diffusers_batches": "ovsd3.report.peers:diffusers_batches",
}


def run_child(task: dict) -> dict:
    """Run ``task`` (``{"name": ..., ...}``) in a fresh Python; its result, with ``peak_rss_bytes`` added."""
    if task["name"] not in TASKS:
        raise ValueError(f"unknown task {task['name']}")
    with tempfile.TemporaryDirectory(prefix="ovsd3-child-") as scratch:
        task_path, result_path = Path(scratch) / "task.json", Path(scratch) / "result.json"
        task_path.write_text(json.dumps(task))
        env = dict(os.environ, DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        done = subprocess.run([sys.executable, "-m", "ovsd3.report.children", str(task_path), str(result_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if result_path.exists():
            result = json.loads(result_path.read_text())
            if "error" in result:
                raise OvsdError(result["error"])
            if done.returncode == 0:
                return result
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise OvsdError(f"{task['name']} failed in its child process: {last}")


def _main(task_path: str, result_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    module_name, function_name = TASKS[task["name"]].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        result = function(task)
    except OvsdError as error:
        Path(result_path).write_text(json.dumps({"error": str(error)}))
        return 2
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
