"""Start `ovsd3 serve` in a child process on a free loopback port (tests and benchmarks drive it over HTTP)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(folder: Path, *options: str, start_timeout: float = 120.0) -> Iterator[str]:
    """Yield the base URL once /health answers; stop the server on the way out."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ovsd3.cli", "serve", str(folder), "--port", str(port),
                                *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process, start_timeout)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(base: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once ``base``/health answers 200; RuntimeError if ``process`` (its stdout piped) exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ovsd3 serve exited: {process.stdout.read().strip()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"ovsd3 serve did not answer within {timeout:.0f} s")
        time.sleep(0.2)


class RedisServer:
    """Debian's redis-server on a free loopback port, append-only with an fsync per write (what
    deploy/redis.conf asks for), in ``folder``; ``kill()`` and ``start()`` again keep what it held."""

    def __init__(self, folder: Path, password: str | None = None, tls: tuple[Path, Path, Path] | None = None):
        """``tls``: (certificate, key, CA certificate): TLS only, as rediss://."""
        self.folder, self.password, self.tls, self.port = Path(folder), password, tls, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{secret}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls[2]}"
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            certificate, key, authority = self.tls
            command[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(certificate),
                            "--tls-key-file", str(key), "--tls-ca-cert-file", str(authority),
                            "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        import redis

        try:
            return redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: what survives is what the append-only file holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def ovsd3_process(*arguments: str, **options) -> subprocess.Popen:
    """``ovsd3 ARGUMENTS`` in a child process, its output piped (text)."""
    return subprocess.Popen([sys.executable, "-m", "ovsd3.cli", *map(str, arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **options)


def start_worker(folder: Path, broker_url: str, name: str, *options: str, timeout: float = 180.0) -> subprocess.Popen:
    """``ovsd3 worker FOLDER``, returned once its first heartbeat is in the broker."""
    import redis

    process = ovsd3_process("worker", folder, "--broker", broker_url, "--name", name, *options)
    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    while client.zscore("ovsd3:workers", name) is None:
        if process.poll() is not None:
            raise RuntimeError(f"ovsd3 worker exited: {process.stdout.read().strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"ovsd3 worker {name} did not announce itself within {timeout:.0f} s")
        time.sleep(0.2)
    return process


def start_api(broker_url: str, *options: str, port: int | None = None, timeout: float = 60.0):
    """``ovsd3 serve --broker URL`` on ``port`` (a free one if None): (process, base URL) once /health answers
    (200: it needs a worker alive)."""
    port = port or free_port()
    process = ovsd3_process("serve", "--broker", broker_url, "--port", port, *options)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, process, timeout)
    return process, base


def stop(process: subprocess.Popen, timeout: float = 90.0) -> str:
    """SIGTERM, then the output it wrote."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


def send_with_openai(bases: list[str], count: int, request: dict, outcomes: dict, model: str,
                     attempts: int = 60) -> list:
    """``count`` clients in threads, each one ``images.generate`` with the openai client (seed = its number, the
    prompt "job SEED"; ``request``: size, n and extra body fields); on a broken connection or a 5xx it asks the
    next API server, as a balancer would. ``outcomes[seed]``: the image lists each client received;
    ``outcomes["retried"]``, ``outcomes["failed"]``: what went wrong on the way (one line each)."""
    import threading

    import openai

    extra = {key: value for key, value in request.items() if key not in ("prompt", "size", "n")}

    def one(seed: int) -> None:
        for attempt in range(attempts):
            client = openai.OpenAI(base_url=f"{bases[(seed + attempt) % len(bases)]}/v3", api_key="unused",
                                   max_retries=0, timeout=3600)
            try:
                answer = client.images.generate(model=model, prompt=f"job {seed}", size=request["size"],
                                                n=request.get("n", 1), extra_body=dict(extra, rng_seed=seed))
            except (openai.APIConnectionError, openai.InternalServerError) as error:  # 503s included
                outcomes.setdefault("retried", []).append(f"{seed}: {type(error).__name__}: {error}"[:200])
                time.sleep(1)
                continue
            except Exception as error:  # a client error: the job is lost for this client
                outcomes.setdefault("failed", []).append(f"{seed}: {type(error).__name__}: {error}"[:300])
                return
            outcomes.setdefault(seed, []).append([image.b64_json for image in answer.data])
            return

    threads = [threading.Thread(target=one, args=(seed,), daemon=True) for seed in range(count)]
    for thread in threads:
        thread.start()
    return threads
