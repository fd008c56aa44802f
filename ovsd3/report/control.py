"""The report's ControlNet section: how often each folder's pictures follow a control image rather than the
prompt, and what a step with control costs.

The questions and their score come from the demo's digit world (:mod:`ovsd3.demo.control`: outlines of held-out
digits, prompts naming other digits); this module only draws them through each column, as the report draws its
prompts, in child processes, and lays out the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ovsd3 import layout
from ovsd3.errors import OvsdError
from ovsd3.report.children import run_child
from ovsd3.report.stats import Spread

GRID_ROWS = 10  # control images shown in control.png (all are scored)


def wanted(control: bool | None, digits: bool, folders: list[Path]) -> bool:
    """Whether the report scores control images: asked for (``--control``), or by default when the digits are
    scored and the first folder has a ControlNet. Asked for where it cannot be done is a one-line error."""
    has_controlnet = [bool(layout.controlnet_components(folder)) for folder in folders]
    if control is None:
        return digits and has_controlnet[0]
    if control and not digits:
        raise OvsdError("--control scores the digits demo's ControlNet (ovsd3 convert demo/sd3-digits FOLDER "
                        "--controlnet demo/sd3-digits-controlnet): it needs --digits")
    if control and not any(has_controlnet):
        raise OvsdError("--control: none of the folders has a ControlNet (ovsd3 convert --controlnet)")
    return control


def _control_images(cases: list, out: Path) -> list[str]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, case in enumerate(cases):
        path = out / f"{index:02d}.png"
        Image.fromarray(case.control).save(path)
        paths.append(str(path))
    return paths


def _draws_control(column) -> bool:
    return column.runner == "ovsd3" and bool(layout.controlnet_components(column.folder))


def measure(columns: list, count: int, seed: int, settings: dict, device: str, staging: Path,
            log: Callable[[str], None]) -> dict:
    """Draw ``count`` control questions through every ovsd3 column whose folder has a ControlNet (seeds
    ``seed``, ``seed + 1``, ...; the report's steps, guidance and size), and score each column's pictures.
    Columns that cannot draw with control (openvino.genai's, folders without a ControlNet) get None."""
    from PIL import Image

    from ovsd3.demo.control import CASES_DESCRIPTION, control_cases, score_control
    from ovsd3.demo.digits import DigitScorer

    cases = control_cases(count)
    control_paths = _control_images(cases, staging / "control" / "inputs")
    seeds = [seed + index for index in range(count)]
    scorer, scores = DigitScorer(), []
    for index, column in enumerate(columns):
        if not _draws_control(column):
            scores.append(None)
            continue
        log(f"{column.label}: {count} control images, {settings['steps']} steps")
        generated = run_child({"name": "ovsd3_generate", "folder": str(column.folder), "device": device,
                               "prompts": [case.prompt for case in cases], "seeds": seeds,
                               "control_images": control_paths, "cache": column.cache,
                               "image_dir": str(staging / "control" / f"{index:02d}"), **settings})
        score = score_control(scorer, [Image.open(path) for path in generated["images"]], cases).to_json()
        step_seconds = Spread.of(step for run in generated["generations"] for step in run["step_seconds"])
        scores.append({**score, "step_seconds": step_seconds.to_json(), "images": generated["images"]})
    return {"description": CASES_DESCRIPTION, "cases": count, "seeds": seeds, "prompts": [case.prompt for case in cases],
            "digits": [case.digit for case in cases], "control_images": control_paths, "folders": scores}


def relative_paths(control: dict, staging: Path) -> None:
    """Paths inside the report folder, relative to it, as the report's own images are."""
    control["control_images"] = [str(Path(path).relative_to(staging)) for path in control["control_images"]]
    for score in control["folders"]:
        if score is not None:
            score["images"] = [str(Path(path).relative_to(staging)) for path in score["images"]]


def grid(control: dict, labels: list[str], staging: Path, out: Path):
    """control.png: a row per control image (the first GRID_ROWS), its control image, then each column that
    drew with it."""
    from ovsd3.report import figures

    drawn = [(label, score) for label, score in zip(labels, control["folders"]) if score is not None]
    rows = min(GRID_ROWS, control["cases"])
    paths = [[str(staging / control["control_images"][row])] + [str(staging / score["images"][row])
                                                                for _, score in drawn] for row in range(rows)]
    return figures.image_grid(paths, control["prompts"][:rows], ["control image"] + [label for label, _ in drawn],
                              out)


def markdown(report: dict) -> list[str]:
    control = report.get("control")
    if control is None:
        return []
    folders = report["folders"]
    labels = [folder["label"] for folder in folders]
    scores = control["folders"]

    def row(title: str, value: Callable[[dict], str]) -> str:
        return f"| {title} | " + " | ".join("-" if score is None else value(score) for score in scores) + " |"

    return ["", "## Following a control image (ControlNet)", "",
            f"{control['cases']} {control['description']}; seeds {control['seeds'][0]}..{control['seeds'][-1]}, "
            f"the settings above. A column without a ControlNet (or openvino.genai's, which has none for SD3): -.",
            "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
            row("follows the control image (its digit, the prompt's colour)", lambda s: f"{s['share']:.1%}"),
            row("digit follows the control image", lambda s: f"{s['digit_follows_control']:.1%}"),
            row("digit follows the prompt instead", lambda s: f"{s['digit_follows_prompt']:.1%}"),
            row("colour as the prompt asks", lambda s: f"{s['colour']:.1%}"),
            row("transformer step with control (s, median)", lambda s: f"{s['step_seconds']['median']:.3f}"),
            "", "![control images and what each column drew](control.png)"]
