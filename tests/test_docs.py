"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing page or a Python API
docstring mkdocstrings cannot render fails here, not on the site."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    pages = {path.parent.name for path in (tmp_path / "site").glob("*/index.html")}
    assert {"getting-started", "convert", "quantize", "generate", "caching", "serve", "serve-many-machines",
            "measurements", "api"} <= pages
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "SD3Pipeline" in api and "num_inference_steps" in api  # rendered from the docstrings


def test_the_readme_is_a_front_page():
    readme = (REPOSITORY / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("docs/getting-started.md", "docs/serve-many-machines.md", "docs/measurements.md"):
        assert f"({page})" in readme and (REPOSITORY / page).exists()
