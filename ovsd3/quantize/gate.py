"""The quality gate: the full-precision and the quantized folders draw the same held-out prompts with the
same seeds, and their images and per-step transformer outputs are compared."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovsd3.metrics import psnr, ssim
from ovsd3.runtime.pipeline import SD3Pipeline, offload_advised

# Defaults: loose enough for INT8 drift along a sampling trajectory, tight enough to catch a broken
# quantization (which draws noise: well under 12 dB and SSIM near 0 against the original).
DEFAULT_MIN_PSNR = 15.0
DEFAULT_MIN_SSIM = 0.4


@dataclass(frozen=True)
class GateSettings:
    prompts: tuple[str, ...]
    size: int
    steps: int
    guidance_scale: float
    min_psnr: float = DEFAULT_MIN_PSNR  # mean image PSNR, dB
    min_ssim: float = DEFAULT_MIN_SSIM  # mean image SSIM
    seed: int = 1234
    # The digits demo: the share of images whose digit and colour match the prompt may fall by at most this
    # much (0.15 = 15 points) from the original's. INT8 costs it about 5 points (94.6% against 99.6% over 240
    # prompts), and 20 held-out prompts measure that to +-5 (one prompt is 5 points): under a 5-point limit the
    # quickstart's INT8 folder passed at 95% and failed at 90% in two runs, while a broken quantization draws
    # next to no digits. None: not scored.
    max_digit_drop: float | None = None
    # A folder with ControlNets: this many of the prompts are drawn again with control (each ControlNet given
    # the original's plain picture of that prompt: a control image both folders see alike), under the same
    # PSNR and SSIM bounds; 0: none.
    control_prompts: int = 0


@dataclass
class GateReport:
    image_psnr: list[float] = field(default_factory=list)
    image_ssim: list[float] = field(default_factory=list)
    step_psnr: list[float] = field(default_factory=list)  # transformer outputs, mean over prompts, per step
    digit_accuracy: dict[str, float] | None = None  # {"reference": ..., "candidate": ...} for the digits demo
    control_psnr: list[float] = field(default_factory=list)  # the pictures drawn with ControlNets
    control_ssim: list[float] = field(default_factory=list)
    passed: bool = False

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.image_psnr))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean(self.image_ssim))

    def as_dict(self) -> dict:
        return {"image_psnr": self.image_psnr, "image_ssim": self.image_ssim, "step_psnr": self.step_psnr,
                "mean_psnr": self.mean_psnr, "mean_ssim": self.mean_ssim, "digit_accuracy": self.digit_accuracy,
                **({"control_psnr": self.control_psnr, "control_ssim": self.control_ssim}
                   if self.control_psnr else {}),
                "passed": self.passed}


def _generate(folder: Path, settings: GateSettings, controls: list | None = None):
    """The folder's pictures of the prompts, its transformer outputs, and (with ``control_prompts``) its
    pictures drawn with control and the control images used (``controls``, or its own plain pictures)."""
    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None, offload=offload_advised(folder))
    images, outputs = _plain(pipe, settings)
    controlled = []
    if settings.control_prompts:
        from PIL import Image

        count = min(settings.control_prompts, len(settings.prompts))
        controls = controls or [Image.fromarray(image.astype(np.uint8)) for image in images[:count]]
        nets = len(pipe.controlnets)
        mask = _control_mask(pipe, settings.size)
        for index, (prompt, control) in enumerate(zip(settings.prompts, controls)):
            result = pipe(prompt, width=settings.size, height=settings.size, num_inference_steps=settings.steps,
                          guidance_scale=settings.guidance_scale, seed=settings.seed + index,
                          control_image=[control] * nets if nets > 1 else control, **mask)
            controlled.append(np.asarray(result.images[0], dtype=np.float64))
    del pipe
    gc.collect()  # one pipeline in memory at a time
    return images, outputs, controlled, controls


def _control_mask(pipe, size: int) -> dict:
    """``control_mask=`` for a folder with an inpainting ControlNet: the centre square it was calibrated with."""
    if not any(net.takes_mask for net in pipe.controlnets):
        return {}
    from ovsd3.quantize.controlnet import calibration_mask

    return {"control_mask": calibration_mask(size, size)}


def _plain(pipe, settings: GateSettings) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    images, outputs = [], []
    for index, prompt in enumerate(settings.prompts):
        calls: list[np.ndarray] = []  # every transformer output of this generation
        pipe.transformer.observers[:] = [lambda inputs, out, calls=calls: calls.append(np.array(out))]
        result = pipe(prompt, width=settings.size, height=settings.size, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance_scale, seed=settings.seed + index)
        images.append(np.asarray(result.images[0], dtype=np.float64))  # float before any difference
        outputs.append(calls)
    pipe.transformer.observers[:] = []
    return images, outputs


def run_gate(reference: Path, candidate: Path, settings: GateSettings) -> GateReport:
    reference_images, reference_outputs, reference_controlled, controls = _generate(reference, settings)
    candidate_images, candidate_outputs, candidate_controlled, _ = _generate(candidate, settings, controls)
    report = GateReport(
        image_psnr=[psnr(a, b, data_range=255.0) for a, b in zip(reference_images, candidate_images)],
        image_ssim=[ssim(a, b, data_range=255.0) for a, b in zip(reference_images, candidate_images)],
        step_psnr=[float(np.mean([psnr(ref[step], cand[step])
                                  for ref, cand in zip(reference_outputs, candidate_outputs)]))
                   for step in range(settings.steps)],
    )
    report.control_psnr = [psnr(a, b, data_range=255.0) for a, b in zip(reference_controlled, candidate_controlled)]
    report.control_ssim = [ssim(a, b, data_range=255.0) for a, b in zip(reference_controlled, candidate_controlled)]
    report.passed = report.mean_psnr >= settings.min_psnr and report.mean_ssim >= settings.min_ssim
    if report.control_psnr:
        report.passed = report.passed and float(np.mean(report.control_psnr)) >= settings.min_psnr \
            and float(np.mean(report.control_ssim)) >= settings.min_ssim
    if settings.max_digit_drop is not None:
        from ovsd3.demo.digits import DigitScorer

        scorer = DigitScorer()
        report.digit_accuracy = {
            name: scorer.score([image.astype(np.uint8) for image in images], list(settings.prompts)).accuracy
            for name, images in (("reference", reference_images), ("candidate", candidate_images))}
        report.passed = report.passed and (report.digit_accuracy["candidate"]
                                           >= report.digit_accuracy["reference"] - settings.max_digit_drop)
    return report
