"""`ovsd3 report` and `ovsd3 benchmark` on tiny folders: every report field checked against what it
measures (files on disk, the images themselves, independent recomputation), the pictures' layout, the peers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ovsd3 import layout
from ovsd3.cli import EXIT_ERROR, main
from ovsd3.metrics import psnr, ssim

SIZE, STEPS, PROMPTS = 64, 3, 2
SPREAD_KEYS = {"median", "min", "max", "n", "relative_range"}


@pytest.fixture(scope="module")
def tiny_clip(workdir) -> Path:
    from ovsd3.synthetic import save_random_clip

    return save_random_clip(workdir / "tiny-clip", seed=4)


@pytest.fixture(scope="module")
def report_dir(workdir, ov_sd3, q_sd3, tiny_clip) -> Path:
    out = workdir / "report"
    assert main(["report", str(ov_sd3), str(q_sd3), "--out", str(out), "--prompts", str(PROMPTS), "--size",
                 str(SIZE), "--steps", str(STEPS), "--clip", str(tiny_clip), "--label", "fp16", "--label",
                 "int8"]) == 0
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def check_spread(spread: dict, n: int) -> None:
    assert set(spread) == SPREAD_KEYS
    assert spread["n"] == n
    assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert spread["relative_range"] == pytest.approx((spread["max"] - spread["min"]) / spread["median"])


def test_report_top_level(report, report_dir):
    from calibration import heldout_prompts

    from ovsd3 import __version__

    assert set(report) == {"ovsd3_version", "created", "machine", "settings", "folders", "files", "grid"}
    assert report["ovsd3_version"] == __version__
    assert set(report["machine"]) == {"openvino", "execution_devices", "device_names", "device", "cpu_count",
                                      "platform", "processor"}
    assert report["machine"]["openvino"] == ov.get_version()
    assert report["machine"]["device"] == "AUTO" and report["machine"]["execution_devices"] == ["CPU"]
    assert report["machine"]["device_names"]["CPU"] == ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert report["machine"]["cpu_count"] == os.cpu_count() and report["machine"]["processor"]
    assert report["settings"] == {"prompts": heldout_prompts()[:PROMPTS], "seeds": [0, 1], "steps": STEPS,
                                  "guidance_scale": 7.0, "width": SIZE, "height": SIZE, "max_sequence_length": 256,
                                  "clip_model": report["settings"]["clip_model"], "digits": False}
    assert Path(report["settings"]["clip_model"]).name == "tiny-clip"
    assert report["files"] == {"markdown": "report.md", "grid": "grid.png", "chart": "chart.png"}
    assert all((report_dir / name).exists() for name in report["files"].values())
    assert [folder["label"] for folder in report["folders"]] == ["fp16", "int8"]


def test_report_sizes_are_the_files_on_disk(report, ov_sd3, q_sd3):
    reference, quantized = report["folders"]
    for entry, folder in ((reference, ov_sd3), (quantized, q_sd3)):
        assert set(entry) == {"label", "runner", "cache", "path", "weight_format", "quantized", "cpu_target",
                              "speed", "images", "size", "quality"}
        assert entry["runner"] == "ovsd3"
        assert entry["path"] == str(folder.resolve())
        assert set(entry["size"]) == {"components", "total_bytes", "compression", "component_compression"}
        on_disk = {component: (folder / component / "openvino_model.xml").stat().st_size
                   + (folder / component / "openvino_model.bin").stat().st_size
                   for component in layout.MODEL_COMPONENTS if (folder / component).exists()}
        assert entry["size"]["components"] == on_disk
        assert entry["size"]["total_bytes"] == sum(on_disk.values())
    assert reference["quantized"] is False and quantized["quantized"] is True
    assert reference["cpu_target"] is None and quantized["cpu_target"]["target"] == "this"  # quantize's choice
    assert reference["weight_format"] == "fp16"
    assert reference["size"]["compression"] == 1.0
    assert quantized["size"]["compression"] == pytest.approx(
        reference["size"]["total_bytes"] / quantized["size"]["total_bytes"])
    for component, rate in quantized["size"]["component_compression"].items():
        assert rate == pytest.approx(reference["size"]["components"][component]
                                     / quantized["size"]["components"][component])


def test_report_speed_fields(report):
    for entry in report["folders"]:
        speed = entry["speed"]
        assert set(speed) == {"total_seconds", "text_seconds", "step_seconds", "decode_seconds", "first_start",
                              "peak_rss_bytes", "speedup", "transformer_calls", "work"}
        assert entry["cache"] == "off" and speed["transformer_calls"] == STEPS and speed["work"] == 1.0
        for part in ("total", "text", "decode"):
            check_spread(speed[f"{part}_seconds"], PROMPTS)
        check_spread(speed["step_seconds"], PROMPTS * STEPS)
        # the parts of a generation fit inside it
        assert speed["text_seconds"]["min"] + STEPS * speed["step_seconds"]["min"] + speed["decode_seconds"]["min"] \
            <= speed["total_seconds"]["max"]
        assert set(speed["first_start"]) == {"no_cache", "cache_fill", "cached"}
        for start in speed["first_start"].values():
            assert set(start) == {"load_seconds", "first_image_seconds", "total_seconds"}
            assert start["load_seconds"] > 0 and start["first_image_seconds"] > 0
            assert start["total_seconds"] == pytest.approx(start["load_seconds"] + start["first_image_seconds"])
        assert 50e6 < speed["peak_rss_bytes"] < 8e9
    reference, quantized = report["folders"]
    assert reference["speed"]["speedup"] == {"total": 1.0, "text": 1.0, "step": 1.0, "decode": 1.0}
    for part in ("total", "text", "step", "decode"):
        assert quantized["speed"]["speedup"][part] == pytest.approx(
            reference["speed"][f"{part}_seconds"]["median"] / quantized["speed"][f"{part}_seconds"]["median"])


def test_report_images_are_the_generations(report, report_dir, ov_sd3):
    """The reference column is exactly what ovsd3's runtime draws for each prompt and seed."""
    from ovsd3.runtime import SD3Pipeline

    pipe = SD3Pipeline.load(ov_sd3, device="AUTO", cache_dir=None)
    for index, prompt in enumerate(report["settings"]["prompts"]):
        image = pipe(prompt, seed=index, num_inference_steps=STEPS, width=SIZE, height=SIZE).images[0]
        assert np.array_equal(np.asarray(image), rgb(report_dir / report["folders"][0]["images"][index]))
    for entry in report["folders"]:
        assert len(entry["images"]) == PROMPTS
        assert all(Image.open(report_dir / path).size == (SIZE, SIZE) for path in entry["images"])


def test_report_quality_against_the_reference(report, report_dir):
    reference, quantized = report["folders"]
    keys = {"reference", "psnr_db", "ssim", "mean_psnr_db", "mean_ssim", "clip_score", "mean_clip_score", "digits"}
    assert set(reference["quality"]) == keys and set(quantized["quality"]) == keys
    assert reference["quality"]["reference"] is True and reference["quality"]["psnr_db"] is None
    assert quantized["quality"]["reference"] is False
    pairs = [(rgb(report_dir / a), rgb(report_dir / b)) for a, b in zip(reference["images"], quantized["images"])]
    assert quantized["quality"]["psnr_db"] == pytest.approx([psnr(a, b, data_range=255.0) for a, b in pairs])
    assert quantized["quality"]["ssim"] == pytest.approx([ssim(a, b, data_range=255.0) for a, b in pairs])
    assert quantized["quality"]["mean_psnr_db"] == pytest.approx(np.mean(quantized["quality"]["psnr_db"]))
    assert 10 < quantized["quality"]["mean_psnr_db"] < 60  # INT8 changes the images, but not into noise
    assert quantized["quality"]["mean_ssim"] == pytest.approx(np.mean(quantized["quality"]["ssim"]))
    assert reference["quality"]["digits"] is None  # not the digits demo: no digit score


def test_clip_score_matches_transformers(report, report_dir, tiny_clip):
    """100 x max(cosine, 0) of CLIP image and text embeddings, computed here directly with transformers."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    prompts = report["settings"]["prompts"]
    for entry in report["folders"]:
        images = [Image.open(report_dir / path).convert("RGB") for path in entry["images"]]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding="max_length", max_length=77)
        with torch.no_grad():
            out = model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
        expected = 100 * np.maximum(cosine, 0)
        assert entry["quality"]["clip_score"] == pytest.approx(expected.tolist(), abs=1e-3)
        assert entry["quality"]["mean_clip_score"] == pytest.approx(expected.mean(), abs=1e-3)


def test_grid_layout_holds_each_image_in_its_cell(report, report_dir):
    grid = report["grid"]
    assert (grid["rows"], grid["columns"]) == (PROMPTS, 2)
    with Image.open(report_dir / "grid.png") as opened:
        picture = opened.convert("RGB")
    assert picture.size == (grid["width"], grid["height"])
    cell = (grid["cell_width"], grid["cell_height"])
    for row in range(PROMPTS):
        for column, entry in enumerate(report["folders"]):
            left = grid["label_width"] + grid["gap"] + column * (grid["cell_width"] + grid["gap"])
            top = grid["header_height"] + grid["gap"] + row * (grid["cell_height"] + grid["gap"])
            crop = np.asarray(picture.crop((left, top, left + cell[0], top + cell[1])), dtype=np.float64)
            with Image.open(report_dir / entry["images"][row]) as image:
                expected = np.asarray(image.convert("RGB").resize(cell, Image.LANCZOS), dtype=np.float64)
            assert np.array_equal(crop, expected), (row, column)
    header = np.asarray(picture.crop((grid["label_width"], 0, grid["width"], grid["header_height"])))
    labels = np.asarray(picture.crop((0, grid["header_height"], grid["label_width"], grid["height"])))
    assert (header < 128).any() and (labels < 128).any()  # the labels are drawn (dark text on white)


def test_chart_and_markdown(report, report_dir):
    with Image.open(report_dir / "chart.png") as chart:
        assert chart.size == (1100, 420)
        colours = np.unique(np.asarray(chart.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # bars, text and a legend, not a blank canvas
    text = (report_dir / "report.md").read_text()
    quantized = report["folders"][1]
    for expected in ("fp16", "int8", f"{quantized['size']['compression']:.3f}x",
                     f"{quantized['quality']['mean_psnr_db']:.2f}", report["machine"]["processor"],
                     "grid.png", "chart.png", f"int8: quantized for {quantized['cpu_target']['isa']} (this CPU)"):
        assert expected in text


def test_small_images_say_what_int8_is_for(report_dir):
    """A quantized folder timed at 64x64 gets the note that this is not where INT8 gains."""
    text = (report_dir / "report.md").read_text()
    assert "At 64x64 a transformer block has next to no arithmetic" in text
    assert "--full-size sd3-medium" in text


def test_full_size_estimate_in_the_report(tmp_path, ov_sd3, q_sd3):
    """--full-size PRESET: the preset's transformer cut to 3 blocks, FP16 and INT8 timed; the full call is
    the cut call plus the missing blocks at the measured per-block time (here the 4-block demo preset)."""
    out = tmp_path / "report"
    assert main(["report", str(ov_sd3), str(q_sd3), "--out", str(out), "--prompts", "1", "--size", "64",
                 "--steps", "1", "--full-size", "digits"]) == 0
    report = json.loads((out / "report.json").read_text())
    estimate = report["full_size"]
    assert (estimate["preset"], estimate["blocks"], estimate["num_layers"]) == ("digits", 3, 4)
    assert list(estimate["sizes"]) == ["128"]  # the largest the demo's position embedding allows
    row = estimate["sizes"]["128"]
    for label in ("FP16", "INT8"):
        part = row[label]
        assert part["cut_seconds"] > 0 and part["block_seconds"] >= 0
        assert part["full_seconds"] == pytest.approx(part["cut_seconds"] + part["block_seconds"])
        assert part["rest_seconds"] == pytest.approx(part["cut_seconds"] - 3 * part["block_seconds"])
    assert row["speedup"] == pytest.approx(row["FP16"]["full_seconds"] / row["INT8"]["full_seconds"])
    text = (out / "report.md").read_text()
    assert "## What INT8 gains at full size on this CPU (digits, estimated)" in text
    assert f"| 128x128 | {row['FP16']['cut_seconds']:.2f} |" in text and "see the full-size estimate below" in text


@pytest.mark.parametrize("case", ["one folder", "missing folder", "not SD3", "bad clip", "zero prompts",
                                  "zero steps", "size with width", "full size of SD3.5 Medium"])
def test_report_errors_are_one_line(case, tmp_path, capsys, ov_sd3, tiny_sd3):
    out = tmp_path / "report"
    args = {"one folder": [str(ov_sd3)],
            "missing folder": [str(ov_sd3), str(tmp_path / "nowhere")],
            "not SD3": [str(ov_sd3), str(tiny_sd3)],
            "bad clip": [str(ov_sd3), str(ov_sd3), "--clip", str(tmp_path / "no-clip")],
            "zero prompts": [str(ov_sd3), str(ov_sd3), "--prompts", "0"],
            "zero steps": [str(ov_sd3), str(ov_sd3), "--steps", "0"],  # the later --steps wins
            "size with width": [str(ov_sd3), str(ov_sd3), "--width", "64"],
            "full size of SD3.5 Medium": [str(ov_sd3), str(ov_sd3), "--full-size", "sd3.5-medium"]}[case]
    assert main(["report", "--out", str(out), "--size", "64", "--steps", "1", *args]) == EXIT_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("ovsd3 report: error: ") and "\n" not in error
    expected = {"one folder": "two or more", "missing folder": "does not exist", "not SD3": "PyTorch (diffusers) model, not OpenVINO IR",
                "bad clip": "cannot load CLIP model", "zero prompts": "--prompts",
                "zero steps": "--steps must be between 1 and 1000",
                "size with width": "--size is the square shorthand for --width and --height",
                "full size of SD3.5 Medium": "--full-size must be one of sd3-medium, sd3.5-large"}[case]
    assert expected in error
    assert not out.exists() and not list(tmp_path.glob(".report.partial-*"))


def test_report_refuses_an_existing_output(tmp_path, capsys, ov_sd3):
    (tmp_path / "report").mkdir()
    assert main(["report", str(ov_sd3), str(ov_sd3), "--out", str(tmp_path / "report")]) == EXIT_ERROR
    assert "already exists" in capsys.readouterr().err


# -- benchmark -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark(workdir, ov_sd3, tiny_sd3) -> dict:
    out = workdir / "benchmark"
    # 12 steps: genai's TaylorSeer caching starts at step 6, so with it on some transformer calls are skipped
    assert main(["benchmark", str(ov_sd3), "--batch", "2,1", "--steps", "12", "--size", "64", "--repeats", "2",
                 "--peers", "--torch-model", str(tiny_sd3), "--cache", "off", "--cache", "taylorseer",
                 "--out", str(out)]) == 0
    return json.loads((out / "benchmark.json").read_text()) | {"out": str(out)}


def test_benchmark_runs_each_peer(benchmark):
    assert set(benchmark["runners"]) == {"ovsd3", "ovsd3 taylorseer", "genai", "genai+taylorseer", "diffusers-fp32",
                                         "diffusers-bf16"}
    assert benchmark["settings"]["caches"] == ["off", "taylorseer"]
    # ovsd3's TaylorSeer makes the calls genai's makes with the same settings, on the same folder
    assert benchmark["runners"]["ovsd3 taylorseer"]["transformer_calls"] \
        == benchmark["runners"]["genai+taylorseer"]["transformer_calls"] < 12
    assert benchmark["runners"]["ovsd3"]["transformer_calls"] == 12
    assert benchmark["settings"]["batches"] == [1, 2]
    for name, runner in benchmark["runners"].items():
        assert set(runner["batches"]) == {"1", "2"}
        for batch, figures in runner["batches"].items():
            check_spread(figures["seconds_per_call"], 2)
            median = figures["seconds_per_call"]["median"]
            assert figures["seconds_per_image"] == pytest.approx(median / int(batch))
            assert figures["images_per_second"] == pytest.approx(int(batch) / median)
            ours = benchmark["runners"]["ovsd3"]["batches"][batch]["seconds_per_call"]["median"]
            assert figures["time_vs_ovsd3"] == pytest.approx(median / ours)
        assert runner["peak_rss_bytes"] > 50e6
    # step caching really off, then on: every step runs the transformer, then fewer do
    assert benchmark["runners"]["genai"]["transformer_calls"] == 12
    assert benchmark["runners"]["genai"]["taylorseer"] is None
    assert benchmark["runners"]["genai+taylorseer"]["transformer_calls"] < 12
    assert benchmark["runners"]["genai+taylorseer"]["taylorseer"]["cache_interval"] >= 2
    import torch

    assert benchmark["runners"]["diffusers-bf16"]["torch"] == torch.__version__


def test_benchmark_pictures_show_what_caching_costs(benchmark):
    """Each runner's seed-0 picture (torch's noise, drawn alike by all) against ovsd3's, recomputed from the files:
    genai without caching draws ovsd3's picture; its TaylorSeer and ovsd3's draw further from it, and alike."""
    out, runners = Path(benchmark["out"]), benchmark["runners"]
    reference = rgb(out / runners["ovsd3"]["image"])
    assert runners["ovsd3"]["image_psnr_db"] is None
    for name, runner in runners.items():
        if name != "ovsd3":
            assert runner["image_psnr_db"] == pytest.approx(psnr(reference, rgb(out / runner["image"]),
                                                                 data_range=255.0))
    assert runners["genai"]["image_psnr_db"] > 30.0 and runners["diffusers-fp32"]["image_psnr_db"] > 30.0
    assert runners["genai+taylorseer"]["image_psnr_db"] < runners["genai"]["image_psnr_db"]
    assert runners["ovsd3 taylorseer"]["image_psnr_db"] < runners["genai"]["image_psnr_db"]
    assert f"| {runners['genai+taylorseer']['image_psnr_db']:.1f} |" in (out / "benchmark.md").read_text()


def test_benchmark_files(benchmark):
    out = Path(benchmark["out"])
    assert benchmark["files"] == {"markdown": "benchmark.md", "chart": "benchmark.png", "images": "images"}
    with Image.open(out / "benchmark.png") as chart:
        assert chart.size == (1100, 420)
    text = (out / "benchmark.md").read_text()
    assert all(name in text for name in benchmark["runners"])
    assert f"{benchmark['runners']['genai']['batches']['2']['images_per_second']:.3f}" in text


def test_benchmark_without_peers_and_flash_diffusers(tmp_path, ov_sd3, ov_flash):
    assert main(["benchmark", str(ov_sd3), "--batch", "1", "--steps", "1", "--repeats", "1",
                 "--out", str(tmp_path / "alone")]) == 0  # no --size: the model's own (128 for the tiny one)
    alone = json.loads((tmp_path / "alone" / "benchmark.json").read_text())
    assert set(alone["runners"]) == {"ovsd3"} and alone["settings"]["width"] == 128
    # A Flash folder: diffusers gets the same merged LoRA and the folder's stochastic scheduler; its PyTorch
    # model is found from the folder's record (the local folder it was converted from).
    assert main(["benchmark", str(ov_flash), "--batch", "1", "--size", "64", "--repeats", "1", "--peers",
                 "diffusers", "--out", str(tmp_path / "flash")]) == 0
    flash = json.loads((tmp_path / "flash" / "benchmark.json").read_text())
    assert set(flash["runners"]) == {"ovsd3", "diffusers-fp32", "diffusers-bf16"}
    assert flash["settings"]["steps"] == 4 and flash["settings"]["guidance_scale"] == 0.0


@pytest.mark.parametrize("args, expected", [
    (["--batch", "0"], "batch sizes must be positive"),
    (["--batch", "one"], "--batch takes"),
    (["--peers", "comfy"], "--peers takes"),
    (["--peers", "diffusers", "--torch-model", "/nowhere/model"], "diffusers cannot load"),
    (["--size", "60"], "multiple of 16"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),  # not silently the folder's 28
])
def test_benchmark_errors_are_one_line(args, expected, tmp_path, capsys, ov_sd3):
    out = tmp_path / "bench"
    code = main(["benchmark", str(ov_sd3), "--size", "64", "--steps", "1", "--repeats", "1", "--batch", "1",
                 *args, "--out", str(out)])
    assert code == EXIT_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("ovsd3 benchmark: error: ") and expected in error and "\n" not in error
    assert not out.exists()


def test_report_cache_modes_are_columns(tmp_path, ov_sd3):
    out = tmp_path / "cache-report"
    assert main(["report", str(ov_sd3), "--cache", "off", "--cache", "taylorseer", "--prompts", "1", "--steps", "12",
                 "--guidance", "5", "--size", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    labels = [folder["label"] for folder in report["folders"]]
    assert labels == [ov_sd3.name, f"{ov_sd3.name} taylorseer"]
    off, cached = report["folders"]
    assert (off["cache"], off["speed"]["transformer_calls"]) == ("off", 12)
    assert (cached["cache"], cached["speed"]["transformer_calls"]) == ("taylorseer", 9)
    assert cached["speed"]["work"] == pytest.approx(9 / 12)
    # against the uncached column's images, the same prompt and seed
    assert cached["quality"]["psnr_db"] == pytest.approx(
        [psnr(rgb(out / a), rgb(out / b), data_range=255.0) for a, b in zip(off["images"], cached["images"])])
    assert "| transformer work" in (out / "report.md").read_text()


def test_report_digits_scores_every_folder(tmp_path, ov_sd3, q_sd3):
    """--digits: the demo's prompts and scorer (here on random tiny models, so the plumbing is what is checked:
    the scores are the scorer's verdicts on the report's own images)."""
    from ovsd3.demo.digits import DigitScorer, evaluation_prompts

    out = tmp_path / "digits"
    assert main(["report", str(ov_sd3), str(q_sd3), "--digits", "--prompts", "4", "--size", "64", "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["digits"] is True and report["settings"]["prompts"] == evaluation_prompts(4)
    scorer = DigitScorer()
    for folder in report["folders"]:
        digits = folder["quality"]["digits"]
        assert set(digits) == {"accuracy", "digit_accuracy", "colour_accuracy", "matches"}
        expected = scorer.score([Image.open(out / path) for path in folder["images"]], evaluation_prompts(4))
        assert digits["matches"] == expected.matches and digits["accuracy"] == expected.accuracy
    assert "digits matching the prompt" in (out / "report.md").read_text()


def test_report_genai_columns_draw_the_same_prompts(tmp_path, ov_sd3):
    """--genai: openvino.genai draws the first folder's prompts and seeds, caching off (the same pictures as
    ovsd3's, since its TorchGenerator draws the same noise) and on (its TaylorSeer schedule: fewer calls)."""
    out = tmp_path / "genai-report"
    assert main(["report", str(ov_sd3), "--genai", "--prompts", "2", "--steps", "12", "--guidance", "5",
                 "--size", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    ours, genai, cached = report["folders"]
    assert [folder["label"] for folder in report["folders"]] == [
        ov_sd3.name, f"genai {ov_sd3.name}", f"genai {ov_sd3.name} taylorseer"]
    assert [folder["runner"] for folder in report["folders"]] == ["ovsd3", "genai", "genai"]
    assert genai["speed"]["transformer_calls"] == 12 and cached["speed"]["transformer_calls"] < 12
    for folder in (genai, cached):
        assert folder["speed"]["step_seconds"]["n"] == 2 * 12
        assert set(folder["speed"]["first_start"]) == {"no_cache"}
        images = [rgb(out / path) for path in folder["images"]]
        assert psnr(rgb(out / ours["images"][0]), images[0], data_range=255.0) == pytest.approx(
            folder["quality"]["psnr_db"][0])
    assert genai["quality"]["mean_psnr_db"] > 30.0  # the same picture, up to bf16 kernels
    assert genai["quality"]["mean_psnr_db"] > cached["quality"]["mean_psnr_db"]
    text = (out / "report.md").read_text()
    assert f"| genai {ov_sd3.name} | genai {ov_sd3.name} taylorseer |" in text
    assert " | - | - |" in text  # genai's first start from a model cache is not measured


# -- non-square images: --width/--height, as `ovsd3 run` takes them ------------------------------------------------

WIDE, TALL = (128, 64), (64, 128)  # (width, height); the tiny model draws multiples of 16 up to 384


def test_report_draws_width_by_height(tmp_path, ov_sd3):
    """Every column, openvino.genai's too, draws WIDTHxHEIGHT pictures, and the report says so."""
    width, height = WIDE
    out = tmp_path / "wide-report"
    assert main(["report", str(ov_sd3), "--genai", "--prompts", "1", "--steps", "1", "--width", str(width),
                 "--height", str(height), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["width"], report["settings"]["height"]) == WIDE
    assert [folder["runner"] for folder in report["folders"]] == ["ovsd3", "genai", "genai"]
    for folder in report["folders"]:
        assert [Image.open(out / path).size for path in folder["images"]] == [WIDE]
    assert report["folders"][1]["quality"]["mean_psnr_db"] > 30.0  # genai drew the same wide picture
    assert report["grid"]["cell_width"] == 2 * report["grid"]["cell_height"]
    assert f"{width}x{height}" in (out / "report.md").read_text()


def test_benchmark_draws_width_by_height_in_every_runner(tmp_path, ov_sd3, tiny_sd3):
    """ovsd3 and each peer (genai, diffusers) are given width and height: each one's picture is WIDTHxHEIGHT and
    genai's and diffusers' fp32 one is ovsd3's."""
    width, height = TALL
    out = tmp_path / "tall-benchmark"
    assert main(["benchmark", str(ov_sd3), "--batch", "1", "--steps", "2", "--repeats", "1", "--width", str(width),
                 "--height", str(height), "--peers", "--torch-model", str(tiny_sd3), "--out", str(out)]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert (result["settings"]["width"], result["settings"]["height"]) == TALL
    runners = result["runners"]
    assert set(runners) == {"ovsd3", "genai", "genai+taylorseer", "diffusers-fp32", "diffusers-bf16"}
    for runner in runners.values():
        assert Image.open(out / runner["image"]).size == TALL
    assert runners["genai"]["image_psnr_db"] > 30.0 and runners["diffusers-fp32"]["image_psnr_db"] > 30.0
    assert f"{width}x{height}" in (out / "benchmark.md").read_text()


def test_width_alone_keeps_the_native_height(tmp_path, ov_sd3):
    """As `ovsd3 run`: the side not given is the model's native one (128 for the tiny model)."""
    out = tmp_path / "wide-alone"
    assert main(["benchmark", str(ov_sd3), "--batch", "1", "--steps", "1", "--repeats", "1", "--width", "64",
                 "--out", str(out)]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert (result["settings"]["width"], result["settings"]["height"]) == (64, 128)
    assert Image.open(out / result["runners"]["ovsd3"]["image"]).size == (64, 128)
    assert "64x128" in (out / "benchmark.md").read_text()


def _size_error(size, width, height) -> str | None:
    """What the command must say of these options on the tiny model (multiples of 16 up to 384), or None."""
    if size is not None and (width is not None or height is not None):
        return "--size is the square shorthand for --width and --height"
    given = {"--size": size} if size is not None else {"--width": width, "--height": height}
    for name, value in given.items():
        if value is not None and (value <= 0 or value % 16):
            return f"{name} must be a positive multiple of 16 (got {value})"
        if value is not None and value > 384:
            return f"{name} {value} is more than"
    return None


SIDES = st.one_of(st.none(), st.integers(-64, 1000), st.sampled_from([0, 16, 60, 384, 385, 400, 2**40]))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["report", "benchmark"]), size=SIDES, width=SIDES, height=SIDES)
@example(command="benchmark", size=400, width=None, height=None)  # each bound once for sure, then generated
@example(command="report", size=None, width=64, height=400)
@example(command="benchmark", size=None, width=2**40, height=None)
@example(command="report", size=None, width=60, height=None)
@example(command="benchmark", size=None, width=None, height=0)
@example(command="benchmark", size=64, width=None, height=64)
def test_image_size_options_end_in_one_line(command, size, width, height, ov_sd3, tmp_path_factory, capsys):
    """Every bad --size/--width/--height mix is refused in one line naming the option, before any work."""
    from hypothesis import assume

    expected = _size_error(size, width, height)
    assume(expected is not None)  # a good size would run the whole command
    out = tmp_path_factory.mktemp("sizes") / "out"
    options = [f"--{name}={value}" for name, value in (("size", size), ("width", width), ("height", height))
               if value is not None]
    folders = [str(ov_sd3)] * (2 if command == "report" else 1)
    capsys.readouterr()
    assert main([command, *folders, "--steps", "1", *options, "--out", str(out)]) == EXIT_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"ovsd3 {command}: error: ") and "\n" not in error
    assert expected in error
    assert not out.exists()


def test_image_size_in_the_python_api(ov_sd3):
    """ReportRequest and BenchmarkRequest take diffusers' width and height: whole numbers (numpy's too), the
    missing side the model's native one; a float or a string is refused in one line, not passed to the children."""
    from ovsd3.errors import OvsdError
    from ovsd3.report.settings import image_size

    model = layout.ModelFolder.open(ov_sd3)
    assert image_size(None, None, None, model) == (128, 128)
    assert image_size(64, None, None, model) == (64, 64)
    sides = image_size(None, np.int64(64), None, model)
    assert sides == (64, 128) and all(type(side) is int for side in sides)  # JSON for the children
    for bad, expected in (((None, 64.0, None), "--width must be a whole number"),
                          ((None, None, "64"), "--height must be a whole number"),
                          ((True, None, None), "--size must be a whole number"),
                          ((64, None, 64), "--size is the square shorthand")):
        with pytest.raises(OvsdError, match=expected):
            image_size(*bad, model)


def test_report_scores_control_images_through_controlnet_folders(tmp_path, cn_folder, ov_sd3):
    """With a ControlNet in the first folder and the digits scored, the report draws the demo's control questions
    through each folder that has one (here random tiny models: the plumbing is what is checked; the demo's own
    share is in demo/README.md): the control images are the questions' outlines, the pictures are ovsd3's
    pictures with those control images, the figures are the scorer's verdicts on them."""
    from ovsd3.demo.control import control_cases, score_control
    from ovsd3.demo.digits import DigitScorer
    from ovsd3.runtime import SD3Pipeline

    out = tmp_path / "control"
    assert main(["report", str(cn_folder), str(ov_sd3), "--digits", "--prompts", "1", "--control-cases", "3",
                 "--size", "64", "--steps", "2", "--seed", "5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    control, cases = report["control"], control_cases(3)
    assert control["cases"] == 3 and control["seeds"] == [5, 6, 7]
    assert [rgb(out / path).astype(np.uint8).tobytes() for path in control["control_images"]] == [
        case.control.tobytes() for case in cases]
    drawn, plain = control["folders"]
    assert plain is None  # the second folder has no ControlNet
    pipe = SD3Pipeline.load(cn_folder, device="CPU", cache_dir=None)
    expected = pipe(cases[1].prompt, control_image=Image.fromarray(cases[1].control), seed=6, num_inference_steps=2,
                    width=64, height=64, guidance_scale=report["settings"]["guidance_scale"]).images[0]
    assert psnr(rgb(out / drawn["images"][1]), np.asarray(expected, dtype=np.float64), data_range=255.0) > 40
    verdict = score_control(DigitScorer(), [Image.open(out / path) for path in drawn["images"]], cases).to_json()
    assert {key: drawn[key] for key in verdict} == verdict
    check_spread(drawn["step_seconds"], 3 * 2)
    assert report["folders"][0]["size"]["components"]["controlnet"] == layout.ir_bytes(cn_folder, "controlnet")
    assert (out / "control.png").exists() and report["files"]["control_grid"] == "control.png"
    text = (out / "report.md").read_text()
    assert "## Following a control image (ControlNet)" in text and "![control images" in text


@pytest.mark.parametrize("args, expected", [
    (["--control"], "--control scores the digits demo's ControlNet"),
    (["--digits", "--control"], "none of the folders has a ControlNet"),
    (["--digits", "--control", "--control-cases", "0"], "--control-cases must be between 1 and 1000"),
])
def test_report_control_errors_are_one_line(args, expected, tmp_path, capsys, ov_sd3, cn_folder):
    folders = [str(ov_sd3), str(ov_sd3)] if "none of" in expected else [str(cn_folder), str(ov_sd3)]
    assert main(["report", *folders, "--size", "64", "--out", str(tmp_path / "r"), *args]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and not (tmp_path / "r").exists()
