"""Nothing lost (issue 25, sections 2 and 4): caches are outputs too, `--overwrite` replaces only a folder that
holds nothing but what the command writes, killed runs leave nothing that the next run does not clear, and
Ctrl-C / SIGTERM are honoured from the first instruction (one line, exit 130 / 143, children ended)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ovsd3.atomic import AtomicOutput, scratch_folder
from helpers import at_a_terminal, fingerprint, last_line, wait_for

from ovsd3.cli import EXIT_ERROR, EXIT_INTERRUPTED, main
from ovsd3.errors import OvsdError
from ovsd3.layout import OUTPUT_FILES, made_by, unexpected_file

EXIT_TERMINATED = 128 + signal.SIGTERM
LINUX = sys.platform.startswith("linux")


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- caches are outputs ------------------------------------------------------------------------------------

CACHES = [  # argv with {model} and {tmp}; what the error says
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{model}"], "--calib-cache", "is the input"),
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{model}/transformer"], "--calib-cache", "lies inside the input"),
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{tmp}/q/cache"], "--calib-cache", "lies inside the output"),
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{tmp}/q"], "--calib-cache", "is the output"),
    (["quantize", "{model}", "{tmp}/a/q", "--calib-cache", "{tmp}/a"], "--calib-cache", "contains the output"),
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{tmp}/c", "--dataset", "{tmp}/c/prompts.txt"],
     "--calib-cache", "contains the input"),
    (["quantize", "{model}", "{tmp}/mine/q", "--calib-cache", "{tmp}/mine"], "", "lies inside the input"),
    (["quantize", "{model}", "{tmp}/q", "--calib-cache", "{tmp}/mine"], "--calib-cache", "holds notes.txt"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{model}", "--output", "{tmp}/o"], "--cache-dir",
     "is the input"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{model}/blobs", "--output", "{tmp}/o"], "--cache-dir",
     "lies inside the input"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{tmp}", "--output", "{tmp}/o"], "--cache-dir",
     "contains the input"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{tmp}/o/cache", "--output", "{tmp}/o"], "--cache-dir",
     "lies inside the output"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{tmp}/o", "--output", "{tmp}/o"], "--cache-dir",
     "is the output"),
    (["run", "{model}", "--prompt", "a", "--cache-dir", "{tmp}/img.png", "--image", "{tmp}/img.png", "--output",
      "{tmp}/o"], "--cache-dir", "exists and is not a folder"),
]


@pytest.mark.parametrize("argv, option, needle", CACHES, ids=[" ".join(case[0][:1] + case[0][3:5]) for case in CACHES])
def test_a_cache_on_an_input_or_an_output_is_refused_before_work(model_copy, tmp_path, capsys, nothing_loads,
                                                                   argv, option, needle):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own files")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "prompts.txt").write_text("a cat\n")
    (tmp_path / "img.png").write_bytes(b"not read")
    before = fingerprint(tmp_path)
    code = main([part.format(model=model_copy, tmp=tmp_path) for part in argv])
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error and option in error, error
    assert fingerprint(tmp_path) == before  # nothing written, nothing created, the model untouched


def test_the_model_cache_is_written_only_where_named(model_copy, tmp_path):
    cache = tmp_path / "blobs"
    code = main(["run", str(model_copy), "--prompt", "a", "--steps", "1", "--width", "64", "--height", "64",
                 "--device", "CPU", "--cache-dir", str(cache), "--output", str(tmp_path / "o")])
    assert code == 0 and any(cache.iterdir())
    assert made_by(model_copy) == "convert" and unexpected_file(model_copy, OUTPUT_FILES["convert"]) is None


# -- --overwrite replaces only what the command itself wrote ------------------------------------------------

FOLDER_COMMANDS = ("convert", "quantize", "report", "benchmark", "ovms-config")


def _marker(command: str) -> dict[str, str]:
    """The smallest folder content that `made_by` takes for ``command``'s output."""
    return {"convert": {"ovsd3.json": "{}"}, "quantize": {"ovsd3.json": '{"quantization": {"gate": {}}}'},
            "report": {"report.json": "{}"}, "benchmark": {"benchmark.json": "{}"},
            "ovms-config": {"config.json": json.dumps({"model_config_list": [{"config": {"name": "m"}}]})}}[command]


def _example_of(pattern: str, draw_name) -> str:
    return "/".join(draw_name() if part == "*" else part.replace("*", "x") for part in pattern.split("/"))


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-. ", min_size=1, max_size=12).filter(
    lambda name: name not in (".", ".."))


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(FOLDER_COMMANDS), data=st.data(), depth=st.integers(0, 2))
def test_a_folder_holding_anything_else_is_never_replaced(tmp_path_factory, command, data, depth):
    folder = tmp_path_factory.mktemp("out")
    for name, text in _marker(command).items():
        (folder / name).write_text(text)
    patterns = OUTPUT_FILES[command]
    stray = Path(*[data.draw(NAMES) for _ in range(depth)], data.draw(NAMES))
    # a name the command does write is no stray
    assume(not any(re.fullmatch(re.escape(p).replace(r"\*", "[^/]*"), stray.as_posix()) for p in patterns))
    try:
        (folder / stray).parent.mkdir(parents=True, exist_ok=True)
        (folder / stray).write_text("the user's thesis")
    except OSError:  # a name taken by the marker file
        assume(False)
    before = fingerprint(folder)
    with pytest.raises(OvsdError, match=r"holds .*which `ovsd3 [^`]*` does not write.*nothing was replaced"):
        with AtomicOutput(folder, command=command, overwrite=True) as staging:
            (staging / "new").write_text("")
    assert fingerprint(folder) == before
    assert list(folder.parent.glob(f".{folder.name}.*")) == []


@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(FOLDER_COMMANDS), data=st.data())
def test_an_earlier_output_of_the_same_command_is_replaced_whole(tmp_path_factory, command, data):
    folder = tmp_path_factory.mktemp("out")
    for name, text in _marker(command).items():
        (folder / name).write_text(text)
    for pattern in data.draw(st.lists(st.sampled_from(OUTPUT_FILES[command]), max_size=4)):
        path = folder / _example_of(pattern, lambda: data.draw(NAMES))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():  # the marker stays what it is
                path.write_text("stale")
        except OSError:  # a name taken by another file drawn
            assume(False)
    with AtomicOutput(folder, command=command, overwrite=True) as staging:
        (staging / "fresh").write_text("new")
    assert sorted(path.name for path in folder.iterdir()) == ["fresh"]
    assert list(folder.parent.glob(f".{folder.name}.*")) == []


def test_a_failed_replacement_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "report.json").write_text('{"old": true}')
    real_rename = os.rename

    def failing_second_rename(source, target):
        if ".partial-" in str(source):
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr("ovsd3.atomic.os.rename", failing_second_rename)
    with pytest.raises(OvsdError):
        with AtomicOutput(folder, command="report", overwrite=True) as staging:
            (staging / "report.json").write_text("{}")
    assert (folder / "report.json").read_text() == '{"old": true}'
    assert list(tmp_path.glob(".r.*")) == []


def test_a_file_saved_into_the_output_while_the_command_worked_is_kept(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    with pytest.raises(OvsdError, match="changed .*thesis.docx.*nothing was replaced"):
        with AtomicOutput(folder, command="report", overwrite=True) as staging:
            (staging / "report.json").write_text("{}")
            (folder / "thesis.docx").write_text("saved meanwhile")
    assert (folder / "thesis.docx").read_text() == "saved meanwhile" and (folder / "report.json").exists()
    assert list(tmp_path.glob(".r.*")) == []


OVERWRITES = [  # argv; the folder D prepared as the issue found it; the file the error names
    (["report", "{model}", "{model}", "--out", "{d}", "--overwrite"], {"report.json": "{}", "thesis.docx": "mine"},
     "thesis.docx"),
    (["benchmark", "{model}", "--out", "{d}", "--overwrite"], {"benchmark.json": "{}", "data/x.csv": "mine"},
     "data/x.csv"),
    (["serve", "{model}", "--write-ovms-config", "{d}", "--overwrite"],
     {"config.json": '{"model_config_list": [{"config": {"name": "other", "base_path": "other"}}]}',
      "other/graph.pbtxt": "another model's graph"}, "other/graph.pbtxt"),
    (["serve", "{model}", "--write-ovms-config", "{d}", "--overwrite"],
     {"config.json": '["model_config_list"]', "notes.txt": "mine"}, "not written by ovsd3"),
    (["quantize", "{model}", "{d}", "--overwrite"],
     {"ovsd3.json": '{"quantization": {"gate": {}}}', "README.md": "mine"},
     "README.md"),
    (["convert", "{source}", "{d}", "--overwrite"], {"ovsd3.json": "{}", "transformer/notes.txt": "mine"},
     "transformer/notes.txt"),
]


@pytest.mark.parametrize("argv, content, needle", OVERWRITES, ids=[case[0][0] + " " + case[2] for case in OVERWRITES])
def test_overwrite_never_deletes_the_users_files(model_copy, tiny_sd3, tmp_path, capsys, nothing_loads, argv,
                                                 content, needle):
    folder = tmp_path / "d"
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = fingerprint(tmp_path)
    code = main([part.format(model=model_copy, source=tiny_sd3, d=folder) for part in argv])
    error = last_line(capsys)
    assert code == EXIT_ERROR and needle in error and "nothing was replaced" in error, error
    assert fingerprint(tmp_path) == before


def test_the_same_models_ovms_config_is_replaced(model_copy, tmp_path):
    out = tmp_path / "ovms"
    assert main(["serve", str(model_copy), "--write-ovms-config", str(out)]) == 0
    (out / "model" / "graph.pbtxt").write_text("stale")
    assert main(["serve", str(model_copy), "--write-ovms-config", str(out), "--overwrite"]) == 0
    assert "ImageGenCalculator" in (out / "model" / "graph.pbtxt").read_text()


# -- what killed runs leave, the next run clears ------------------------------------------------------------

def test_leftovers_of_dead_runs_go_and_a_folder_left_aside_comes_back(tmp_path):
    out, pid = tmp_path / "out", dead_pid()
    (tmp_path / f".out.partial-{pid}").mkdir()
    aside = tmp_path / f".out.old-{pid}"
    aside.mkdir()
    (aside / "report.json").write_text("{}")  # killed between the two renames of a replacement
    (tmp_path / f".out.partial-{os.getpid()}-not-ours").mkdir()  # not this output's name: kept
    living = tmp_path / f".out.partial-{os.getppid()}"  # a run still working: kept
    living.mkdir()
    with pytest.raises(OvsdError, match="already exists"):
        AtomicOutput(out, command="report").check()  # a refused run clears them too
    assert (out / "report.json").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["out", f".out.partial-{os.getpid()}-not-ours", living.name])


@pytest.mark.skipif(not LINUX, reason="zombies are told apart through /proc")
def test_a_killed_run_not_yet_reaped_counts_as_dead(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (tmp_path / f".out.partial-{zombie.pid}").mkdir()
    AtomicOutput(tmp_path / "out", command="report").check()
    assert list(tmp_path.iterdir()) == []
    zombie.wait()


def test_scratch_folders_of_dead_runs_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    left = tmp_path / f"ovsd3-benchmark-{dead_pid()}-abc123"
    left.mkdir()
    with scratch_folder("ovsd3-benchmark") as scratch:
        assert scratch.exists() and not left.exists()
    assert list(tmp_path.iterdir()) == []


def test_run_clears_a_killed_runs_temporary_files(model_copy, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    pid = dead_pid()
    for name in (f".{pid}-0123abcd.png.tmp", f".preview-{pid}.png.tmp"):
        (out / name).write_bytes(b"half a png")
    (out / "00000-1.png").write_bytes(b"an image of an earlier run")
    code = main(["run", str(model_copy), "--prompt", "a", "--image", str(tmp_path / "missing.png"), "--output",
                 str(out)])
    assert code == EXIT_ERROR
    assert sorted(path.name for path in out.iterdir()) == ["00000-1.png"]


def _start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ovsd3", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=at_a_terminal, **kwargs)




@pytest.mark.skipif(not LINUX, reason="zombies are told apart through /proc")
def test_a_quantize_killed_outright_leaves_nothing_after_the_next_run(ov_sd3, tmp_path, capsys):
    out = tmp_path / "qout"
    process = _start(["quantize", ov_sd3, out, "--calib", "4", "--calib-size", "64", "--calib-cache",
                      tmp_path / "calib"])
    staging = tmp_path / f".qout.partial-{process.pid}"
    wait_for(staging.exists, process)
    process.kill()  # not reaped yet: the pid still exists, as a zombie
    deadline = time.monotonic() + 30
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the next run, even one refused before any work, clears what the killed one left
    code = main(["quantize", str(ov_sd3), str(out), "--calib-cache", str(ov_sd3)])
    assert code == EXIT_ERROR and "--calib-cache" in last_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["calib"]
    process.wait()


# -- Ctrl-C and SIGTERM from the first instruction -----------------------------------------------------------

def handlers_installed(pid: int) -> bool:
    """Whether ``pid`` runs ovsd3 and catches SIGTERM (ovsd3's first instruction installs that; Python alone
    does not; before exec the child is a copy of pytest, with pytest's handlers)."""
    try:
        if b"-m\0ovsd3\0" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # ended already: communicate() tells
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


COMMANDS = {  # argv with {model}, {out}; OUT's name
    "run": ["run", "{model}", "--prompt", "a", "--steps", "1000", "--width", "64", "--height", "64", "--device",
            "CPU", "--no-cache", "--preview-every", "1", "--output", "{out}"],
    "quantize": ["quantize", "{model}", "{out}", "--calib", "8", "--calib-size", "64", "--calib-cache", "{out}-c"],
    "report": ["report", "{model}", "{model}", "--prompts", "1", "--size", "64", "--out", "{out}"],
    "serve": ["serve", "{model}", "--write-ovms-config", "{out}"],
}
MOMENTS = (0.0, 0.2)  # seconds after ovsd3's first instruction


@pytest.mark.skipif(not LINUX, reason="the first instruction is seen through /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_signal_at_any_early_moment_is_one_line_and_leaves_nothing(ov_sd3, tmp_path, command, signum):
    for moment in MOMENTS:
        out = tmp_path / f"out-{moment}"
        process = _start([part.format(model=ov_sd3, out=out) for part in COMMANDS[command]])
        wait_for(lambda: handlers_installed(process.pid), process, timeout=60)
        time.sleep(moment)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert "Traceback" not in err, (moment, err)
        if process.returncode == 0:  # finished before the signal: a whole output
            assert command == "serve" and (out / "config.json").exists()
            continue
        expected = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED
        assert process.returncode == expected, (moment, err)
        how = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        assert lines and lines[-1].startswith(f"ovsd3 {command}: {how}"), (moment, err)
        assert not out.exists() and not list(tmp_path.glob(".out-*")), (moment, list(tmp_path.iterdir()))


@pytest.mark.skipif(not LINUX, reason="the first instruction is seen through /proc")
def test_sigterm_while_previewing_leaves_no_preview(ov_sd3, tmp_path):
    out = tmp_path / "o"
    process = _start([part.format(model=ov_sd3, out=out) for part in COMMANDS["run"]])
    wait_for((out / "preview.png").exists, process, timeout=120)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_TERMINATED and err.strip().splitlines()[-1] == "ovsd3 run: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not LINUX, reason="children are found through /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_benchmark_children_end_with_it(ov_sd3, tmp_path, signum):
    process = _start(["benchmark", ov_sd3, "--batch", "1", "--repeats", "100", "--size", "64", "--out",
                      tmp_path / "b"])
    wait_for(lambda: children_of(process.pid), process, timeout=120)
    children = children_of(process.pid)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert all(gone(child, timeout=10) for child in children), children
    if signum == signal.SIGTERM:
        assert process.returncode == EXIT_TERMINATED and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "ovsd3 benchmark: terminated (SIGTERM); nothing was written"
    assert not (tmp_path / "b").exists()
