"""Serving past one process, measured at full size (issue 26): `ovsd3 serve --workers N` memory, images per
minute through `ovsd3 serve --broker` with one and two worker processes, the time a SIGKILLed worker's job
takes to run elsewhere, and the jobs a small chaos run loses.

    PYTHONPATH=$PWD python benchmarks/cluster_load.py [--workdir /tmp/ovsd3-cluster-bench] [--parts ...]

Builds once under --workdir (random weights: values change neither memory nor speed) full-size SD3 Medium
without T5 (`ovsd3 convert --no-t5`), quantizes it (`ovsd3 quantize`, a small calibration, the gate's bounds
lowered since random weights draw noise), and measures the INT8 folder (--folder measures another one):

- workers: `ovsd3 serve FOLDER --workers 1/2/4` (empty model cache: each run compiles), one request per
  worker at once; the child's peak RSS (VmHWM) after the draw.
- throughput: one Redis, one `ovsd3 serve --broker`, 1 and 2 `ovsd3 worker` processes of one thread each
  (`taskset -c K`: OpenVINO sees one core; the single worker pinned too), the same jobs sent at once; images
  per minute from the first job's start to the last one's end (from the jobs' `started`/`finished` in Redis).
  With `--max-batch 1` and `--max-batch B` when `ovsd3 worker` has the option (else without it, said so).
- requeue: two pinned workers, one job; its worker SIGKILLed after its first step; the time from the kill
  (and from the dead worker's last heartbeat) to the job's `started` on the other worker (ovsd3:job:<id>
  `started`, `worker`, and `requeued` in its event stream), with --requeue-after 60 (the default) and 15.
- chaos: jobs sent with the openai client to two API servers in front of two workers; a busy worker
  SIGKILLed mid-job (and a fresh one started), one API server restarted, Redis SIGKILLed and restarted;
  jobs lost = jobs whose client did not get its images exactly once, or that did not end `done` once.

Worker, API and Redis output goes to --workdir/logs. The machine is shared: say so with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_workers import memory_of  # noqa: E402  (the same VmHWM reading as the reduced-folder benchmark)

PRESET = "sd3-medium"
MODEL = "sd3-medium-int8"  # the model name the workers announce and the requests ask for
PARTS = ("workers", "throughput", "requeue", "chaos")


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def build_folders(workdir: Path) -> Path:
    """The full-size INT8 folder, built (random source, convert, quantize) on the first run only."""
    source, fp16, int8 = (workdir / f"{PRESET}-random-fp16", workdir / f"{PRESET}-fp16-ov",
                          workdir / f"{PRESET}-int8-ov")
    if (int8 / "model_index.json").exists():
        return int8
    if not (source / "model_index.json").exists():
        import torch

        from ovsd3.presets import get_preset
        from ovsd3.synthetic import save_random_pipeline

        save_random_pipeline(get_preset(PRESET), source, with_t5=False, dtype=torch.float16,
                             log=lambda line: print(f"  {line}", flush=True))
    ovsd3 = [sys.executable, "-m", "ovsd3"]
    if not (fp16 / "model_index.json").exists():
        run([*ovsd3, "convert", str(source), str(fp16), "--no-t5", "--overwrite"])
    shorten_defaults(fp16)
    # Random weights draw noise either way: the gate's picture bounds cannot judge them, so they are lowered.
    run([*ovsd3, "quantize", str(fp16), str(int8), "--calib", "8", "--calib-size", "256", "--gate-prompts", "2",
         "--min-psnr", "0", "--min-ssim", "-1", "--calib-cache", str(workdir / "calibration"), "--overwrite"])
    return int8


def shorten_defaults(folder: Path) -> None:
    """4 steps without guidance as the folder's recorded defaults, which `ovsd3 quantize` calibrates and gates
    with: SD3 Medium's 28 steps at guidance 7 take the FP16 model most of an hour here. Random weights: the
    calibration's values do not matter, only the INT8 graph's shape and speed."""
    record_path = folder / "ovsd3.json"
    record = json.loads(record_path.read_text())
    record["defaults"].update(num_inference_steps=4, guidance_scale=0.0)
    record_path.write_text(json.dumps(record, indent=2) + "\n")


# -- processes --------------------------------------------------------------------------------------------

class Processes:
    """What one measurement started (Redis, API servers, workers), each logging to a file; all stopped at
    the end, by their own pids."""

    def __init__(self, workdir: Path, label: str):
        from ovsd3.serve.launch import RedisServer

        self.logs = workdir / "logs" / label
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))).start()
        self.children: dict[str, subprocess.Popen] = {}
        import redis

        self.client = redis.Redis.from_url(self.redis.url)

    def spawn(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.children[name] = process
        return process

    def worker(self, folder: Path, name: str, core: int | None, *options, timeout: float = 600.0):
        """``ovsd3 worker`` (pinned to ``core`` with taskset), returned once its first heartbeat is in Redis."""
        pin = ["taskset", "-c", str(core)] if core is not None else []
        process = self.spawn(name, [*pin, sys.executable, "-m", "ovsd3.cli", "worker", str(folder), "--broker",
                                    self.redis.url, "--name", name, "--model", MODEL, "--device", "CPU",
                                    *map(str, options)])
        deadline = time.monotonic() + timeout
        while self.client.zscore("ovsd3:workers", name) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {name} did not start: see {self.logs / (name + '.log')}")
            time.sleep(0.5)
        return process

    def api(self, name: str, port: int, *options) -> str:
        process = self.spawn(name, [sys.executable, "-m", "ovsd3.cli", "serve", "--broker", self.redis.url,
                                    "--port", str(port), *map(str, options)])
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not answers(f"{base}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"API server {name} did not start: see {self.logs / (name + '.log')}")
            time.sleep(0.3)
        return base

    def stop(self, name: str, kill: bool = False) -> None:
        process = self.children.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        for name in list(self.children):
            self.stop(name, kill=True)
        self.redis.stop()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def post_json(url: str, body: dict, timeout: float = 600.0) -> tuple[int, dict]:
    call = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def job(client, job_id: str) -> dict:
    return {key.decode(): value.decode() for key, value in client.hgetall(f"ovsd3:job:{job_id}").items()
            if key != b"request"}


def event_names(client, job_id: str) -> list[str]:
    return [fields[b"event"].decode() for _, fields in client.xrange(f"ovsd3:job:{job_id}:events")]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)
    return value


def max_batch_supported() -> bool:
    shown = subprocess.run([sys.executable, "-m", "ovsd3.cli", "worker", "--help"], capture_output=True, text=True)
    return "--max-batch" in shown.stdout


# -- 1. serve --workers N: memory -------------------------------------------------------------------------

def workers_memory(folder: Path, counts: list[int], request: dict) -> list[dict]:
    from ovsd3.serve.launch import free_port, wait_until_healthy

    rows = []
    for workers in counts:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as cache_home:  # an empty OpenVINO model cache: every run compiles
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "ovsd3.cli", "serve", str(folder), "--port", str(port),
                                        "--device", "CPU", "--workers", str(workers)],
                                       env=dict(os.environ, XDG_CACHE_HOME=cache_home), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            try:
                wait_until_healthy(base, process, 1800)
                loaded = time.perf_counter() - started
                at_load = memory_of(process.pid)
                body = dict(request, model=folder.name)
                with ThreadPoolExecutor(max_workers=workers) as clients:
                    codes = list(clients.map(lambda seed: post_json(f"{base}/v3/images/generations",
                                                                    dict(body, rng_seed=seed))[0], range(workers)))
                drawn = time.perf_counter() - started - loaded
                after = memory_of(process.pid)
            finally:
                process.terminate()
                process.wait(timeout=120)
        assert codes == [200] * workers, codes
        row = dict(workers=workers, load_s=loaded, draw_s=drawn, rss_at_load=at_load["VmRSS"], peak=after["VmHWM"])
        rows.append(row)
        print(f"serve --workers {workers}: load {loaded:.0f} s, RSS at load {row['rss_at_load']:.2f} GiB, "
              f"{workers} request(s) at once in {drawn:.0f} s, peak RSS {row['peak']:.2f} GiB "
              f"(x{row['peak'] / rows[0]['peak']:.2f} of {rows[0]['workers']})", flush=True)
    return rows


# -- 2. images per minute through the broker --------------------------------------------------------------

def throughput(folder: Path, workdir: Path, worker_counts: list[int], batches: list[int | None], jobs: int,
               request: dict) -> list[dict]:
    rows = []
    for batch in batches:
        for count in worker_counts:
            label = f"throughput-{count}w-batch{batch or 'none'}"
            cluster = Processes(workdir, label)
            try:
                options = ["--max-batch", batch] if batch else []
                for index in range(count):
                    cluster.worker(folder, f"w{index}", index % (os.cpu_count() or 1), *options)
                base = cluster.api("api", free_port_number(), "--max-queue", 64)
                rows.append(dict(workers=count, max_batch=batch, **send_and_time(cluster, base, jobs, request)))
            finally:
                cluster.close()
            row = rows[-1]
            print(f"{count} worker process(es), --max-batch {batch or '(none)'}: {jobs} jobs in "
                  f"{row['span_s']:.0f} s (first start to last end), {row['per_minute']:.2f} images/min; "
                  f"submit to last end {row['wall_s']:.0f} s; per worker {row['by_worker']}", flush=True)
    return rows


def free_port_number() -> int:
    from ovsd3.serve.launch import free_port

    return free_port()


def send_and_time(cluster: Processes, base: str, jobs: int, request: dict) -> dict:
    submitted = time.time()
    ids = []
    for seed in range(jobs):
        status, created = post_json(f"{base}/v1/jobs", dict(request, model=MODEL, rng_seed=seed, preview_every=0))
        assert status == 202, (status, created)
        ids.append(created["id"])
    wait_until(lambda: all(job(cluster.client, job_id).get("status") in ("done", "error", "cancelled")
                           for job_id in ids), 3600, "every throughput job ends")
    records = [job(cluster.client, job_id) for job_id in ids]
    assert all(record["status"] == "done" for record in records), records
    first = min(float(record["started"]) for record in records)
    last = max(float(record["finished"]) for record in records)
    images = jobs * request.get("n", 1)
    by_worker: dict[str, int] = {}
    for record in records:
        by_worker[record["worker"]] = by_worker.get(record["worker"], 0) + 1
    return dict(jobs=jobs, span_s=last - first, wall_s=last - submitted, per_minute=images / (last - first) * 60,
                by_worker=by_worker)


# -- 3. a SIGKILLed worker's job, handed on ---------------------------------------------------------------

def requeue(folder: Path, workdir: Path, requeue_after: float, request: dict, run_index: int) -> dict:
    cluster = Processes(workdir, f"requeue-{requeue_after:g}-{run_index}")
    try:
        workers = {name: cluster.worker(folder, name, core, "--requeue-after", requeue_after)
                   for core, name in enumerate(("w0", "w1"))}
        base = cluster.api("api", free_port_number(), "--requeue-after", requeue_after)
        status, created = post_json(f"{base}/v1/jobs", dict(request, model=MODEL, preview_every=0))
        assert status == 202, created
        job_id = created["id"]
        wait_until(lambda: "step" in event_names(cluster.client, job_id), 900, "the job's first step")
        victim = job(cluster.client, job_id)["worker"]
        last_heartbeat = cluster.client.zscore("ovsd3:workers", victim)
        workers[victim].send_signal(signal.SIGKILL)
        killed = time.time()
        wait_until(lambda: job(cluster.client, job_id).get("attempt") not in (None, "1"), requeue_after * 3 + 120,
                   "the killed worker's job started again")
        record = job(cluster.client, job_id)
        names = event_names(cluster.client, job_id)
        handed = float(record["started"])
        return dict(requeue_after=requeue_after, kill_to_start=handed - killed,
                    heartbeat_to_start=handed - last_heartbeat, from_worker=victim, to_worker=record["worker"],
                    requeued_event="requeued" in names)
    finally:
        cluster.close()


# -- 4. chaos ---------------------------------------------------------------------------------------------

def chaos(folder: Path, workdir: Path, jobs: int, request: dict, requeue_after: float = 15) -> dict:
    from ovsd3.serve import launch

    cluster = Processes(workdir, "chaos")
    try:
        setting = ("--requeue-after", requeue_after)
        workers = {name: cluster.worker(folder, name, core, *setting) for core, name in enumerate(("w0", "w1"))}
        ports = [free_port_number(), free_port_number()]
        bases = [cluster.api(f"api{index}", port, *setting, "--max-queue", 64) for index, port in enumerate(ports)]
        outcomes: dict = {}
        threads = launch.send_with_openai(bases, jobs, request, outcomes, MODEL)
        running = wait_until(lambda: running_job(cluster.client), 900, "a running job")
        job_id, victim = running
        wait_until(lambda: "step" in event_names(cluster.client, job_id), 900, "the victim job's first step")
        workers[victim].send_signal(signal.SIGKILL)
        events = [f"SIGKILL {victim} mid-job"]
        cluster.stop("api0")  # SIGTERM: it drains, its waiting clients ask the other one
        cluster.api("api0", ports[0], *setting, "--max-queue", 64)
        events.append("api0 restarted")
        cluster.redis.kill()
        time.sleep(2)
        cluster.redis.start()
        events.append("Redis SIGKILLed, restarted after 2 s")
        cluster.worker(folder, f"{victim}-new", int(victim[1:]), *setting)
        events.append(f"{victim}-new started on {victim}'s core")
        for thread in threads:
            thread.join(timeout=3600)
        return dict(jobs=jobs, events=events, **count_lost(cluster.client, jobs, outcomes, job_id))
    finally:
        cluster.close()


def running_job(client):
    for key in client.scan_iter("ovsd3:job:*"):
        parts = key.decode().split(":")
        if len(parts) == 3 and client.hget(key, "status") == b"running":
            return parts[2], client.hget(key, "worker").decode()
    return None


def count_lost(client, jobs: int, outcomes: dict, victim_job: str) -> dict:
    received = [seed for seed in range(jobs) if len(outcomes.get(seed, [])) == 1 and all(outcomes[seed][0])]
    job_ids = [key.decode().split(":")[2] for key in client.scan_iter("ovsd3:job:*:events")]
    ended_done_once = [job_id for job_id in job_ids if event_names(client, job_id).count("done") == 1
                       and job(client, job_id).get("status") == "done"]
    victim_events = event_names(client, victim_job)
    return dict(received_once=len(received), lost=jobs - len(received), jobs_in_redis=len(job_ids),
                done_once=len(ended_done_once), failed=outcomes.get("failed", []),
                client_retries=len(outcomes.get("retried", [])), victim_requeued="requeued" in victim_events,
                redelivered=int(client.hget("ovsd3:stats", "redelivered") or 0))


# -- the table --------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-cluster-bench"))
    parser.add_argument("--folder", type=Path, default=None, help="measure this folder instead of building one")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} (comma-separated)")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=2, help="steps of the throughput jobs")
    parser.add_argument("--serve-workers", default="1,2,4")
    parser.add_argument("--jobs", type=int, default=6, help="throughput jobs (one image each)")
    parser.add_argument("--max-batch", type=int, default=4, help="B for the batched throughput run")
    parser.add_argument("--requeue-after", default="60,15")
    parser.add_argument("--requeue-runs", type=int, default=1, help="repeats of each requeue measurement")
    parser.add_argument("--requeue-steps", type=int, default=8, help="steps of the job whose worker is killed")
    parser.add_argument("--chaos-jobs", type=int, default=6)
    parser.add_argument("--chaos-size", default="256x256")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = args.folder or build_folders(args.workdir)
    parts = args.parts.split(",")
    from ovsd3.layout import weight_bytes
    from ovsd3.report.machine import processor_name

    print(f"folder {folder} ({weight_bytes(folder) / 2**30:.2f} GiB of IR weights); {processor_name()}, "
          f"{os.cpu_count()} cores", flush=True)
    figures: dict = {"folder": str(folder), "processor": processor_name(), "cores": os.cpu_count(),
                     "size": args.size, "steps": args.steps}
    request = {"prompt": "a lighthouse on a rocky coast during a storm", "size": args.size,
               "num_inference_steps": args.steps, "guidance_scale": 0.0}
    if "workers" in parts:
        figures["workers"] = workers_memory(folder, [int(part) for part in args.serve_workers.split(",")],
                                            dict(request, num_inference_steps=1))
    if "throughput" in parts:
        batches = [1, args.max_batch] if max_batch_supported() else [None]
        if batches == [None]:
            print("ovsd3 worker has no --max-batch here: measured without it", flush=True)
        figures["throughput"] = throughput(folder, args.workdir, [1, 2], batches, args.jobs, request)
    if "requeue" in parts:
        figures["requeue"] = []
        for requeue_after in (float(part) for part in args.requeue_after.split(",")):
            for run_index in range(args.requeue_runs):
                long_job = dict(request, num_inference_steps=args.requeue_steps)
                row = requeue(folder, args.workdir, requeue_after, long_job, run_index)
                figures["requeue"].append(row)
                print(f"--requeue-after {requeue_after:g}: SIGKILL to the job's start on {row['to_worker']} "
                      f"{row['kill_to_start']:.1f} s (last heartbeat to start {row['heartbeat_to_start']:.1f} s); "
                      f"'requeued' in its events: {row['requeued_event']}", flush=True)
    if "chaos" in parts:
        figures["chaos"] = dict(size=args.chaos_size, steps=args.steps,
                                **chaos(folder, args.workdir, args.chaos_jobs, dict(request, size=args.chaos_size)))
        print(f"chaos: {json.dumps(figures['chaos'])}", flush=True)
    print_table(figures)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def print_table(figures: dict) -> None:
    print(f"\n{figures['processor']}, {figures['cores']} cores (shared: busy); {figures['folder']}\n")
    print("| measure | setting | figure |\n|---|---|---|")
    for row in figures.get("workers", []):
        ratio = row["peak"] / figures["workers"][0]["peak"]
        print(f"| `serve --workers {row['workers']}` peak RSS | 1 request per worker at once, "
              f"{figures['size']}, 1 step | {row['peak']:.2f} GiB (x{ratio:.2f}); load {row['load_s']:.0f} s |")
    rates = {}
    for row in figures.get("throughput", []):
        rates[(row["workers"], row["max_batch"])] = row["per_minute"]
        single = rates.get((1, row["max_batch"]))
        ratio = f" (x{row['per_minute'] / single:.2f} of 1 worker)" if single and row["workers"] > 1 else ""
        print(f"| images per minute | {row['workers']} worker process(es) x 1 core, --max-batch "
              f"{row['max_batch'] or '(none)'}, {row['jobs']} jobs, {figures['size']}, {figures['steps']} steps, "
              f"guidance 0 | {row['per_minute']:.2f}{ratio} |")
    by_setting: dict = {}
    for row in figures.get("requeue", []):
        by_setting.setdefault(row["requeue_after"], []).append(row)
    for setting, rows in by_setting.items():
        kill = statistics.median(row["kill_to_start"] for row in rows)
        beat = statistics.median(row["heartbeat_to_start"] for row in rows)
        print(f"| SIGKILL of a busy worker to its job's start elsewhere | --requeue-after {setting:g} "
              f"({len(rows)} run(s), median) | {kill:.1f} s ({beat:.1f} s from its last heartbeat); requeued in "
              f"its events: {all(row['requeued_event'] for row in rows)} |")
    if "chaos" in figures:
        chaos_row = figures["chaos"]
        print(f"| jobs lost in the chaos run | {chaos_row['jobs']} jobs ({chaos_row['size']}, {chaos_row['steps']} "
              f"steps), {'; '.join(chaos_row['events'])} | "
              f"{chaos_row['lost']} ({chaos_row['done_once']} of {chaos_row['jobs_in_redis']} jobs in Redis ended "
              f"done once; {chaos_row['client_retries']} client retries) |")


if __name__ == "__main__":
    sys.exit(main())
