"""Calibration data: the transformer's real inputs, recorded while the OpenVINO pipeline samples prompts.

One sample is one transformer call (a batch of 2 with classifier-free guidance), as in the published
recipe: 200 samples = 50 prompts x 4 steps for a Flash model. Each prompt's final latents are kept too,
as the VAE decoder receives them, to calibrate the decoder on the same run (one sample per prompt).
Samples are written to disk prompt by prompt, so a crash later (in quantization, say) does not repeat the
sampling, and NNCF reads them back one at a time instead of holding hundreds of megabytes in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ovsd3 import layout
from ovsd3.atomic import clear_dead_leftovers
from ovsd3.errors import OvsdError, reason_of
from ovsd3.progress import ProgressBar
from ovsd3.runtime.pipeline import SD3Pipeline, offload_advised

BUILTIN = "builtin"
CONCEPTUAL_CAPTIONS = "conceptual_captions"
CONCEPTUAL_CAPTIONS_REPO = "google-research-datasets/conceptual_captions"
INPUT_NAMES = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
PARTIAL_SAMPLES = r"\.prompt_\d+\.(?P<pid>\d+)\.tmp\.npz"  # a prompt's file being written, by the run with that pid
DECODER_INPUT = "latent_sample"  # the VAE decoder IR's input: final latents / scaling_factor + shift_factor


def builtin_prompts() -> list[str]:
    from ovsd3.calibration import calibration_prompts

    return calibration_prompts()


def load_prompts(dataset: str, count: int, log: Callable[[str], None] = print) -> list[str]:
    """``count`` prompts from the built-in set, conceptual_captions (streamed), or a file (one a line)."""
    if dataset == BUILTIN:
        prompts = builtin_prompts()
    elif dataset == CONCEPTUAL_CAPTIONS:
        try:
            from datasets import load_dataset

            stream = load_dataset(CONCEPTUAL_CAPTIONS_REPO, split="train", streaming=True)
            prompts = [row["caption"] for _, row in zip(range(count), stream)]
        except Exception as error:  # no `datasets`, no network, hub refusing: all the same to the user
            reason = reason_of(error)
            log(f"note: cannot stream {CONCEPTUAL_CAPTIONS_REPO} ({reason[:120]}); using ovsd3's built-in prompt "
                f"set instead (ovsd3/calibration/prompts.txt, 400 captions of the same kind)")
            prompts = builtin_prompts()
    else:
        from ovsd3.prompt_file import read_prompt_file

        prompts = read_prompt_file(dataset)
    if not prompts:
        raise OvsdError(f"no calibration prompts from {dataset}")
    return [prompts[i % len(prompts)] for i in range(count)]  # a short list is reused in order


@dataclass(frozen=True)
class CalibrationPlan:
    samples: int  # transformer calls to record
    size: int  # pixels, square
    steps: int
    guidance_scale: float
    seed: int = 0

    @property
    def prompts_needed(self) -> int:
        return math.ceil(self.samples / self.steps)


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ovsd3" / "calibration"


def cache_key(folder: Path, plan: CalibrationPlan, prompts: list[str]) -> str:
    """Changes whenever the recorded inputs would: the transformer, the plan or the prompts."""
    weights = layout.model_xml(folder, layout.TRANSFORMER).with_suffix(".bin").stat()
    text = json.dumps([str(folder.resolve()), weights.st_size, weights.st_mtime_ns, asdict(plan), prompts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _RecordingPipeline(SD3Pipeline):
    """The runtime pipeline, keeping a copy of every transformer input."""

    recorded: list

    def run_transformer(self, inputs):
        self.recorded.append({name: np.array(inputs[name]) for name in INPUT_NAMES})
        return super().run_transformer(inputs)


def _is_recorded(path: Path) -> bool:
    """A prompt's file exists and holds its final latents (caches written before ovsd3 kept them do not)."""
    if not path.exists():
        return False
    with np.load(path) as arrays:
        return DECODER_INPUT in arrays.files


def _decoder_input(pipe: SD3Pipeline, latents: np.ndarray) -> np.ndarray:
    # What SD3Pipeline.decode hands the decoder; computed here so calibration never runs the decoder itself.
    return (latents / pipe.scaling_factor + pipe.shift_factor).astype(np.float32)


def record(folder: Path, plan: CalibrationPlan, prompts: list[str], cache_dir: Path,
           log: Callable[[str], None] = print, device: str = "CPU") -> Path:
    """Sample ``prompts`` with the folder's own pipeline and write each prompt's transformer inputs and
    final latents to ``cache_dir``. Prompts already recorded there are skipped (resume after a crash)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    clear_dead_leftovers(cache_dir, PARTIAL_SAMPLES)
    manifest = cache_dir / "plan.json"
    manifest.write_text(json.dumps({"plan": asdict(plan), "prompts": prompts}, indent=1))
    files = [cache_dir / f"prompt_{i:05d}.npz" for i in range(len(prompts))]
    todo = [i for i, path in enumerate(files) if not _is_recorded(path)]
    if len(todo) < len(prompts):
        log(f"calibration cache {cache_dir}: {len(prompts) - len(todo)} of {len(prompts)} prompts already recorded")
    stale = sum(files[i].exists() for i in todo)
    if stale:
        log(f"calibration cache {cache_dir}: {stale} prompt(s) recorded by an older ovsd3 lack their final latents, "
            f"which the VAE decoder is calibrated on: recording them again")
    if not todo:
        return cache_dir
    pipe = _RecordingPipeline.load(folder, device=device, cache_dir=None, offload=offload_advised(folder))
    progress = ProgressBar(unit="prompt")
    for done, index in enumerate(todo, 1):
        pipe.recorded = []
        job = pipe.prepare(prompts[index], num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
                           width=plan.size, height=plan.size, seed=plan.seed + index)
        for _ in pipe.steps(job):
            pass  # the transformer inputs are recorded as it runs; job.latents ends as the final latents
        arrays = {name: np.stack([call[name] for call in pipe.recorded]) for name in INPUT_NAMES}
        arrays[DECODER_INPUT] = _decoder_input(pipe, job.latents)
        partial = cache_dir / f".prompt_{index:05d}.{os.getpid()}.tmp.npz"
        np.savez(partial, **arrays)
        partial.replace(files[index])  # a killed run never leaves half a file
        progress(done, len(todo))
    return cache_dir


def iterate_samples(cache_dir: Path, count: int) -> Iterator[dict[str, np.ndarray]]:
    """The first ``count`` recorded transformer calls, read from disk one prompt at a time."""
    produced = 0
    for path in sorted(cache_dir.glob("prompt_*.npz")):
        with np.load(path) as arrays:
            calls = {name: arrays[name] for name in INPUT_NAMES}
        for call in range(len(calls["timestep"])):
            if produced == count:
                return
            yield {name: calls[name][call] for name in INPUT_NAMES}
            produced += 1


class RecordedSamples:
    """An iterable NNCF can go over several times (statistics, SmoothQuant, bias correction)."""

    def __init__(self, cache_dir: Path, count: int):
        self.cache_dir, self.count = cache_dir, count

    def __iter__(self):
        return iterate_samples(self.cache_dir, self.count)

    def __len__(self) -> int:
        return self.count


class RecordedLatents:
    """The VAE decoder's calibration set: the final latents of the cache's first ``count`` prompts, as the
    decoder's input (``{"latent_sample": array of (1, 16, h, w)}``), read from disk one at a time."""

    def __init__(self, cache_dir: Path, count: int):
        self.cache_dir, self.count = cache_dir, count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for path in sorted(self.cache_dir.glob("prompt_*.npz"))[:self.count]:
            with np.load(path) as arrays:
                if DECODER_INPUT not in arrays.files:
                    raise OvsdError(f"{path} holds no final latents (recorded by an older ovsd3): delete the "
                                    f"calibration cache {self.cache_dir} and run again")
                latents = arrays[DECODER_INPUT]
            yield {DECODER_INPUT: latents}

    def __len__(self) -> int:
        return self.count
