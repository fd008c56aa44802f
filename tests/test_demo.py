"""The shipped demo model (demo/sd3-digits) end to end, run the way the README's quickstart runs it. These tests
fail if a runtime draws the wrong digit or the wrong colour: each set of pictures must match its prompts, and
must not match prompts that ask for another digit or another colour."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from ovsd3.demo.digits import COLOURS, DigitPrompt, DigitScorer, evaluation_prompts
from ovsd3.quantize.pipeline import QuantizeRequest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "sd3-digits"
PROMPTS = 20
MIN_MATCH = 0.8  # on 20 prompts; the acceptance figures over 120 are in demo/README.md
MAX_WRONG_MATCH = 0.1
SPARE_GATE_POINTS = 0.10  # issue 17's target: the quickstart's gate passes with this much to spare


@pytest.fixture(scope="module")
def scorer() -> DigitScorer:
    return DigitScorer()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """demo/quickstart.sh as a user runs it: convert, quantize, report; its full-size estimate on the demo's own
    architecture (the same path in seconds; SD3 Medium's takes minutes: benchmarks/int8_estimate.py checks it)."""
    out = tmp_path_factory.mktemp("quickstart") / "digits"
    done = subprocess.run(["bash", str(REPO / "demo" / "quickstart.sh"), str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "FULL_SIZE": "digits"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digits matching the prompt" in done.stdout  # it ends by printing the report
    assert "## What INT8 gains at full size on this CPU (digits, estimated)" in done.stdout
    return out


def other_digit(prompt: str) -> str:
    asked = DigitPrompt.parse(prompt)
    return DigitPrompt((asked.digit + 5) % 10, asked.colour).text


def other_colour(prompt: str) -> str:
    asked = DigitPrompt.parse(prompt)
    colours = list(COLOURS)
    return DigitPrompt(asked.digit, colours[(colours.index(asked.colour) + 3) % len(colours)]).text


def assert_drawn_as_asked(scorer: DigitScorer, images: list, prompts: list[str]) -> float:
    accuracy = scorer.score(images, prompts).accuracy
    assert accuracy >= MIN_MATCH, f"only {accuracy:.0%} of the digits match their prompts"
    assert scorer.score(images, [other_digit(p) for p in prompts]).accuracy <= MAX_WRONG_MATCH
    assert scorer.score(images, [other_colour(p) for p in prompts]).accuracy <= MAX_WRONG_MATCH
    return accuracy


def test_diffusers_loads_and_draws_the_shipped_model(scorer):
    """The folder is a plain diffusers SD3 folder: from_pretrained with no extra arguments, default steps and
    guidance."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(DEMO)
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluation_prompts(PROMPTS)
    images = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(PROMPTS)]).images
    assert images[0].size == (64, 64)
    assert_drawn_as_asked(scorer, images, prompts)


def test_quickstart_report_scores_both_folders(quickstart, scorer):
    """FP16 and INT8 folders both draw the prompted digits; the report's figures are the scorer's verdicts on the
    report's own pictures."""
    report_dir = quickstart / "report"
    report = json.loads((report_dir / "report.json").read_text())
    prompts = report["settings"]["prompts"]
    assert report["settings"]["digits"] is True and prompts == evaluation_prompts(PROMPTS)
    assert [folder["label"] for folder in report["folders"]] == ["FP16", "INT8"]
    for folder in report["folders"]:
        images = [Image.open(report_dir / path) for path in folder["images"]]
        accuracy = assert_drawn_as_asked(scorer, images, prompts)
        assert folder["quality"]["digits"]["accuracy"] == accuracy
    int8 = report["folders"][1]
    assert int8["size"]["total_bytes"] < report["folders"][0]["size"]["total_bytes"]
    assert (report_dir / "grid.png").exists()


def test_quantize_gate_scored_the_digits(quickstart):
    record = json.loads((quickstart / "int8" / "ovsd3.json").read_text())
    assert record["demo"] == "digits"
    gate = record["quantization"]["gate"]
    assert len(gate["image_psnr"]) == 20  # the demo's default: 20 prompts, so one image is 5 points
    digits = gate["digit_accuracy"]
    # The gate's own limit is 15 points (20 prompts measure a share +-5; a broken quantization draws next to no
    # digits). The trained demo passes it with 10 points to spare: the quantized folder loses at most one picture
    # of the 20, so a CPU that rounds differently does not fail the README's first command.
    allowed_drop = QuantizeRequest.max_digit_drop
    assert digits["reference"] >= MIN_MATCH
    assert digits["candidate"] >= digits["reference"] - (allowed_drop - SPARE_GATE_POINTS) - 1e-9, digits


def test_openvino_genai_draws_the_converted_folder(quickstart, scorer):
    """The converted folder in another runtime: openvino.genai's Text2ImagePipeline, at diffusers' steps and
    guidance, with its TaylorSeer step caching off (its default for SD3 extrapolates half of the transformer's
    outputs, which costs colours on this model; demo/README.md), draws the asked digits in the asked colours."""
    import openvino_genai

    from ovsd3.report.peers import genai_pipeline

    pipe = genai_pipeline({"folder": quickstart / "fp16", "device": "CPU", "taylorseer": False})
    prompts = evaluation_prompts(PROMPTS)
    images = []
    for seed, prompt in enumerate(prompts):
        tensor = pipe.generate(prompt, width=64, height=64, num_inference_steps=28, guidance_scale=7.0,
                               generator=openvino_genai.TorchGenerator(seed))
        images.append(Image.fromarray(tensor.data[0]))
    assert len(pipe.get_performance_metrics().raw_metrics.transformer_inference_durations) == 28  # cache off
    assert_drawn_as_asked(scorer, images, prompts)


def test_quantized_text_encoders_keep_the_prompts_apart(quickstart):
    """The demo's CLIPs are trained to tell the digit and the colour (demo/train.py): prompts that differ in one
    word end further apart than INT4 weights move any prompt, so the quantized folder's embedding of every prompt
    is still nearest to its own digit and colour, with room to spare. (Random encoders left "red 7" and "red 1"
    closer than INT4 moved them: smallest margins 0.56x (tokens) and 0.72x (pooled); trained, 2.3x and 1.6x.)"""
    from ovsd3.demo.digits import all_prompts
    from ovsd3.demo.separation import embeddings, separation
    from ovsd3.runtime import SD3Pipeline

    prompts = all_prompts()
    texts = [prompt.text for prompt in prompts]
    reference, candidate = (embeddings(SD3Pipeline.load(quickstart / name, device="CPU", cache_dir=None), texts)
                            for name in ("fp16", "int8"))
    for name in ("pooled", "clip tokens"):
        measured = separation(reference[name], candidate[name], prompts)
        assert measured.kept == 1.0, (name, measured)
        assert measured.smallest_margin > 1.25, (name, measured)
        assert max(measured.digit_db, measured.colour_db) < measured.displacement_db - 6.0, (name, measured)
