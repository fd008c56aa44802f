"""Running one measurement in a child process.

Peak RSS is per process and only grows, and OpenVINO keeps compiled models alive inside a process: to measure
each folder's memory and a true first start, and to hold only one pipeline in memory at a time (full-size
models), every measurement runs in a fresh interpreter. The child gets a JSON task and writes a JSON result.

A child never outlives its parent: Ctrl-C or SIGTERM in the parent ends it before the parent exits, and a child
whose parent was killed outright (SIGKILL) notices within a second and ends itself.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from ovsd3.atomic import scratch_folder
from ovsd3.errors import OvsdError

ORPHAN_POLL_SECONDS = 0.5
EXIT_ORPHANED = 3

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
    with scratch_folder("ovsd3-child") as scratch:
        task_path, result_path = scratch / "task.json", scratch / "result.json"
        task_path.write_text(json.dumps(task))
        env = dict(os.environ, DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        done = _run_to_the_end([sys.executable, "-m", "ovsd3.report.children", str(task_path), str(result_path),
                                str(os.getpid())], env)
        if result_path.exists():
            result = json.loads(result_path.read_text())
            if "error" in result:
                raise OvsdError(result["error"])
            if done.returncode == 0:
                return result
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise OvsdError(f"{task['name']} failed in its child process: {last}")


def _run_to_the_end(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """``command``'s run, its stderr kept; an exception here (Ctrl-C, SIGTERM) kills the child and waits for it
    before going on, so that no measurement runs on after ovsd3 ended."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = child.communicate()
    except BaseException:
        child.kill()
        child.wait()
        raise
    return subprocess.CompletedProcess(command, child.returncode, None, stderr)


def _end_with_parent(parent: int) -> None:
    """In the child: end as soon as the parent (pid ``parent``) is gone, as killed outright it could not end us
    itself. Linux kills us with the parent (PR_SET_PDEATHSIG); elsewhere a thread watches for it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the thread below

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_SECONDS)
        os._exit(EXIT_ORPHANED)

    if os.getppid() != parent:  # gone already, before we could ask to go with it
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=watch, daemon=True).start()


def _main(task_path: str, result_path: str, parent: str) -> int:
    _end_with_parent(int(parent))
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
    sys.exit(_main(*sys.argv[1:4]))
