"""Tiny random SD3 pipelines, built in code (no model hub), and their converted folders.

Conversions take tens of seconds each, so each folder is made once per test session and shared.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


def _convert(model: Path, out: Path, **kwargs) -> Path:
    from ovsd3.convert import ConvertRequest, convert_model

    convert_model(ConvertRequest(model=str(model), output=out, **kwargs), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ovsd3")


@pytest.fixture(scope="session")
def tiny_sd3(workdir) -> Path:
    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    return save_random_pipeline(get_preset("tiny"), workdir / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sd35(workdir) -> Path:
    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    return save_random_pipeline(get_preset("tiny-sd3.5"), workdir / "tiny-sd3.5", seed=1)


@pytest.fixture(scope="session")
def tiny_sd3_without_t5(workdir) -> Path:
    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    return save_random_pipeline(get_preset("tiny"), workdir / "tiny-sd3-no-t5", with_t5=False, seed=2)


@pytest.fixture(scope="session")
def tiny_sd3_fp16(workdir) -> Path:
    """Stored in fp16, as the real SD3 checkpoints are: the transformer and T5 export from 16-bit."""
    import torch

    from ovsd3.presets import get_preset
    from ovsd3.synthetic import save_random_pipeline

    return save_random_pipeline(get_preset("tiny"), workdir / "tiny-sd3-fp16", dtype=torch.float16, seed=4)


@pytest.fixture(scope="session")
def tiny_flash_adapter(workdir, tiny_sd3) -> Path:
    """A random PEFT adapter with the Flash SD3 adapter's target modules, for the tiny transformer."""
    from diffusers import SD3Transformer2DModel

    from ovsd3.synthetic import save_random_lora

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    return save_random_lora(transformer, workdir / "tiny-flash-lora", seed=3)


@pytest.fixture(scope="session")
def ov_sd3(workdir, tiny_sd3) -> Path:
    return _convert(tiny_sd3, workdir / "ov-sd3")


@pytest.fixture(scope="session")
def ov_sd3_fp32(workdir, tiny_sd3) -> Path:
    return _convert(tiny_sd3, workdir / "ov-sd3-fp32", weight_format="fp32")


@pytest.fixture(scope="session")
def ov_sd35(workdir, tiny_sd35) -> Path:
    return _convert(tiny_sd35, workdir / "ov-sd3.5")


@pytest.fixture(scope="session")
def ov_flash(workdir, tiny_sd3, tiny_flash_adapter) -> Path:
    """The published recipe's shape: Flash LoRA merged, no T5."""
    return _convert(tiny_sd3, workdir / "ov-flash", flash_lora=str(tiny_flash_adapter), with_t5=False)


@pytest.fixture(scope="session")
def ov_sd35_fp32(workdir, tiny_sd35) -> Path:
    return _convert(tiny_sd35, workdir / "ov-sd3.5-fp32", weight_format="fp32")


@pytest.fixture(scope="session")
def ov_no_t5_fp32(workdir, tiny_sd3) -> Path:
    return _convert(tiny_sd3, workdir / "ov-no-t5-fp32", weight_format="fp32", with_t5=False)


@pytest.fixture(scope="session")
def q_sd3(workdir, ov_sd3) -> Path:
    """Quantized in two slices of blocks, the path SD3 Medium takes on a 24 GB machine."""
    from helpers import quantize

    out = workdir / "q-sd3"
    assert quantize(ov_sd3, out, "--slices", "2") == 0
    return out


@pytest.fixture
def model_copy(ov_sd3, tmp_path) -> Path:
    """A converted model the test may see destroyed (the session's stays safe whatever happens)."""
    return Path(shutil.copytree(ov_sd3, tmp_path / "model"))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model loading, measuring child or calibration fails the test: a refusal must come before work."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr("ovsd3.runtime.pipeline.SD3Pipeline.load", refuse)
    monkeypatch.setattr("ovsd3.report.compare.run_child", refuse)
    monkeypatch.setattr("ovsd3.report.benchmark.run_child", refuse)
    monkeypatch.setattr("ovsd3.quantize.calibration.record", refuse)


@pytest.fixture(scope="session")
def adapters(tiny_sd3, workdir) -> dict[str, Path]:
    """Two random PEFT adapters on the tiny transformer (rank 4, alpha 8 and rank 4, alpha 4), for the LoRA tests
    (merged and as branches)."""
    from diffusers import SD3Transformer2DModel

    from ovsd3.synthetic import save_random_lora

    folder = workdir / "lora"
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    return {"a": save_random_lora(transformer, folder / "a", lora_alpha=8.0, seed=1, std=0.1),
            "b": save_random_lora(transformer, folder / "b", lora_alpha=4.0, seed=2, std=0.1)}


@pytest.fixture(scope="session")
def cn_folder(workdir, tiny_sd3, ov_sd3) -> Path:
    """The tiny FP16 folder with one random InstantX-kind ControlNet beside its transformer (the quantize, service
    and report tests read it; none writes into it)."""
    from controlnet_folders import controlnet_source, with_controlnets

    source = controlnet_source(tiny_sd3, workdir / "cn-source")
    return with_controlnets(tiny_sd3, ov_sd3, [source], workdir / "cn-fp16", "fp16")
