"""Load on `ovsd3 serve`: N generation calls from C concurrent clients; prints throughput and latency.

    python benchmarks/serve_load.py FOLDER --requests 50 --clients 8 --workers 1 --steps 28 --size 64

Starts the server in a child process on loopback, waits for /health, fires the calls, and checks every one
came back with its picture (429s are counted, not retried).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ovsd3.serve.launch import serving


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="default: the folder's")
    parser.add_argument("--size", type=int, default=None, help="default: the model's")
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()

    body = {"prompt": "a red digit 7 on a black background"}
    if args.steps:
        body["num_inference_steps"] = args.steps
    if args.size:
        body["size"] = f"{args.size}x{args.size}"
    with serving(args.folder, "--device", args.device, "--workers", str(args.workers),
                 "--max-queue", str(args.max_queue)) as base:
        def call(index: int) -> tuple[int, int, float]:
            started = time.perf_counter()
            answer = httpx.post(f"{base}/v3/images/generations", json=dict(body, seed=index), timeout=600)
            images = len(answer.json().get("data", [])) if answer.status_code == 200 else 0
            return answer.status_code, images, time.perf_counter() - started

        httpx.post(f"{base}/v3/images/generations", json=dict(body, seed=0), timeout=600)  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as clients:
            results = list(clients.map(call, range(args.requests)))
        wall = time.perf_counter() - started
        metrics = httpx.get(f"{base}/metrics").text

    latencies = sorted(seconds for status, _, seconds in results if status == 200)
    answered = sum(1 for status, images, _ in results if status == 200 and images == 1)
    refused = sum(1 for status, _, _ in results if status == 429)
    steps = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("ovsd3_step_seconds_")}
    print(f"{args.requests} calls from {args.clients} clients, {args.workers} worker(s): {answered} answered with "
          f"a picture, {refused} refused (429), {args.requests - answered - refused} other")
    print(f"wall {wall:.1f} s, {answered / wall:.2f} images/s")
    if latencies:
        p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
        print(f"latency median {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")
    count = steps.get("ovsd3_step_seconds_count", 0)
    if count:
        mean_ms = steps["ovsd3_step_seconds_sum"] / count * 1000
        print(f"sampling step (server side) mean {mean_ms:.1f} ms over the last {count:.0f} steps")
    return 0 if answered + refused == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
