"""Whatever the user types, nothing is lost (issue 14): no output over an input, bounds said before any work,
one-line exit-2 errors for the user's mistakes, no leftovers after a failure, clean interrupts.

Each class of the issue has its test group below; the server's share (Ctrl-C on a busy server, clients that go
away, finished jobs bounded by memory, a port in use) is at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import at_a_terminal, fingerprint, last_line, wait_for

from ovsd3.cli import EXIT_ERROR, EXIT_INTERRUPTED, main


@pytest.fixture
def source_copy(tiny_sd3, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sd3, tmp_path / "source"))


# -- 1. an output never replaces, contains or lies inside an input ------------------------------------------

OVERWRITES = [  # (argv with {model}, {source}, {tmp}; the folder that must stay intact; what the error says)
    (["convert", "{source}", "{source}", "--overwrite"], "source", "is the input"),
    (["convert", "{source}", "{source}/sub"], "source", "lies inside the input"),
    (["convert", "{source}", "{tmp}", "--overwrite"], "source", "contains the input"),
    (["convert", "{source}", "--overwrite", "{source}"], "source", "is the input"),
    (["quantize", "{model}", "{model}", "--overwrite"], "model", "is the input"),
    (["quantize", "{model}", "{model}/int8"], "model", "lies inside the input"),
    (["quantize", "{model}", "{tmp}/other", "--overwrite"], "other", "written by `ovsd3 convert`"),
    (["report", "{model}", "{model}", "--out", "{model}", "--overwrite"], "model", "is the input"),
    (["report", "{model}", "{model}", "--out", "{tmp}/mine", "--overwrite"], "mine", "was not written by ovsd3"),
    (["benchmark", "{model}", "--out", "{model}", "--overwrite"], "model", "is the input"),
    (["benchmark", "{model}", "--out", "{tmp}/other", "--overwrite"], "other", "written by `ovsd3 convert`"),
    (["serve", "{model}", "--write-ovms-config", "{model}", "--overwrite"], "model", "is the input"),
    (["run", "{model}", "--prompt", "a", "--output", "{model}"], "model", "inside the model folder"),
    (["run", "{model}", "--prompt", "a", "--output", "{model}/images"], "model", "inside the model folder"),
]


@pytest.mark.parametrize("argv, kept, needle", OVERWRITES, ids=[" ".join(case[0][:1] + case[0][3:]) for case in
                                                                 OVERWRITES])
def test_refused_overwrite_keeps_the_input_intact(model_copy, source_copy, tmp_path, capsys, argv, kept, needle):
    other = Path(shutil.copytree(model_copy, tmp_path / "other"))  # another model, made by `ovsd3 convert`
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own files")
    folders = {"model": model_copy, "source": source_copy, "other": other, "mine": mine}
    before = {name: fingerprint(folder) for name, folder in folders.items()}
    paths = {"model": model_copy, "source": source_copy, "tmp": tmp_path}
    code = main([part.format(**paths) for part in argv])
    assert code == EXIT_ERROR
    error = last_line(capsys)
    assert needle in error and "Traceback" not in error, error
    assert {name: fingerprint(folder) for name, folder in folders.items()} == before, f"{kept} changed"


def test_overwrite_replaces_an_earlier_output_of_the_same_command(model_copy, tmp_path, capsys):
    out = tmp_path / "ovms"
    assert main(["serve", str(model_copy), "--write-ovms-config", str(out)]) == 0
    (out / "config.json").write_text('{"model_config_list": [{"config": {"name": "model"}}], "stale": 1}')
    assert main(["serve", str(model_copy), "--write-ovms-config", str(out), "--overwrite"]) == 0
    assert "stale" not in (out / "config.json").read_text()
    (out / "stale.txt").write_text("not written by ovsd3: kept, and the overwrite refused (tests/test_outputs.py)")
    assert main(["serve", str(model_copy), "--write-ovms-config", str(out), "--overwrite"]) == EXIT_ERROR
    assert (out / "stale.txt").exists()


# -- 2. bounds said before any work (memory, time) -----------------------------------------------------------

def _long_line_file(tmp_path: Path) -> Path:
    path = tmp_path / "long.txt"
    path.write_text("a cat\n" + "x" * 100_000 + "\n")
    return path


BOUNDS = [
    (["run", "{model}", "--prompt", "a", "--steps", "1000000000"], "steps must be between 1 and 1000"),
    (["run", "{model}", "--prompt", "a", "--num-images", "10000"], "prompts x images at most 64"),
    (["benchmark", "{model}", "--batch", "100000", "--out", "{tmp}/b"], "batch sizes must be between 1 and 64"),
    (["benchmark", "{model}", "--repeats", "1000000", "--out", "{tmp}/b"], "--repeats must be between 1 and 100"),
    (["benchmark", "{model}", "--steps", "1000000000", "--out", "{tmp}/b"], "--steps must be between 1 and 1000"),
    (["report", "{model}", "{model}", "--prompts", "1000000000", "--out", "{tmp}/r"], "--prompts must be between 1 and 1000"),
    (["report", "{model}", "{model}", "--steps", "1000000000", "--out", "{tmp}/r"], "--steps must be between 1 and 1000"),
    (["report", "{model}", "{model}", "--prompt-file", "/dev/urandom", "--out", "{tmp}/r"], "larger than 16 MiB"),
    (["report", "{model}", "{model}", "--prompt-file", "/dev/zero", "--out", "{tmp}/r"], "larger than 16 MiB"),
    (["report", "{model}", "{model}", "--prompt-file", "{long}", "--out", "{tmp}/r"], "100000 characters long"),
    (["quantize", "{model}", "{tmp}/q", "--dataset", "/dev/zero"], "larger than 16 MiB"),
    (["quantize", "{model}", "{tmp}/q", "--dataset", "/dev/urandom"], "larger than 16 MiB"),
    (["quantize", "{model}", "{tmp}/q", "--calib", "1000000000"], "--calib must be between 1 and 1000"),
    (["quantize", "{model}", "{tmp}/q", "--gate-prompts", "1000000"], "--gate-prompts must be between 1 and"),
]


@pytest.mark.parametrize("argv, needle", BOUNDS, ids=[" ".join(case[0][:1] + case[0][2:4]) for case in BOUNDS])
def test_bounds_are_said_before_any_work(ov_sd3, tmp_path, capsys, nothing_loads, argv, needle):
    paths = {"model": ov_sd3, "tmp": tmp_path, "long": _long_line_file(tmp_path)}
    code = main([part.format(**paths) for part in argv])
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["long.txt"]  # nothing written


# -- 3 and 4. nonsense values and the user's mistakes: one line, exit 2 -----------------------------------

def image_bomb(path: Path, side: int = 30000) -> Path:
    """A valid PNG header for a side x side image with next to no data: the size is all a reader may trust."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
                     + chunk(b"IEND", b""))
    return path


MISTAKES = [
    (["run", "{model}", "--prompt", "a", "--guidance", "1e308"], "guidance must be a number from 0 to 100"),
    (["run", "{model}", "--prompt", "a", "--guidance", "-1"], "guidance must be a number from 0 to 100"),
    (["run", "{model}", "--prompt", "a", "--seed", "-1"], "seed must be between 0 and 2**64 - 1"),
    (["run", "{model}", "--prompt", "a", "--seed", str(2**64)], "seed must be between 0 and 2**64 - 1"),
    (["run", "{model}", "--prompt", "a", "--clip-skip", "1000"], "clip_skip must be at most"),
    (["run", "{model}", "--prompt", "a", "--max-sequence-length", "0"], "max_sequence_length must be at least 1"),
    (["run", "{model}", "--prompt", "a", "--max-sequence-length", "513"], "cannot be greater than 512"),
    (["run", "{model}", "--prompt", "a", "--image", "{bomb}"], "more than 64 megapixels"),
    (["run", "{model}", "--prompt", "a", "--output", "{file}/sub"], "not a writable folder"),
    (["run", "{model}", "--prompt", "a", "--output", "{file}"], "exists and is not a folder"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{file}/cache"], "cannot create the model cache"),
    (["run", "{model}", "--prompt", "a", "--width", "4096", "--height", "64"], "draws at most"),  # the model's own
    (["run", "{model}", "--prompt", "a", "--width", "100000", "--height", "64"], "up to 8192 (width got 100000)"),
    (["report", "{model}", "{model}", "--guidance", "nan", "--out", "{tmp}/r"], "--guidance must be a number from 0"),
    (["report", "{model}", "{model}", "--size", "100000", "--out", "{tmp}/r"], "draws (384)"),
    (["report", "{model}", "{model}", "--seed", "-5", "--out", "{tmp}/r"], "--seed must be between 0"),
    (["benchmark", "{model}", "--steps", "0", "--out", "{tmp}/b"], "--steps must be between 1 and 1000"),
    (["quantize", "{model}", "{tmp}/q", "--slices", "0"], "--slices must be between 1 and"),
    (["quantize", "{model}", "{tmp}/q", "--slices", "1000"], "--slices must be between 1 and"),
    (["quantize", "{model}", "{tmp}/q", "--calib-size", "100000"], "more than this model draws"),
    (["convert", "{file}", "{tmp}/c"], "not a diffusers pipeline folder"),
    (["convert", "a", "b", "c"], "convert takes MODEL and OUT, got 3 paths"),
]


@pytest.mark.parametrize("argv, needle", MISTAKES, ids=[" ".join(case[0][:1] + case[0][2:5]) for case in MISTAKES])
def test_mistakes_are_one_line_and_exit_2(ov_sd3, tmp_path, capsys, argv, needle):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    paths = {"model": ov_sd3, "tmp": tmp_path, "bomb": image_bomb(tmp_path / "bomb.png"), "file": file}
    code = main([part.format(**paths) for part in argv] + (["--no-cache"] if argv[0] == "run" and "--cache-dir"
                                                           not in argv else []))
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error and "internal error" not in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "bomb.png"]  # nothing left behind


@pytest.mark.parametrize("damage, needle", [
    (lambda model: (model / "ovsd3.json").write_text("[1, 2]"), "ovsd3.json is not a JSON object"),
    (lambda model: (model / "ovsd3.json").write_text('{"source": "x"}'), "ovsd3.json is not an ovsd3 record"),
    (lambda model: (model / "ovsd3.json").write_text("{not json"), "cannot read"),
    (lambda model: (model / "model_index.json").write_text('["StableDiffusion3Pipeline"]'), "not a JSON object"),
    (lambda model: (model / "tokenizer" / "openvino_tokenizer.xml").write_text("<garbage"), "not a whole OpenVINO IR"),
    (lambda model: (model / "transformer" / "openvino_model.bin").write_bytes(b"\0" * 10), "is truncated"),
    (lambda model: (model / "transformer" / "config.json").write_bytes(b"\xff\xfe"), "cannot read"),
], ids=["record-list", "record-fields", "record-json", "index-list", "tokenizer", "truncated-bin", "config-bytes"])
def test_a_damaged_model_folder_is_a_one_line_error(model_copy, tmp_path, capsys, damage, needle):
    damage(model_copy)
    code = main(["run", str(model_copy), "--prompt", "a", "--steps", "1", "--no-cache", "--output",
                 str(tmp_path / "out")])
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda source: _truncate(next((source / "transformer").glob("*.safetensors"))), "truncated or corrupt"),
    (lambda source: (source / "model_index.json").write_text("[]"), "not a JSON object"),
], ids=["truncated-safetensors", "index-list"])
def test_a_damaged_source_is_a_one_line_error(source_copy, tmp_path, capsys, damage, needle):
    damage(source_copy)
    code = main(["convert", str(source_copy), str(tmp_path / "out")])
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(ov_sd3, tmp_path):
    """Bytes that are not UTF-8 on the command line (Python keeps them as surrogates) and in a prompt file."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_bytes(b"a cat\nan \xff\xfe owl\n")
    commands = [[b"run", str(ov_sd3).encode(), b"--prompt", b"a \xff\xfe cat", b"--no-cache", b"--output",
                 str(tmp_path / "out").encode()],
                [b"run", str(ov_sd3).encode(), b"--prompt", b"a cat", b"--negative-prompt", b"\xc3\x28", b"--no-cache",
                 b"--output", str(tmp_path / "out").encode()],
                [b"report", str(ov_sd3).encode(), str(ov_sd3).encode(), b"--prompt-file", str(prompt_file).encode(), b"--out",
                 str(tmp_path / "report").encode()]]
    for argv in commands:
        done = subprocess.run([sys.executable.encode(), b"-m", b"ovsd3", *argv], capture_output=True)
        error = done.stderr.decode(errors="replace").strip().splitlines()
        assert done.returncode == EXIT_ERROR and len(error) == 1 and "UTF-8" in error[0], error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.txt"]


# -- 5. no leftovers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["convert", "{source}", "{link}"],
    ["quantize", "{model}", "{link}"],
    ["report", "{model}", "{model}", "--out", "{link}"],
    ["benchmark", "{model}", "--out", "{link}"],
    ["serve", "{model}", "--write-ovms-config", "{link}"],
    ["run", "{model}", "--prompt", "a", "--no-cache", "--output", "{link}"],
], ids=["convert", "quantize", "report", "benchmark", "ovms-config", "run"])
def test_a_dangling_symlink_as_output_is_refused_before_work(model_copy, source_copy, tmp_path, capsys,
                                                             nothing_loads, argv):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "at-all")
    code = main([part.format(model=model_copy, source=source_copy, link=link) for part in argv])
    assert code == EXIT_ERROR and "symbolic link" in last_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "model", "source"]


@contextmanager
def small_disk(path: Path, size: str = "512k"):
    """A tmpfs of ``size`` at ``path`` (needs mount rights: root in a container); skips where there are none."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_full_disk_leaves_no_folder_and_no_partial_file(ov_sd3, tiny_sd3, tmp_path, capsys):
    with small_disk(tmp_path / "disk") as disk:
        code = main(["convert", str(tiny_sd3), str(disk / "deep" / "ir")])  # the IR is larger than 512 kB
        assert code == EXIT_ERROR and "is full" in last_line(capsys)
        assert sorted(path.name for path in disk.iterdir()) == []  # no staging folder, no parent folders
        fill(disk, leave=2048)  # room for a preview, not for the image after it
        code = main(["run", str(ov_sd3), "--prompt", "a", "--steps", "2", "--preview-every", "1", "--width", "128",
                     "--height", "128", "--no-cache", "--output", str(disk / "a" / "b")])
        assert code == EXIT_ERROR and "No space left" in last_line(capsys)
        assert sorted(path.name for path in disk.iterdir()) == ["filler"]  # no PNG, no .tmp, no a/b


def test_a_write_refused_mid_run_leaves_nothing(ov_sd3, tmp_path):
    """A fault at write time without mount rights: a file-size limit makes the PNG write fail (EFBIG)."""
    import resource

    out = tmp_path / "a" / "b"
    done = subprocess.run([sys.executable, "-m", "ovsd3", "run", str(ov_sd3), "--prompt", "a", "--steps", "1",
                           "--width", "128", "--height", "128", "--no-cache", "--output", str(out)],
                          capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert done.returncode == EXIT_ERROR and "cannot write an image" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


# -- 8. Ctrl-C, honoured every time and quietly, also on a loaded machine --------------------------------------

@contextmanager
def cpu_hog():
    """Busy loops on every core, as a loaded CI machine has."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()




@pytest.mark.parametrize("moment", ["loading", "tracing"])
def test_ctrl_c_during_convert_under_load_exits_130_quietly(tiny_sd3, tmp_path, moment):
    out = tmp_path / "out"
    with cpu_hog():
        process = subprocess.Popen([sys.executable, "-m", "ovsd3", "convert", str(tiny_sd3), str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=at_a_terminal)
        staging = out.parent / f".out.partial-{process.pid}"
        conditions = {"loading": lambda: staging.exists(),
                      "tracing": lambda: (staging / "transformer").exists(),
                      "checking": lambda: (staging / "text_encoder_2").exists()}
        wait_for(conditions[moment], process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)  # reads to EOF: a forked child holding stderr is waited for too
    assert process.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines() == ["ovsd3 convert: interrupted; nothing was written"], err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_ctrl_c_during_quantize_under_load_exits_130_quietly(ov_sd3, tmp_path):
    out = tmp_path / "q"
    with cpu_hog():
        process = subprocess.Popen([sys.executable, "-m", "ovsd3", "quantize", str(ov_sd3), str(out), "--calib", "8",
                                    "--calib-size", "64", "--calib-cache", str(tmp_path / "calib")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=at_a_terminal)
        staging = out.parent / f".q.partial-{process.pid}"
        wait_for(lambda: (staging / "text_encoder").exists(), process)  # models being written
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1].endswith("ovsd3 quantize: interrupted; nothing was written"), err
    assert "Traceback" not in err and "Error" not in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["calib"]  # the calibration cache is kept for reuse


def test_ctrl_c_during_run_leaves_no_folder_and_no_preview(ov_sd3, tmp_path):
    out = tmp_path / "a" / "b"
    with cpu_hog():
        process = subprocess.Popen([sys.executable, "-m", "ovsd3", "run", str(ov_sd3), "--prompt", "a", "--steps",
                                    "1000", "--preview-every", "1", "--width", "384", "--height", "384",
                                    "--no-cache", "--output", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=at_a_terminal)
        wait_for(lambda: (out / "preview.png").exists(), process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1].endswith("ovsd3 run: interrupted"), err
    assert list(tmp_path.iterdir()) == []


# -- 7. the service ----------------------------------------------------------------------------------------

SLOW = {"num_inference_steps": 100, "size": "384x384", "n": 2}  # seconds of work a request on the tiny model


@contextmanager
def server_process(folder: Path):
    """``ovsd3 serve`` in a child process: (process, base URL) once /health answers."""
    import httpx

    from ovsd3.serve.launch import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ovsd3", "serve", str(folder), "--port", str(port), "--device",
                                "CPU"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=at_a_terminal)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, process, timeout=120)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _post_slow(base: str, timeout: float):
    import httpx

    try:
        return httpx.post(f"{base}/v3/images/generations", json={"prompt": "a cat", **SLOW}, timeout=timeout).status_code
    except httpx.TimeoutException:  # read, write, connect or pool: which one a loaded machine hits varies
        return "timeout"
    except httpx.HTTPError as error:
        return type(error).__name__


def test_ctrl_c_on_a_busy_server_cancels_the_queue_and_exits_cleanly(ov_sd3):
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    with cpu_hog(), server_process(ov_sd3) as (process, base), ThreadPoolExecutor(6) as clients:
        answers = [clients.submit(_post_slow, base, 300) for _ in range(6)]

        def all_six_in() -> bool:  # every request accepted: one running, the rest queued
            health = httpx.get(f"{base}/health").json()
            return health["busy"] + health["queued"] == 6 and health["queued"] >= 4

        wait_for(all_six_in, process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=600)  # a hang guard only: the checks below say what was stopped
        statuses = [answer.result() for answer in answers]
    assert process.returncode == 0, output
    assert "Traceback" not in output and "terminate called" not in output, output
    assert output.strip().endswith("ovsd3 serve: stopped"), output
    # Each waiting client is told the server is going away (the running job may just have finished: 200)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 4, statuses
    # Every 503 is a job the server says it cancelled, the running one included (stopped at its next step, not
    # run to its end, which would have answered 200): no wall-clock bound, so a loaded machine cannot fail it.
    queued, running = map(int, re.search(r"cancelled (\d+) queued and (\d+) running", output).groups())
    assert running <= 1 and queued + running == statuses.count(503), (output, statuses)


def test_work_for_clients_that_went_away_is_cancelled(ov_sd3):
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    with server_process(ov_sd3) as (process, base):
        with ThreadPoolExecutor(4) as clients:  # each gives up after a second
            gave_up = list(clients.map(lambda _: _post_slow(base, 1.0), range(4)))
        assert gave_up == ["timeout"] * 4
        wait_for(lambda: httpx.get(f"{base}/health").json() | {"status": None} ==
                 {"status": None, "model": ov_sd3.name, "workers": 1, "busy": 0, "queued": 0}, process, timeout=30)
        metrics = httpx.get(f"{base}/metrics").text
    images = [line for line in metrics.splitlines() if line.startswith("ovsd3_images_total")]
    assert images == ["ovsd3_images_total 0.0"], images  # 4 requests x 2 images: none drawn for nobody


def test_upload_abuse_gets_4xx_and_leaves_no_traceback(ov_sd3, tmp_path):
    """An image bomb (30000x30000 in a few kB) is a JSON 400; a client leaving mid-upload is dropped quietly."""
    import socket

    import httpx

    bomb = image_bomb(tmp_path / "bomb.png").read_bytes()
    with server_process(ov_sd3) as (process, base):
        answer = httpx.post(f"{base}/v3/images/edits", files={"image": ("bomb.png", bomb, "image/png")},
                            data={"prompt": "a cat"})
        assert answer.status_code == 400 and "pixels" in answer.json()["error"]["message"], answer.text
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST /v3/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                               b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\nContent-Disposition: "
                               b"form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n" + b"\x89PNG" * 1000)
        time.sleep(1.0)
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert "Traceback" not in output and "Error" not in output, output


def test_finished_jobs_are_bounded_by_memory_too(monkeypatch):
    from ovsd3.serve import jobs

    monkeypatch.setattr(jobs, "KEEP_FINISHED_BYTES", 3 * 2**20)
    pool = jobs.WorkerPool(lambda: None, workers=1, max_queue=4)
    try:
        finished = []
        for index in range(10):  # ten finished jobs of 1 MiB of images each
            job = jobs.Job(jobs.GenerationRequest(prompt=f"a cat {index}"))
            job.emit("done", seed=index, images=["x" * 2**20])
            pool.jobs[job.id] = job
            finished.append(job.id)
        pool._forget_old_jobs()
        assert list(pool.jobs) == finished[-3:]  # the newest, within 3 MiB
    finally:
        pool.close()


def test_a_taken_port_is_said_before_the_model_loads(ov_sd3, capsys, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the port was checked")

    monkeypatch.setattr("ovsd3.serve.jobs.load_pipeline", refuse)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", str(ov_sd3), "--port", str(taken.getsockname()[1])])
    captured = capsys.readouterr()
    assert code == EXIT_ERROR and "cannot listen on 127.0.0.1" in captured.err and "http://" not in captured.out


# -- 9. smaller ones -----------------------------------------------------------------------------------------

def test_convert_takes_options_between_model_and_out(tiny_sd3, tmp_path, capsys):
    """`convert SRC --overwrite OUT` reads SRC as the model and OUT as the output (here: the user's folder)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["convert", str(tiny_sd3), "--overwrite", str(out)])
    assert code == EXIT_ERROR and f"output {out} was not written by ovsd3" in last_line(capsys)
