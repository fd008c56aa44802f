"""MkDocs hook: the repository's own pages and pictures that the documentation links to (the demo's README,
its samples, the benchmark charts) join the site from where they live, so that no copy drifts and a link to a
file that moved fails `mkdocs build --strict`."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

REPOSITORY = Path(__file__).resolve().parent.parent
SHARED = ["demo/README.md", "demo/*.png", "benchmarks/results/**/*.png", "CHANGELOG.md"]


def on_files(files, config):
    for pattern in SHARED:
        for path in sorted(REPOSITORY.glob(pattern)):
            relative = path.relative_to(REPOSITORY).as_posix()
            if files.get_file_from_path(relative) is None:
                files.append(File(relative, src_dir=str(REPOSITORY), dest_dir=config["site_dir"],
                                  use_directory_urls=config["use_directory_urls"]))
    return files
