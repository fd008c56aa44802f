"""Memory and load time of `ovsd3 serve --workers N`: one compiled model per component, shared by the workers.

    PYTHONPATH=$PWD python benchmarks/serve_workers.py [--workdir /tmp/ovsd3-serve-workers] [--workers 1,2,4]

Builds once (random weights, values do not change memory) a folder where the weights dominate: SD3 Medium's
transformer width (1536, 24 heads, joint width 4096) with 4 blocks instead of 24, small CLIPs with SD3's
pooled width, a small VAE, no T5; converts it with `ovsd3 convert`. Then, for each worker count, starts
`ovsd3 serve FOLDER --workers N` in a child process with an empty model cache (so every run compiles), waits
for /health (the load time), sends one request per worker at once (every worker draws: its activations
count), and reads the child's peak RSS (VmHWM) and what is resident after the draw. Also compares the
pictures: the workers of one server draw the same bits; servers with other worker counts run each call on
other threads per call (cores / streams), which can round a pixel one level differently.

To measure code from another checkout (before and after), run this file with PYTHONPATH set to that
checkout: the child is `python -m ovsd3.cli serve` from the PYTHONPATH, started in the work folder.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

BLOCKS = 4
REQUEST = {"prompt": "a lighthouse on a rocky coast during a storm", "num_inference_steps": 2,
           "size": "256x256", "seed": 7}


def build_folder(workdir: Path) -> Path:
    """The converted folder (built and converted on the first run only)."""
    import torch

    from ovsd3.presets import ClipArch, VaeArch, get_preset
    from ovsd3.synthetic import save_random_pipeline

    medium = get_preset("sd3-medium")
    small_clip = dict(intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, vocab_size=1000)
    arch = replace(medium, name=f"sd3-medium-{BLOCKS}-blocks",
                   transformer=replace(medium.transformer, num_layers=BLOCKS),
                   clip_l=ClipArch(hidden_size=64, projection_dim=768, **small_clip),
                   clip_g=ClipArch(hidden_size=64, projection_dim=1280, hidden_act="gelu", **small_clip),
                   vae=VaeArch(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8))
    source, folder = workdir / f"{arch.name}-random-fp16", workdir / f"{arch.name}-ov"
    if not (folder / "model_index.json").exists():
        if not (source / "model_index.json").exists():
            save_random_pipeline(arch, source, with_t5=False, dtype=torch.float16,
                                 log=lambda line: print(f"  {line}", flush=True))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ovsd3", "convert", str(source), str(folder), "--no-t5"], check=True)
        print(f"converted in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_of(pid: int) -> dict[str, float]:
    """The child's peak and current RSS and its current anonymous and file-backed parts, in GiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 2**20
    return fields


def post(base: str, body: dict) -> str:
    import json

    call = urllib.request.Request(f"{base}/v3/images/generations", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=600) as answer:
        return json.loads(answer.read())["data"][0]["b64_json"]


def child_ovsd3(workdir: Path) -> str:
    """Where the child processes import ovsd3 from: PYTHONPATH decides (they run in ``workdir``, not here,
    since ``python -m`` puts its working directory first on the path)."""
    done = subprocess.run([sys.executable, "-c", "import ovsd3; print(ovsd3.__file__)"], cwd=workdir,
                          capture_output=True, text=True, check=True)
    return str(Path(done.stdout.strip()).parent)


def measure(folder: Path, workers: int, device: str) -> dict:
    """Start the server, time its load, draw one picture per worker at once, read its memory, stop it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache_home:  # an empty OpenVINO model cache: every run compiles
        env = dict(os.environ, XDG_CACHE_HOME=cache_home)
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "ovsd3.cli", "serve", str(folder), "--port", str(port),
                                    "--device", device, "--workers", str(workers)], env=env, cwd=folder.parent,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_health(base, process)
            loaded = time.perf_counter() - started
            at_load = memory_of(process.pid)
            with ThreadPoolExecutor(max_workers=workers) as clients:
                drawn = list(clients.map(lambda _: post(base, REQUEST), range(workers)))
            after = memory_of(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return dict(workers=workers, load_s=loaded, rss_at_load=at_load["VmRSS"], peak=after["VmHWM"],
                anon=after["RssAnon"], file=after["RssFile"], pictures=[pixels(image) for image in drawn])


def pixels(b64_png: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png)))).astype(int)


def wait_for_health(base: str, process: subprocess.Popen, timeout: float = 900.0) -> None:
    from ovsd3.serve.launch import wait_until_healthy

    try:
        wait_until_healthy(base, process, timeout)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-serve-workers"))
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = build_folder(args.workdir)
    from ovsd3.layout import weight_bytes
    from ovsd3.report.machine import processor_name

    print(f"folder {folder} ({weight_bytes(folder) / 2**30:.2f} GiB of IR weights); ovsd3 from "
          f"{child_ovsd3(folder.parent)}; {processor_name()}, {os.cpu_count()} cores; one {REQUEST['size']} "
          f"{REQUEST['num_inference_steps']}-step request per worker at once", flush=True)
    rows = []
    for workers in (int(part) for part in args.workers.split(",")):
        row = measure(folder, workers, args.device)
        rows.append(row)
        print(f"--workers {workers}: load {row['load_s']:5.1f} s, RSS at load {row['rss_at_load']:.2f} GiB, "
              f"peak RSS {row['peak']:.2f} GiB (after drawing: anon {row['anon']:.2f}, file {row['file']:.2f})",
              flush=True)
    first = rows[0]
    reference = first["pictures"][0]
    for row in rows:
        within = all((picture == row["pictures"][0]).all() for picture in row["pictures"])
        levels = max(int(abs(picture - reference).max()) for picture in row["pictures"])
        equal = min(float((picture == reference).mean()) for picture in row["pictures"])
        print(f"--workers {row['workers']} / --workers {first['workers']}: "
              f"peak RSS x{row['peak'] / first['peak']:.2f}, load time x{row['load_s'] / first['load_s']:.2f}; "
              f"its workers drew {'the same' if within else 'DIFFERENT'} pictures, at most {levels} level(s) "
              f"from --workers {first['workers']}'s ({equal:.2%} of the values equal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
