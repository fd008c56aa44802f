"""Every command's numbers and paths are checked before any work: a value it cannot use (NaN, inf, zero,
negative, huge, a name past the filesystem's limit) is one line naming the option, exit 2.

Generated with Hypothesis through `ovsd3.cli.main` itself, on folders that do not exist: the option's check
must come first, so the error names the option, not the folder (and nothing loads, so each case is quick).
A few real processes show the exit code and the one line as a user sees them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsd3.cli import EXIT_ERROR, main

SETTINGS = settings(max_examples=60, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# command line before the option (folders that do not exist: the option must be refused first)
COMMANDS = {
    "run": ["run", "no-such-model", "--prompt", "a"],
    "serve": ["serve", "no-such-model"],
    "quantize": ["quantize", "no-such-model", "no-such-out"],
    "convert": ["convert", "no-such-model", "no-such-out"],
}

# (command, option): (lowest, highest) of the numbers it takes; ints where both are ints
NUMBERS = {
    ("run", "--strength"): (0.0, 1.0),
    ("run", "--skip-layer-scale"): (0.0, 100.0),
    ("run", "--skip-layer-start"): (0.0, 1.0),
    ("run", "--skip-layer-stop"): (0.0, 1.0),
    ("serve", "--workers"): (1, 64),
    ("serve", "--max-queue"): (1, 1024),
    ("serve", "--port"): (1, 65535),
    ("quantize", "--min-psnr"): (0.0, 200.0),
    ("quantize", "--min-ssim"): (-1.0, 1.0),
    ("quantize", "--max-digit-drop"): (0.0, 1.0),
    ("quantize", "--smooth-quant-alpha"): (0.0, 1.0),
    ("convert", "--min-psnr"): (0.0, 200.0),
}


def outside(low, high) -> st.SearchStrategy[str]:
    """Values as typed on a command line that the option must refuse."""
    if isinstance(low, int):
        return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                         st.integers(min_value=10**18, max_value=10**40)).map(str)
    beyond = st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda value: not low <= value <= high and value != -1)  # -1 is SmoothQuant's "off"
    return st.one_of(beyond.map(repr), st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999"]))


def refused(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must end in exit 2 with one line on stderr: that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(err) == 1, (argv, code, err)
    assert "internal error" not in err[0]
    return err[0]


@pytest.mark.parametrize("command, option", sorted(NUMBERS), ids=[" ".join(key) for key in sorted(NUMBERS)])
def test_numbers_out_of_bounds_are_one_line_naming_the_option(capsys, command, option):
    @SETTINGS
    @given(value=outside(*NUMBERS[command, option]))
    def check(value):
        line = refused(capsys, [*COMMANDS[command], f"{option}={value}"])
        assert line.startswith(f"ovsd3 {command}: error: {option} must be"), line

    check()


@pytest.mark.parametrize("command, option", sorted(NUMBERS), ids=[" ".join(key) for key in sorted(NUMBERS)])
def test_numbers_inside_the_bounds_pass_the_check(command, option):
    """The other side: the bounds refuse no value the option can use (here, the ends and the middle)."""
    from ovsd3.arguments import check_options
    from ovsd3.cli import CONVERT_RULES, QUANTIZE_RULES, build_parser
    from ovsd3.runtime.cli import RULES as RUN_RULES
    from ovsd3.serve.cli import RULES as SERVE_RULES

    rules = {"run": RUN_RULES, "serve": SERVE_RULES, "quantize": QUANTIZE_RULES, "convert": CONVERT_RULES}[command]
    low, high = NUMBERS[command, option]
    for value in (low, high, (low + high) / 2 if isinstance(low, float) else (low + high) // 2):
        args = build_parser().parse_args([*COMMANDS[command], f"{option}={value}"])
        check_options(args, rules, positionals={"source": "IN", "output": "OUT"} if command == "quantize" else None)


NAME_OPTIONS = [("run", "--output"), ("run", "--image"), ("run", "--cache-dir"), ("quantize", "--calib-cache"),
                ("serve", "--write-ovms-config")]


@pytest.mark.parametrize("command, option", NAME_OPTIONS, ids=[" ".join(case) for case in NAME_OPTIONS])
def test_names_past_the_filesystem_limit_are_one_line(capsys, tmp_path, command, option):
    """NAME_MAX is 255 bytes: counted in bytes, so 128 two-byte letters are over it too."""
    @SETTINGS
    @given(letter=st.sampled_from(["x", "é", "猫", "😀"]), extra=st.integers(0, 300), depth=st.integers(0, 2))
    def check(letter, extra, depth):
        name = letter * (255 // len(letter.encode()) + 1 + extra)
        target = tmp_path.joinpath(*["sub"] * depth, name)
        line = refused(capsys, [*COMMANDS[command], option, str(target)])
        assert line.startswith(f"ovsd3 {command}: error: {option}: the name ") and "at most 255" in line, line

    check()
    assert list(tmp_path.iterdir()) == []  # nothing created on the way


def test_a_whole_path_past_path_max_is_one_line(capsys):
    line = refused(capsys, ["run", "/" + "d/" * 2100, "--prompt", "a"])  # 4,200 bytes as a Path (no final /)
    assert line == "ovsd3 run: error: MODEL_DIR: the path is 4200 bytes long; the limit is 4096", line


@given(text=st.lists(st.sampled_from(["1", "2", "", " ", "-1", "a", "1.5", "+2", "٣", "1", "99999"]),
                     min_size=2, max_size=5).map(",".join))
@SETTINGS
def test_skip_layer_lists_with_holes_signs_or_repeats_are_refused(text):
    from ovsd3.arguments import block_list

    parts = [part.strip() for part in text.split(",")]
    if usable_blocks(parts):
        assert block_list(text) == [int(part) for part in parts]
    else:
        with pytest.raises(SystemExit) as exited:  # argparse's refusal: usage, then one line naming the option
            _parse_run(["--skip-layers", text])
        assert exited.value.code == 2


def usable_blocks(parts: list[str]) -> bool:
    if not all(part.isascii() and part.isdigit() for part in parts):
        return False
    blocks = [int(part) for part in parts]
    return len(set(blocks)) == len(blocks) and max(blocks) < 1000


def _parse_run(extra: list[str]):
    from ovsd3.cli import build_parser

    return build_parser().parse_args(["run", "m", "--prompt", "a", *extra])


def test_skip_layers_1_comma_comma_2_is_refused(capsys):
    with pytest.raises(SystemExit):
        _parse_run(["--skip-layers", "1,,2"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ovsd3 run: error: argument --skip-layers: block indices (0, 1, 2, ...) separated by commas, such as "
        "7,8,9 (got '1,,2')")


@pytest.mark.parametrize("argv, line", [
    (["serve", "m", "--workers", "1000000"], "ovsd3 serve: error: --workers must be between 1 and 64 (got 1000000)"),
    (["quantize", "m", "o", "--min-psnr", "nan"], "ovsd3 quantize: error: --min-psnr must be between 0 and 200 "
                                                   "(got nan)"),
    (["run", "m", "--prompt", "a", "--output", "x" * 300],
     "ovsd3 run: error: --output: the name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxx' is 300 bytes long; a file or "
     "folder name holds at most 255"),
])
def test_as_a_user_sees_it(tmp_path, argv, line):
    """A real process: exit 2, one line, at once (nothing loads, no thread starts)."""
    done = subprocess.run([sys.executable, "-m", "ovsd3", *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [line])
    assert list(tmp_path.iterdir()) == []


def test_workers_are_bounded_for_the_python_api_too():
    from ovsd3.errors import OvsdError
    from ovsd3.serve.jobs import WorkerPool

    def load():
        raise AssertionError("a pipeline loaded before the bound was checked")

    for workers, queue in ((10**6, 16), (1, 10**9), (0, 16), (True, 16), (2.5, 16)):
        with pytest.raises(OvsdError, match="must be a whole number from 1 to"):
            WorkerPool(load, workers, queue)


def test_static_with_several_images_per_prompt_draws_them(ov_sd3, tmp_path, capsys):
    """--static fixed the text encoders' batch at prompts x images, which they never see (they encode each
    prompt once): an internal error before."""
    out = tmp_path / "out"
    code = main(["run", str(ov_sd3), "--prompt", "a", "--prompt", "b", "--num-images", "2", "--static", "--width",
                 "64", "--height", "64", "--steps", "1", "--no-cache", "--device", "CPU", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 4
