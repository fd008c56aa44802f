"""The flow-matching schedule and sampler steps, in numpy.

A transcription of diffusers' FlowMatchEulerDiscreteScheduler for the configurations SD3 and SD3.5 use,
dtype for dtype, so that the sigmas match it bit for bit. Configurations this does not implement are
refused with a clear message rather than sampled differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.errors import OvsdError

# Options of FlowMatchEulerDiscreteScheduler that change the schedule and are not implemented here.
_UNSUPPORTED = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "invert_sigmas", "shift_terminal")


@dataclass(frozen=True)
class FlowMatchSchedule:
    shift: float = 3.0
    num_train_timesteps: int = 1000
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        # A NaN shift draws noise with exit 0, a zero one divides by zero, a huge step count sizes an array.
        layout.check_fields(Path("FlowMatchSchedule"), {"shift": self.shift,
                                                        "num_train_timesteps": self.num_train_timesteps},
                            layout.SCHEDULER_FIELDS)

    @classmethod
    def from_config(cls, config: dict, path: Path = Path(layout.SCHEDULER_CONFIG)) -> "FlowMatchSchedule":
        layout.check_scheduler_config(path, config)
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise OvsdError(f"scheduler {name} is not supported (ovsd3 runs FlowMatchEulerDiscreteScheduler)")
        enabled = [option for option in _UNSUPPORTED if config.get(option)]
        if enabled:
            raise OvsdError(f"scheduler option {enabled[0]}={config[enabled[0]]!r} is not supported by ovsd3 run")
        return cls(shift=float(config.get("shift", 3.0)),
                   num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   stochastic_sampling=bool(config.get("stochastic_sampling", False)))

    @classmethod
    def from_folder(cls, folder: Path) -> "FlowMatchSchedule":
        path = Path(folder) / layout.SCHEDULER_CONFIG
        return cls.from_config(layout.read_json(path), path)

    def _shifted(self, sigmas):
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def sigmas(self, num_inference_steps: int) -> np.ndarray:
        """``num_inference_steps + 1`` sigmas, from 1 down to a final 0 (float32)."""
        n = self.num_train_timesteps
        # The training schedule is float32 in diffusers; its ends fix the inference range.
        training = self._shifted(np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n))
        sigma_max, sigma_min = float(training[0]), float(training[-1])
        timesteps = np.linspace(sigma_max * n, sigma_min * n, num_inference_steps)  # float64, as diffusers
        sigmas = self._shifted(timesteps / n).astype(np.float32)
        return np.append(sigmas, np.float32(0.0))

    def timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The transformer's timestep input for each step (sigma scaled to the training range)."""
        return (sigmas[:-1] * np.float32(self.num_train_timesteps)).astype(np.float32)


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first step run for img2img at ``strength`` (diffusers' get_timesteps)."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_timestep, 0))


def euler_step(latents: np.ndarray, velocity: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """Deterministic flow-matching Euler step: x + (sigma_next - sigma) * v."""
    return (latents + np.float32(sigma_next - sigma) * velocity).astype(np.float32)


def predicted_clean(latents: np.ndarray, velocity: np.ndarray, sigma: float) -> np.ndarray:
    """The model's estimate of the final image latents at this step: x0 = x - sigma * v."""
    return (latents - np.float32(sigma) * velocity).astype(np.float32)


def flash_step(latents: np.ndarray, velocity: np.ndarray, sigma: float, sigma_next: float,
               noise: np.ndarray) -> np.ndarray:
    """Flash SD3's stochastic step: re-noise the clean estimate to the next sigma (x0 at the last step)."""
    clean = predicted_clean(latents, velocity, sigma)
    return ((1.0 - np.float32(sigma_next)) * clean + np.float32(sigma_next) * noise).astype(np.float32)


def add_noise(clean: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """Latents at noise level ``sigma`` (scale_noise): sigma * noise + (1 - sigma) * x0."""
    return (np.float32(sigma) * noise + (1.0 - np.float32(sigma)) * clean).astype(np.float32)
