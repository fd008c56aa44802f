"""Serving on many machines (issue 26): `ovsd3 serve --broker`, `ovsd3 worker`, `ovsd3 cluster status`, against a
real Redis (Debian's redis-server, started here on a free port) and real worker and API processes.

Every test starts from an empty Redis and stops what it started. Kills are real (SIGKILL), so are restarts.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import redis

from ovsd3.serve import launch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="redis-server and signals as on Linux")

REQUEUE_AFTER = 15  # the shortest --requeue-after: what the chaos run waits for a dead worker's job
SIZE = "64x64"
LONG = {"size": "384x384", "n": 8, "num_inference_steps": 100, "guidance_scale": 7.0}  # ~5-10 s on a tiny model


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = launch.RedisServer(tmp_path_factory.mktemp("redis"), password="s3cret pw".replace(" ", "-"))
    server.start()
    yield server
    server.stop()


class Cluster:
    """What one test started: workers and API servers, stopped at its end."""

    def __init__(self, server: launch.RedisServer):
        self.server = server
        self.processes: list[subprocess.Popen] = []
        self.client = redis.Redis.from_url(server.url)
        self.client.flushall()

    def worker(self, folder, name: str, *options: str) -> subprocess.Popen:
        process = launch.start_worker(folder, self.server.url, name, "--requeue-after", REQUEUE_AFTER, *options)
        self.processes.append(process)
        return process

    def api(self, *options: str, port: int | None = None) -> str:
        process, base = launch.start_api(self.server.url, "--requeue-after", REQUEUE_AFTER, *options, port=port)
        self.processes.append(process)
        return base

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            if process.stdout:
                process.stdout.close()


@pytest.fixture
def cluster(redis_server):
    if redis_server.process.poll() is not None:
        redis_server.start()
    made = Cluster(redis_server)
    yield made
    made.close()


def post(base: str, path: str, body: dict, key: str | None = None, timeout: float = 120.0):
    """(status, JSON answer, headers)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.load(answer), answer.headers
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused), refused.headers


def get(base: str, path: str, method: str = "GET"):
    request = urllib.request.Request(base + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


def job_events(client: redis.Redis, job_id: str) -> list[dict]:
    from ovsd3.serve.broker import events_key, read_events

    return read_events(client.xrange(events_key(job_id)))


def holder(client: redis.Redis, job_id: str) -> str | None:
    worker = client.hget(f"ovsd3:job:{job_id}", "worker")
    return worker.decode() if worker else None


def steps_done(client: redis.Redis, job_id: str) -> int:
    return sum(event["event"] == "step" for event in job_events(client, job_id))


def wait_for(condition, timeout: float):
    """Poll ``condition`` until it gives something true, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)
    return value


# -- the same pictures, routing, status ------------------------------------------------------------------

def test_a_worker_draws_what_serve_draws(cluster, ov_sd3):
    """Same request and seed: the worker's images equal `ovsd3 serve FOLDER`'s, byte for byte; with the openai
    client (its api_key sent as the bearer key, on both serve modes) and over /v1/jobs' events."""
    import openai

    cluster.worker(ov_sd3, "w1")
    base = cluster.api("--api-key", "k-broker")
    asked = dict(model=ov_sd3.name, prompt="a red square", n=2, size=SIZE, extra_body={"rng_seed": 7,
                                                                                          "num_inference_steps": 3})
    remote = openai.OpenAI(base_url=f"{base}/v3", api_key="k-broker", max_retries=0).images.generate(**asked)
    with launch.serving(ov_sd3, "--api-key", "k-embedded") as embedded:
        local = openai.OpenAI(base_url=f"{embedded}/v3", api_key="k-embedded", max_retries=0).images.generate(**asked)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{embedded}/v3", api_key="wrong", max_retries=0).images.generate(**asked)
    assert [image.b64_json for image in remote.data] == [image.b64_json for image in local.data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v3", api_key="k-embedded", max_retries=0).images.generate(**asked)
    assert get(base, "/health")[0] == 200  # open without a key: balancers probe it

    status, created, _ = post(base, "/v1/jobs", {"prompt": "a red square", "size": SIZE, "rng_seed": 7,
                                                 "num_inference_steps": 3, "n": 2}, key="k-broker")
    assert status == 202
    request = urllib.request.Request(f"{base}/v1/jobs/{created['id']}/events",
                                     headers={"Authorization": "Bearer k-broker"})
    with urllib.request.urlopen(request, timeout=120) as stream:
        names = [line.split(": ", 1)[1].strip() for line in stream.read().decode().splitlines()
                 if line.startswith("event: ")]
    assert names == ["queued", "started", "step", "step", "step", "done"]
    request = urllib.request.Request(f"{base}/v1/jobs/{created['id']}", headers={"Authorization": "Bearer k-broker"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        finished = json.load(answer)
    assert finished["status"] == "done" and finished["events"] == 6
    assert [item["b64_json"] for item in finished["data"]] == [image.b64_json for image in local.data]
    logs = launch.stop(cluster.processes[1]) + launch.stop(cluster.processes[0])
    assert "red square" not in logs and "k-broker" not in logs  # prompts and keys are not logged unless asked


def test_requests_go_to_the_workers_of_their_model(cluster, ov_sd3, ov_sd35, tmp_path):
    cluster.worker(ov_sd3, "medium", "--model", "sd3")
    cluster.worker(ov_sd35, "large", "--model", "sd35")
    base = cluster.api()
    started = time.monotonic()
    status, answer, _ = post(base, "/v3/images/generations", {"model": "nope", "prompt": "a cat", "size": SIZE})
    assert status == 404 and "nope" in answer["error"]["message"] and "sd3" in answer["error"]["message"]
    assert time.monotonic() - started < 5  # at once, not after a queue timeout
    status, answer, _ = post(base, "/v3/images/generations", {"prompt": "a cat", "size": SIZE})
    assert status == 400 and answer["error"]["message"].startswith("model: required")
    for model, worker in (("sd3", "medium"), ("sd35", "large")):
        status, created, _ = post(base, "/v1/jobs", {"model": model, "prompt": "a cat", "size": SIZE,
                                                     "num_inference_steps": 2})
        assert status == 202
        wait_for(lambda: cluster.client.hget(f"ovsd3:job:{created['id']}", "status") == b"done", 120)
        assert holder(cluster.client, created["id"]) == worker
    for other_key in (f"{created['id']}:events", "*", "x" * 500):  # an id names a job, never another key
        assert get(base, f"/v1/jobs/{urllib.parse.quote(other_key, safe='')}")[0] == 404
    shown = subprocess.run([sys.executable, "-m", "ovsd3.cli", "cluster", "status", "--broker",
                            cluster.server.url, "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert {(worker["name"], worker["model"], worker["device"]) for worker in status["workers"]} == \
        {("medium", "sd3", "AUTO"), ("large", "sd35", "AUTO")}
    assert all(worker["alive"] and worker["seconds_since_heartbeat"] < REQUEUE_AFTER for worker in status["workers"])
    assert status["queues"] == {"sd3": 0, "sd35": 0}
    table = subprocess.run([sys.executable, "-m", "ovsd3.cli", "cluster", "status", "--broker", cluster.server.url],
                           capture_output=True, text=True, timeout=60).stdout
    assert "medium" in table and "sd35" in table and "s3cret" not in table
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=60).read().decode()
    assert 'ovsd3_workers_alive{model="sd3"} 1.0' in metrics and 'ovsd3_queue_length{model="sd35"} 0.0' in metrics


# -- cancel, time limits, backpressure -------------------------------------------------------------------

def test_cancel_stops_a_running_job_within_a_step(cluster, ov_sd3):
    cluster.worker(ov_sd3, "w1")
    base = cluster.api()
    status, created, _ = post(base, "/v1/jobs", {"prompt": "a cat", "preview_every": 0, **LONG})
    job_id = created["id"]
    wait_for(lambda: steps_done(cluster.client, job_id) >= 2, 120)
    assert get(base, f"/v1/jobs/{job_id}", "DELETE") == (200, {"id": job_id, "status": "cancelled"})
    at_cancel = steps_done(cluster.client, job_id)
    wait_for(lambda: get(base, f"/v1/jobs/{job_id}")[1]["status"] == "cancelled", 60)
    assert steps_done(cluster.client, job_id) <= at_cancel + 1

    # a client that leaves /v3/images/generations cancels its job on whichever worker holds it
    before = set(cluster.client.scan_iter("ovsd3:job:*:events"))
    with pytest.raises(OSError):  # the client's read timeout: it hangs up
        post(base, "/v3/images/generations", {"prompt": "left", **LONG}, timeout=3)
    left = [key.decode().split(":")[2] for key in set(cluster.client.scan_iter("ovsd3:job:*:events")) - before]
    assert len(left) == 1
    wait_for(lambda: cluster.client.hget(f"ovsd3:job:{left[0]}", "status") == b"cancelled", 60)
    status, answer, _ = post(base, "/v3/images/generations", {"prompt": "next", "size": SIZE, "num_inference_steps": 2})
    assert status == 200 and len(answer["data"]) == 1  # the worker is free again
    assert int(cluster.client.hget("ovsd3:stats", "cancelled")) == 2  # the DELETE and the client that left


def test_a_live_workers_long_job_is_not_handed_on(cluster, ov_sd3):
    """Jobs running longer than the visibility timeout stay with their worker: its heartbeats keep their
    messages young (without them kombu would hand each to a second worker)."""
    from ovsd3.serve import broker
    from ovsd3.serve.broker import BrokerSettings

    cluster.worker(ov_sd3, "w1", "--requeue-after", 6, "--concurrency", 2)
    cluster.worker(ov_sd3, "w2", "--requeue-after", 6)  # idle: it would take a job handed on
    base = cluster.api()
    created = [post(base, "/v1/jobs", {"prompt": f"long {seed}", "preview_every": 0, "rng_seed": seed, **LONG})[1]
               for seed in range(2)]
    # a second message for a running job (a re-sent task, a late redelivery) is dropped by whoever gets it
    wait_for(lambda: cluster.client.hget(f"ovsd3:job:{created[0]['id']}", "status") == b"running", 120)
    celery = broker.celery_app(broker.BrokerSettings(cluster.server.url))
    celery.send_task(broker.TASK, args=[created[0]["id"]], task_id=created[0]["id"], queue="ovsd3.ov-sd3")
    for job in created:
        wait_for(lambda: cluster.client.hget(f"ovsd3:job:{job['id']}", "status") == b"done", 300)
        record = cluster.client.hgetall(f"ovsd3:job:{job['id']}")
        assert float(record[b"finished"]) - float(record[b"started"]) > BrokerSettings("redis://", 6).visibility_timeout
        assert "requeued" not in [event["event"] for event in job_events(cluster.client, job["id"])]
        assert record[b"attempt"] == b"1"
    assert cluster.client.hget("ovsd3:stats", "redelivered") is None


def test_waiting_jobs_of_one_kind_are_drawn_in_one_batch(cluster, ov_sd3):
    """--max-batch: jobs that waited together are drawn in one call, each with its own seed and prompt, each
    the picture it gets alone; a job of another size waits for its own call."""
    import numpy as np
    from PIL import Image

    cluster.worker(ov_sd3, "w1", "--max-batch", 4)
    base = cluster.api()
    post(base, "/v1/jobs", {"prompt": "busy", "preview_every": 0, **LONG})  # holds the one pipeline
    bodies = [{"prompt": f"a cat number {seed}", "size": SIZE, "rng_seed": seed, "num_inference_steps": 4,
               "n": 1 + seed % 2} for seed in range(3)] + [{"prompt": "other size", "size": "128x128",
                                                            "num_inference_steps": 4}]
    ids = [post(base, "/v1/jobs", body)[1]["id"] for body in bodies]
    for job_id in ids:
        wait_for(lambda: cluster.client.hget(f"ovsd3:job:{job_id}", "status") == b"done", 300)
    streams = {job_id: cluster.client.xrange(f"ovsd3:job:{job_id}:events") for job_id in ids}

    def when(job_id: str, name: str) -> list[str]:
        return [entry_id.decode() for entry_id, fields in streams[job_id] if fields[b"event"] == name.encode()]

    first_step = min(min(when(job_id, "step"), key=stream_time) for job_id in ids[:3])
    assert all(stream_time(when(job_id, "started")[0]) <= stream_time(first_step) for job_id in ids[:3])
    assert stream_time(when(ids[3], "started")[0]) > stream_time(max(when(ids[0], "step"), key=stream_time))
    for job_id, body in zip(ids[:3], bodies):
        batched = get(base, f"/v1/jobs/{job_id}")[1]["data"]
        alone = post(base, "/v3/images/generations", body)[1]["data"]
        assert len(batched) == len(alone) == body["n"]
        for one, other in zip(batched, alone):
            pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.int16)
                      for item in (one, other)]
            assert np.abs(pixels[0] - pixels[1]).max() <= 2  # a larger batch may round a level differently


def stream_time(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


def test_job_timeout_ends_a_job_with_an_error(cluster, ov_sd3):
    cluster.worker(ov_sd3, "w1")
    base = cluster.api("--job-timeout", "1", "--log-requests")
    status, answer, _ = post(base, "/v3/images/generations", {"prompt": "a slow cat", **LONG})
    assert status == 500 and "time limit of 1 s" in answer["error"]["message"]
    assert answer["error"]["type"] == "server_error"
    assert "prompt='a slow cat'" in launch.stop(cluster.processes[1])  # --log-requests: asked for


def test_max_queue_holds_across_api_servers(cluster, ov_sd3):
    cluster.worker(ov_sd3, "w1")
    first, second = cluster.api("--max-queue", "2"), cluster.api("--max-queue", "2")
    status, running, _ = post(first, "/v1/jobs", {"prompt": "busy", "preview_every": 0, **LONG})
    wait_for(lambda: cluster.client.hget(f"ovsd3:job:{running['id']}", "status") == b"running", 120)
    assert post(first, "/v1/jobs", {"prompt": "a", "size": SIZE})[0] == 202
    assert post(second, "/v1/jobs", {"prompt": "b", "size": SIZE})[0] == 202
    for base in (first, second):
        status, answer, headers = post(base, "/v1/jobs", {"prompt": "c", "size": SIZE})
        assert status == 429 and int(headers["Retry-After"]) > 0 and answer["error"]["type"] == "rate_limit_error"
    get(first, f"/v1/jobs/{running['id']}", "DELETE")


# -- faults ---------------------------------------------------------------------------------------------

def test_unreachable_broker_and_damaged_folder_are_one_line_errors(ov_sd3, model_copy, tmp_path):
    dead = f"redis://127.0.0.1:{launch.free_port()}/0"
    for arguments in (("serve", "--broker", dead), ("worker", ov_sd3, "--broker", dead),
                      ("cluster", "status", "--broker", dead), ("serve", "--broker", "http://x")):
        done = subprocess.run([sys.executable, "-m", "ovsd3.cli", *map(str, arguments)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "broker" in done.stderr
    (model_copy / "transformer" / "openvino_model.xml").write_text("<net>")
    server = launch.RedisServer(tmp_path / "redis").start()
    try:
        done = subprocess.run([sys.executable, "-m", "ovsd3.cli", "worker", model_copy, "--broker", server.url],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "transformer" in done.stderr


def test_a_job_recorded_without_its_task_is_sent_by_an_api_server(cluster, ov_sd3):
    """An API server that stopped (or lost the broker) between recording a job and sending its task: another
    API server sends it, and the job ends done."""
    from ovsd3.serve import broker
    from ovsd3.serve.jobs import GenerationRequest

    cluster.worker(ov_sd3, "w1")
    cluster.api()
    job_id = broker.new_job_id()
    record = {"request": GenerationRequest(prompt="orphan", width=64, height=64, num_inference_steps=2).to_record(),
              "timeout": None}
    submit = cluster.client.register_script(broker.SUBMIT)
    assert submit(keys=broker.job_keys(job_id, "ov-sd3"), args=[job_id, "ov-sd3", json.dumps(record),
                                                               time.time(), 16]) == 1
    wait_for(lambda: cluster.client.hget(f"ovsd3:job:{job_id}", "status") == b"done", 120)


def test_broker_gone_gives_503_then_recovers(cluster, ov_sd3):
    cluster.worker(ov_sd3, "w1")
    base = cluster.api()
    cluster.server.kill()
    status, answer, headers = post(base, "/v3/images/generations", {"prompt": "a cat", "size": SIZE}, timeout=60)
    assert status == 503 and "broker" in answer["error"]["message"] and int(headers["Retry-After"]) > 0
    assert get(base, "/health")[0] == 503
    cluster.server.start()
    wait_for(lambda: get(base, "/health")[0] == 200, 60)
    status, answer, _ = post(base, "/v3/images/generations", {"prompt": "a cat", "size": SIZE,
                                                              "num_inference_steps": 2})
    assert status == 200 and len(answer["data"]) == 1


def certificates(folder) -> tuple:
    """A CA and a server certificate for 127.0.0.1 it signed (openssl), as a TLS Redis needs."""
    def openssl(*arguments):
        subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=120)

    ca_key, ca, key, request, certificate = (folder / name for name in ("ca.key", "ca.crt", "redis.key",
                                                                        "redis.csr", "redis.crt"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=ovsd3 test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1")
    extensions = folder / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", certificate,
            "-days", "2", "-extfile", extensions)
    return certificate, key, ca


def test_a_tls_broker_with_a_password(ov_sd3, tmp_path):
    """rediss:// with a password: workers, API servers and `cluster status` speak TLS to Redis."""
    server = launch.RedisServer(tmp_path / "redis", password="tls-pw", tls=certificates(tmp_path)).start()
    processes = []
    try:
        processes.append(launch.start_worker(ov_sd3, server.url, "tls-worker"))
        api, base = launch.start_api(server.url)
        processes.append(api)
        status, answer, _ = post(base, "/v3/images/generations", {"prompt": "a cat", "size": SIZE,
                                                                  "num_inference_steps": 2})
        assert status == 200 and len(answer["data"]) == 1
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        refused = subprocess.run([sys.executable, "-m", "ovsd3.cli", "cluster", "status", "--broker", plain],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "tls-pw" not in refused.stderr and ":***@" in refused.stderr
    finally:
        for process in processes:
            launch.stop(process)
        server.stop()


# -- nothing lost ---------------------------------------------------------------------------------------

def test_chaos_loses_nothing(cluster, ov_sd3):
    """50 jobs, two API servers, three workers; a busy worker SIGKILLed mid-job, an API server restarted and
    Redis killed and restarted: every job ends done once, every client gets its images once, the dead worker's
    job is handed on within --requeue-after of its last heartbeat and its stream says requeued."""
    workers = {name: cluster.worker(ov_sd3, name) for name in ("w1", "w2", "w3")}
    ports = [launch.free_port(), launch.free_port()]
    bases = [cluster.api("--max-queue", 64, port=ports[0]), cluster.api("--max-queue", 64, port=ports[1])]
    outcomes: dict[int, list] = {}
    threads = launch.send_with_openai(bases, 50, {"size": "192x192", "n": 2, "num_inference_steps": 12}, outcomes,
                                      model="ov-sd3", attempts=30)

    running = wait_for(lambda: running_jobs(cluster.client), 120)
    victim_job, victim = running[0]
    wait_for(lambda: steps_done(cluster.client, victim_job) >= 1, 60)
    last_heartbeat = cluster.client.zscore("ovsd3:workers", victim)
    workers[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()

    api = cluster.processes[3]  # the first API server: restarted (SIGTERM: it drains, then a new one)
    launch.stop(api)
    cluster.processes.append(launch.start_api(cluster.server.url, "--requeue-after", REQUEUE_AFTER,
                                              "--max-queue", 64, port=ports[0])[0])
    cluster.server.kill()
    time.sleep(2)
    cluster.server.start()

    for thread in threads:
        thread.join(timeout=600)
    print("retried:", *outcomes.pop("retried", []), sep="\n  ")  # shown when the test fails
    assert "failed" not in outcomes, outcomes["failed"]
    assert sorted(outcomes) == list(range(50)) and all(len(received) == 1 for received in outcomes.values())
    assert all(len(received[0]) == 2 for received in outcomes.values())
    jobs = [key.decode().split(":")[2] for key in cluster.client.scan_iter("ovsd3:job:*:events")]
    for job_id in jobs:
        wait_for(lambda: cluster.client.hget(f"ovsd3:job:{job_id}", "status") == b"done", 300)
        names = [event["event"] for event in job_events(cluster.client, job_id)]
        assert names.count("done") == 1 and names[-1] == "done"
    requeued = [event for event in job_events(cluster.client, victim_job) if event["event"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["from_worker"] == victim
    handed_on = float(cluster.client.hget(f"ovsd3:job:{victim_job}", "started"))
    # within --requeue-after, give or take Redis's 2 s away and the workers' reconnecting after it
    assert handed_on - last_heartbeat <= REQUEUE_AFTER + 10
    assert handed_on > killed_at
    assert int(cluster.client.hget("ovsd3:stats", "redelivered")) >= 1


def running_jobs(client: redis.Redis) -> list[tuple[str, str]]:
    found = []
    for key in client.scan_iter("ovsd3:job:*"):
        parts = key.decode().split(":")
        if len(parts) == 3 and client.hget(key, "status") == b"running":
            found.append((parts[2], client.hget(key, "worker").decode()))
    return found
