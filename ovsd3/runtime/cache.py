"""Step caching: shortcuts that skip transformer work, chosen per call, each counting what it skipped.

A cache setting is a spec string, parts joined by ``+``, each ``name[:key=value,...]``:

- ``off`` (the default): every step runs the transformer, as diffusers does.
- ``taylorseer``: openvino.genai's TaylorSeer Lite, same schedule and defaults. A full transformer call
  every ``cache_interval`` (3) steps; none skipped before step ``disable_cache_before_step`` (6) or from
  ``disable_cache_after_step`` (-2: the last two steps) on; a skipped step is forecast from the last full
  call's output and its finite differences (``max_order`` 1, as genai; higher orders as an option).
- ``first-block-cache``: adaptive. Every step runs the transformer's first block; the remaining blocks run
  only when the first block's output has moved by more than ``threshold`` (relative mean absolute change)
  since the last full call; otherwise the output is forecast as TaylorSeer does (``max_order``).
  ``disable_cache_before_step``, ``disable_cache_after_step`` and ``max_skips`` (in a row) bound it.
- ``guidance-interval``: classifier-free guidance only while ``low <= sigma <= high``; other steps run the
  conditional batch alone (half the work). Combines with either cache: ``taylorseer+guidance-interval``.
- ``fast``: the recommended shortcut, chosen from the measured frontier on the demo model (README):
  ``first-block-cache:threshold=0.1+guidance-interval:high=0.8``.

Caching forecasts the guided velocity. Guidance is linear in the transformer's two outputs, so with a fixed
guidance scale this is exactly genai's forecast of both branches, combined.
"""

from __future__ import annotations

import math
import numbers
from types import MappingProxyType
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import numpy as np

from ovsd3.errors import InvalidRequest


class CacheSettingError(InvalidRequest):
    """A cache spec that cannot be used, explained in one line."""


@dataclass(frozen=True)
class TaylorSeer:
    name = "taylorseer"
    aliases = MappingProxyType({"interval": "cache_interval", "before": "disable_cache_before_step",
                                "after": "disable_cache_after_step", "order": "max_order"})

    cache_interval: int = 3
    disable_cache_before_step: int = 6
    disable_cache_after_step: int = -2  # negative: counted from the end, as genai
    max_order: int = 1

    def __post_init__(self):  # built in Python as well as parsed: the same checks either way
        _check_types(self)
        self.check()

    def check(self) -> None:
        if self.cache_interval < 2:
            raise CacheSettingError(f"taylorseer cache_interval must be at least 2 (got {self.cache_interval})")
        if self.disable_cache_before_step < 0:
            raise CacheSettingError("taylorseer disable_cache_before_step must not be negative "
                                    f"(got {self.disable_cache_before_step})")
        _check_order(self.name, self.max_order)


@dataclass(frozen=True)
class FirstBlockCache:
    name = "first-block-cache"
    aliases = MappingProxyType({"before": "disable_cache_before_step", "after": "disable_cache_after_step",
                                "order": "max_order"})

    threshold: float = 0.15
    disable_cache_before_step: int = 2
    disable_cache_after_step: int = -1
    max_skips: int = 3
    max_order: int = 0  # reuse the last whole call's output: on the demo, forecasting from it lost pictures

    def __post_init__(self):
        _check_types(self)
        self.check()

    def check(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise CacheSettingError(f"first-block-cache threshold must be between 0 and 1 (got {self.threshold})")
        if self.disable_cache_before_step < 0:
            raise CacheSettingError("first-block-cache disable_cache_before_step must not be negative "
                                    f"(got {self.disable_cache_before_step})")
        if self.max_skips < 1:
            raise CacheSettingError(f"first-block-cache max_skips must be at least 1 (got {self.max_skips})")
        _check_order(self.name, self.max_order)


@dataclass(frozen=True)
class GuidanceInterval:
    name = "guidance-interval"
    aliases = MappingProxyType({})

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        _check_types(self)
        self.check()

    def check(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise CacheSettingError(f"guidance-interval needs 0 <= low <= high <= 1 (got low {self.low}, "
                                    f"high {self.high})")

    def guides(self, sigma: float) -> bool:
        return self.low <= sigma <= self.high


def _check_types(setting) -> None:
    """Each setting's value of its declared kind: an integer (not a bool, not 2.5) or a finite number; a
    setting built in Python is refused in the same words as one parsed from a spec."""
    for item in fields(setting):
        value = getattr(setting, item.name)
        if item.type == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise CacheSettingError(f"{setting.name} {item.name} must be an integer (got {value!r})")
        if item.type == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                     or not math.isfinite(value)):
            raise CacheSettingError(f"{setting.name} {item.name} must be a finite number (got {value!r})")


def _check_order(name: str, order: int) -> None:
    if not 0 <= order <= 3:
        raise CacheSettingError(f"{name} max_order must be 0, 1, 2 or 3 (got {order})")


_KINDS = {kind.name: kind for kind in (TaylorSeer, FirstBlockCache, GuidanceInterval)}
# Names for whole specs. "fast": on the demo model (240 prompts, 28 steps, guidance 7) it draws 99.2% of the
# digits as asked against 99.6% uncached, for 39% of the transformer work at SD3 Medium's 24 blocks; the
# cheaper points of the frontier lose more than 2 points (README).
# The recommended trade, chosen on the demo's frontier (benchmarks/results/cache-quality): no digit lost on FP16,
# 1.3 points on INT8, a third of the transformer work.
PRESETS = MappingProxyType({"fast": "first-block-cache:threshold=0.15,order=0+guidance-interval:high=0.9"})


@dataclass(frozen=True)
class CacheConfig:
    """What a call may skip: at most one step cache and optionally a guidance interval."""

    step_cache: TaylorSeer | FirstBlockCache | None = None
    guidance_interval: GuidanceInterval | None = None

    def __post_init__(self):
        if not isinstance(self.step_cache, (TaylorSeer, FirstBlockCache, type(None))):
            raise CacheSettingError(f"step_cache must be a TaylorSeer, a FirstBlockCache or None (got "
                                    f"{type(self.step_cache).__name__})")
        if not isinstance(self.guidance_interval, (GuidanceInterval, type(None))):
            raise CacheSettingError(f"guidance_interval must be a GuidanceInterval or None (got "
                                    f"{type(self.guidance_interval).__name__})")

    @property
    def active(self) -> bool:
        return self.step_cache is not None or self.guidance_interval is not None

    @classmethod
    def parse(cls, spec: "str | CacheConfig | None") -> "CacheConfig":
        if spec is None:
            return cls()
        if isinstance(spec, CacheConfig):
            return spec
        if not isinstance(spec, str):
            raise CacheSettingError(f"cache must be a spec string such as 'taylorseer' (got {spec!r})")
        config = cls()
        spec = PRESETS.get(spec.strip().lower(), spec)
        for part in filter(None, (piece.strip() for piece in spec.strip().lower().split("+"))):
            if part in ("off", "none"):
                continue
            setting = _parse_part(part)
            if isinstance(setting, GuidanceInterval):
                config = replace(config, guidance_interval=setting)
            elif config.step_cache is not None:
                raise CacheSettingError(f"cache {spec!r}: choose one of taylorseer and first-block-cache")
            else:
                config = replace(config, step_cache=setting)
        return config

    def __str__(self) -> str:
        parts = [_format_part(setting) for setting in (self.step_cache, self.guidance_interval) if setting]
        return "+".join(parts) or "off"


def _parse_part(part: str):
    name, _, options = part.partition(":")
    kind = _KINDS.get(name.strip())
    if kind is None:
        raise CacheSettingError(f"unknown cache mode {name.strip()!r} (use off, {', '.join(PRESETS)}, "
                                f"{', '.join(_KINDS)})")
    known = {f.name: f.type for f in fields(kind) if f.init}
    values = {}
    for item in filter(None, (piece.strip() for piece in options.split(","))):
        key, equals, text = item.partition("=")
        key = kind.aliases.get(key.strip(), key.strip())
        if not equals or key not in known:
            raise CacheSettingError(f"{kind.name}: unknown setting {item!r} (settings: {', '.join(known)})")
        values[key] = _number(kind.name, key, text.strip(), float if known[key] == "float" else int)
    return kind(**values)  # checked as it is built


def _number(mode: str, key: str, text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise CacheSettingError(f"{mode} {key} must be {'a number' if kind is float else 'an integer'} "
                                f"(got {text!r})") from None
    if kind is float and not math.isfinite(value):
        raise CacheSettingError(f"{mode} {key} must be a finite number (got {text!r})")
    return value


def _format_part(setting) -> str:
    defaults = type(setting)()
    changed = [f"{key}={value}" for key, value in asdict(setting).items() if getattr(defaults, key) != value]
    return setting.name + (":" + ",".join(changed) if changed else "")


# -- per-generation state ---------------------------------------------------------------------------------

SKIP_LAYER_SHARE = 0.5  # a skip-layer guidance pass runs the conditional half of a guided step's batch


def _last_step(after: int, total: int) -> int:
    """genai's disable_cache_after_step: negative counts from the end."""
    return total + after if after < 0 else after


class TaylorFactors:
    """The last full output and its finite-difference derivatives (per step), to forecast skipped steps."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self.factors: list[np.ndarray] = []
        self.step: int | None = None

    def update(self, step: int, output: np.ndarray) -> None:
        factors = [np.array(output, dtype=np.float32)]
        if self.step is not None:
            gap = np.float32(step - self.step)
            for order in range(1, self.max_order + 1):
                if order > len(self.factors):
                    break
                factors.append((factors[order - 1] - self.factors[order - 1]) / gap)
        self.factors, self.step = factors, step

    def predict(self, step: int) -> np.ndarray:
        offset = np.float32(step - self.step)
        out = self.factors[0].copy()
        for order in range(1, len(self.factors)):
            out += self.factors[order] * (offset ** order / np.float32(math.factorial(order)))
        return out


@dataclass
class CacheStats:
    """What one generation ran. Work is counted in uncached steps: a whole call on the guided batch is 1, a
    step without guidance half as much, the first block alone 1 / blocks of that, and a skip-layer guidance
    pass (the conditional half, every block but the skipped ones) half: the same as a step without guidance,
    a slight overcount of the few blocks it skips."""

    steps: int = 0
    full_calls: int = 0
    partial_calls: int = 0  # first-block-cache: the first block alone
    unguided_steps: int = 0  # guidance-interval: conditional batch alone
    block_count: int = 1
    full_work: float = 0.0  # the whole calls' batch shares
    partial_work: float = 0.0  # the first-block-alone calls' batch shares, before dividing by the blocks
    skip_layer_steps: int = 0  # steps inside the skip-layer guidance window
    skip_layer_calls: int = 0  # skip-layer passes run (a step the cache skips skips its pass too)
    skip_layer_work: float = 0.0  # their batch shares

    @property
    def work(self) -> float:
        return self.work_with(self.block_count)

    def work_with(self, block_count: int) -> float:
        """The work the same calls would be on a transformer of ``block_count`` blocks (SD3 Medium has 24)."""
        return self.full_work + self.skip_layer_work + self.partial_work / block_count

    @property
    def uncached_work(self) -> float:
        """The work of the same generation with nothing skipped: every step guided and whole, every step of the
        skip-layer window with its pass."""
        return self.steps + SKIP_LAYER_SHARE * self.skip_layer_steps

    @property
    def share(self) -> float:
        """The work done as a share of the uncached work (1.0 when nothing was skipped)."""
        return self.work / self.uncached_work if self.steps else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "work": self.work, "share": self.share,
                "skipped_calls": self.steps - self.full_calls}


class StepCache:
    """Per generation: decides for each step whether the transformer runs, and forecasts when it does not.

    ``velocity(index, full, probe)``: ``full()`` runs the whole transformer (and the skip-layer guidance pass
    where it applies) and returns the guided velocity; ``probe()`` (first-block cache) runs the first block
    and returns (its output, a function that finishes the call, skip-layer pass included, from it). A step
    the cache skips forecasts the whole guided velocity, skip-layer term included, and runs neither pass.
    """

    def __init__(self, setting, total_steps: int, block_count: int):
        self.setting = setting
        self.total = total_steps
        self.block_count = block_count
        self.stats = CacheStats(block_count=block_count)
        self.taylor = TaylorFactors(getattr(setting, "max_order", 1))
        self.schedule = taylorseer_schedule(setting, total_steps) if isinstance(setting, TaylorSeer) else None
        self.reference: np.ndarray | None = None  # first-block output at the last full call
        self.skips_in_row = 0
        self.kind: tuple[float, float] | None = None  # the last step's batch and skip-layer shares

    def velocity(self, index: int, full: Callable[[], np.ndarray],
                 probe: Callable[[], tuple[np.ndarray, Callable[[], np.ndarray]]] | None = None,
                 batch_share: float = 1.0, skip_share: float = 0.0) -> np.ndarray:
        """``batch_share``: this step's transformer batch against a guided step's (0.5 without guidance);
        ``skip_share``: that of the skip-layer guidance pass ``full()`` runs on this step (0 outside its window).
        Where either changes (a guidance interval or the skip-layer window begins or ends) the step runs whole
        and forecasts start afresh: a velocity with a guidance term is not the continuation of one without."""
        self.stats.steps += 1
        self.stats.skip_layer_steps += skip_share > 0
        kind = (batch_share, skip_share)
        switched = self.kind is not None and kind != self.kind
        self.kind = kind
        if switched:
            self.taylor, self.reference = TaylorFactors(self.taylor.max_order), None
        if isinstance(self.setting, FirstBlockCache):
            return self._first_block(index, probe, batch_share, skip_share)
        if self.schedule is not None and not self.schedule[index] and not switched and self.taylor.step is not None:
            return self.taylor.predict(index)
        return self._run_whole(index, full, batch_share, skip_share)

    def _run_whole(self, index: int, full: Callable[[], np.ndarray], batch_share: float,
                   skip_share: float) -> np.ndarray:
        """The step computed: the whole transformer and, inside its window, the skip-layer pass."""
        out = full()
        self.stats.full_calls += 1
        self.stats.full_work += batch_share
        self.stats.skip_layer_calls += skip_share > 0
        self.stats.skip_layer_work += skip_share
        if self.setting is not None:
            self.taylor.update(index, out)
        return out

    def _first_block(self, index: int, probe, batch_share: float, skip_share: float) -> np.ndarray:
        first_block, finish = probe()
        if self._may_skip(index, first_block):
            self.skips_in_row += 1
            self.stats.partial_calls += 1
            self.stats.partial_work += batch_share
            return self.taylor.predict(index)
        self.skips_in_row, self.reference = 0, first_block
        return self._run_whole(index, finish, batch_share, skip_share)

    def _may_skip(self, index: int, first_block: np.ndarray) -> bool:
        setting = self.setting
        if (index < max(setting.disable_cache_before_step, setting.max_order + 1) or self.reference is None
                or index >= _last_step(setting.disable_cache_after_step, self.total)
                or self.skips_in_row >= setting.max_skips or self.taylor.step is None):
            return False
        scale = float(np.mean(np.abs(self.reference))) or 1.0
        return float(np.mean(np.abs(first_block - self.reference))) / scale < setting.threshold


def taylorseer_schedule(setting: TaylorSeer, total_steps: int) -> list[bool]:
    """For each step, whether it runs the transformer: openvino.genai's TaylorSeerState schedule."""
    first = max(setting.disable_cache_before_step, setting.max_order + 1)  # enough full calls for the factors
    last = _last_step(setting.disable_cache_after_step, total_steps)
    if setting.disable_cache_before_step >= total_steps or last <= setting.disable_cache_before_step:
        return [True] * total_steps
    schedule = []
    for step in range(total_steps):
        if step < first or step >= last:
            schedule.append(True)
            continue
        offset = step - first - (setting.cache_interval - 1)
        schedule.append(offset >= 0 and offset % setting.cache_interval == 0)
    return schedule
