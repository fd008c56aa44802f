"""The package as a user installs it: the wheel and sdist that `python -m build` makes, the wheel's file list, and
the wheel installed without extras into a fresh venv (pip fetching only the runtime dependencies), where torch is
absent and `ovsd3 run` draws the shipped demo model's converted folder.

The slow part is converting the demo (about a minute, in PyTorch); it is started first, in its own process, so
that the build and the venv's install run beside it."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovsd3 import __version__

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "sd3-digits"
PACKAGE_DATA = ("ovsd3/calibration/prompts.txt", "ovsd3/calibration/heldout_prompts.txt", "ovsd3/serve/page.html")
NOT_INSTALLED = ("calibration", "tests", "demo", "benchmarks", "deploy")
PROMPT, SEED = "a red digit 3", 7
MAX_PIXEL_DIFFERENCE = 8  # of 255: another OpenVINO build may round differently; another picture differs by ~100


def checked_run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def outside_checkout() -> dict:
    """An environment in which a venv's python sees only what is installed in it, not this checkout."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def demo_conversion(tmp_path_factory):
    """`ovsd3 convert demo/sd3-digits`, started in the background; `converted_demo` waits for it."""
    out = tmp_path_factory.mktemp("packaging-demo") / "fp16"
    log = (out.parent / "convert.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "ovsd3", "convert", str(DEMO), str(out)], stdout=log,
                               stderr=subprocess.STDOUT, cwd=REPO)
    yield process, out
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()


def converted_demo(demo_conversion) -> Path:
    process, out = demo_conversion
    code = process.wait(timeout=600)
    assert code == 0, (out.parent / "convert.log").read_text()[-3000:]
    return out


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel, the wheel built from the sdist (build's default), as a release would be: from
    the tracked files alone (a working checkout's stale ovsd3.egg-info/SOURCES.txt would add to the sdist the
    files an older configuration packaged; setuptools reads it back)."""
    out, tree = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("tracked")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    checked_run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)], timeout=600)
    return out


@pytest.fixture(scope="session")
def wheel(dist) -> Path:
    (found,) = dist.glob("ovsd3-*.whl")
    return found


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new venv (no system site-packages) with the wheel installed without extras; prints the time and size."""
    root = tmp_path_factory.mktemp("fresh-venv")
    started = time.monotonic()
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    checked_run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], timeout=600, cwd=root,
                env=outside_checkout())
    size = sum(path.stat().st_size for path in (root / "venv").rglob("*") if path.is_file())
    print(f"\nfresh venv with {wheel.name}: installed in {time.monotonic() - started:.1f} s, {size / 2**20:.0f} MiB")
    return root / "venv"


def in_venv(venv_dir: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv_dir / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=venv_dir, env=outside_checkout())


# First in the file: it starts the demo's conversion, which then runs while the build and the venv are made.
@pytest.mark.slow
def test_the_wheel_runs_the_demo_without_torch(demo_conversion, fresh_venv, tmp_path):
    """In the fresh venv: ovsd3 is the installed one, torch and a top-level `calibration` are absent, the prompt
    sets are found, and `ovsd3 run` on the demo's converted folder draws the picture this checkout draws."""
    for module in ("torch", "calibration", "diffusers"):
        assert "ModuleNotFoundError" in in_venv(fresh_venv, f"import {module}").stderr, module
    found = in_venv(fresh_venv, "import ovsd3; from ovsd3.quantize.calibration import builtin_prompts; "
                                "from ovsd3.calibration import heldout_prompts; "
                                "print(ovsd3.__file__, len(builtin_prompts()), len(heldout_prompts()))")
    assert found.returncode == 0, found.stderr
    location, calibration, heldout = found.stdout.split()
    assert Path(location).is_relative_to(fresh_venv) and (int(calibration), int(heldout)) == (400, 24)
    command = fresh_venv / "bin" / "ovsd3"
    assert checked_run([str(command), "--version"], timeout=60, env=outside_checkout()).stdout == "ovsd3 0.2.0\n"

    model = converted_demo(demo_conversion)
    drawn = {}
    for name, ovsd3 in (("wheel", [str(command)]), ("checkout", [sys.executable, "-m", "ovsd3"])):
        env = outside_checkout() if name == "wheel" else None
        checked_run([*ovsd3, "run", str(model), "--prompt", PROMPT, "--seed", str(SEED), "--output",
                     str(tmp_path / name)], timeout=300, cwd=tmp_path if name == "wheel" else REPO, env=env)
        (png,) = (tmp_path / name).glob("*.png")
        drawn[name] = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert drawn["wheel"].shape == (64, 64, 3) and drawn["wheel"].std() > 10  # a picture, not a blank
    assert np.abs(drawn["wheel"] - drawn["checkout"]).max() <= MAX_PIXEL_DIFFERENCE


def test_version_flag():
    done = checked_run([sys.executable, "-m", "ovsd3", "--version"], timeout=60, cwd=REPO)
    assert __version__ == "0.2.0" and done.stdout == "ovsd3 0.2.0\n"


def test_the_changelog_starts_at_this_version():
    """A version bump comes with its entry in CHANGELOG.md: the newest heading is this version's, dated."""
    headings = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(),
                          re.MULTILINE)
    assert headings[0] == __version__ and headings[-1] == "0.1.0", headings


def test_the_wheel_installs_only_ovsd3(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    info = f"ovsd3-{__version__}.dist-info"
    assert wheel.name == f"ovsd3-{__version__}-py3-none-any.whl"
    assert {name.split("/")[0] for name in names} == {"ovsd3", info}, sorted(names)
    assert not [name for name in names if name.split("/")[0] in NOT_INSTALLED]
    assert set(PACKAGE_DATA) <= set(names)
    shipped = {path.relative_to(REPO).as_posix() for path in (REPO / "ovsd3").rglob("*.py")}
    assert shipped <= set(names), sorted(shipped - set(names))  # a folder without __init__.py would drop out
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(f"{info}/top_level.txt").decode().split() == ["ovsd3"]
        assert "ovsd3 = ovsd3.cli:main" in archive.read(f"{info}/entry_points.txt").decode()
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
    assert metadata["Version"] == __version__
    runtime = [req for req in metadata.get_all("Requires-Dist") if "extra ==" not in req]
    assert sorted(req.split(">")[0].lower() for req in runtime) == sorted(
        ["openvino", "openvino-tokenizers", "numpy", "pillow", "safetensors"]), runtime


def test_the_sdist_builds_the_same_package(dist):
    (sdist,) = dist.glob("ovsd3-*.tar.gz")
    root = f"ovsd3-{__version__}"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(root + "/") for name in archive.getnames()}
        pkg_info = email.message_from_bytes(archive.extractfile(f"{root}/PKG-INFO").read())
    assert pkg_info["Version"] == __version__
    assert {"pyproject.toml", "README.md", *PACKAGE_DATA} <= names
    assert not [name for name in names if name.split("/")[0] == "calibration"]
