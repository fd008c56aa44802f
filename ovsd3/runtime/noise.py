"""Where sampling's random numbers come from: numpy's own generator, or PyTorch's CPU stream without torch.

Every source is a callable ``noise(shape) -> float32 array`` drawn in the order diffusers draws: the VAE
posterior sample (image-to-image), the initial latents, then one draw per step for the Flash sampler.

``TorchNoise`` reproduces ``torch.Generator().manual_seed(seed)`` followed by ``torch.randn(shape,
generator=...)`` on the CPU, as openvino.genai's ``TorchGenerator`` does in C++: the same Mersenne Twister
(numpy's ``MT19937`` bit generator, seeded as torch seeds it), 24-bit uniform floats, and torch's Box-Muller
in blocks of 16 (``normal_fill``). So the same seed draws diffusers' picture. Draws of fewer than 16 values
take torch's other path (double precision Box-Muller with a cached second value), transcribed too.
"""

from __future__ import annotations

import math

import numpy as np

from ovsd3.errors import InvalidRequest

MERSENNE_STATE_N = 624
DEFAULT_NOISE = "torch"  # the same seed draws diffusers' picture; as fast as numpy's (benchmarks/noise.py)

# Byte ranges in torch's CPUGeneratorImplState: int64 the_initial_seed, int left, int seeded, uint64 next,
# uint64 state[624], double normal_x, normal_y, normal_rho, int normal_is_valid, then the float cache.
_LEFT = slice(8, 12)
_NEXT = slice(16, 24)
_KEY = slice(24, 24 + 8 * MERSENNE_STATE_N)
_NORMAL_Y = slice(_KEY.stop + 8, _KEY.stop + 16)
_NORMAL_IS_VALID = slice(_KEY.stop + 24, _KEY.stop + 28)


class NumpyNoise:
    """Standard normal draws from numpy's default generator (PCG64): the same seed, the same noise."""

    name = "numpy"

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def __call__(self, shape: tuple) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=np.float32)


def mt19937_key(seed: int) -> np.ndarray:
    """The Mersenne Twister state after ``init_genrand(seed & 0xffffffff)`` (torch's ``manual_seed``)."""
    key = np.empty(MERSENNE_STATE_N, dtype=np.uint32)
    value = seed & 0xFFFFFFFF
    for index in range(MERSENNE_STATE_N):
        key[index] = value
        value = (1812433253 * (value ^ (value >> 30)) + index + 1) & 0xFFFFFFFF
    return key


class TorchNoise:
    """``torch.randn`` on the CPU from ``torch.Generator().manual_seed(seed)``, in numpy."""

    name = "torch"

    def __init__(self, seed: int):
        self._bits = np.random.MT19937()
        # pos 624: the first draw twists the state first, as torch's engine does after seeding.
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": mt19937_key(seed), "pos": MERSENNE_STATE_N}}
        self._next_double_normal: float | None = None  # torch caches the second Box-Muller value (double path)

    @classmethod
    def from_torch(cls, generator) -> "TorchNoise":
        """The same stream as an existing CPU ``torch.Generator``, read from its state without importing torch;
        :meth:`sync` writes what was drawn back, so the generator moves on as it would in diffusers."""
        state = generator.get_state().numpy()  # torch's CPUGeneratorImplState, byte for byte
        left = int(state[_LEFT].view(np.int32)[0])
        noise = cls(0)
        noise._bits.state = {"bit_generator": "MT19937", "state": {
            "key": state[_KEY].view(np.uint64).astype(np.uint32), "pos": MERSENNE_STATE_N + 1 - left}}
        if state[_NORMAL_IS_VALID].view(np.int32)[0]:
            noise._next_double_normal = float(state[_NORMAL_Y].view(np.float64)[0])
        noise._generator = generator
        return noise

    def sync(self) -> None:
        """Write this stream's position back into the torch generator it was read from."""
        generator = getattr(self, "_generator", None)
        if generator is None:
            return
        tensor = generator.get_state()
        state = tensor.numpy()  # shares the tensor's memory
        bits = self._bits.state["state"]
        state[_KEY] = bits["key"].astype(np.uint64).view(np.uint8)
        state[_LEFT] = np.array([MERSENNE_STATE_N + 1 - bits["pos"]], dtype=np.int32).view(np.uint8)
        state[_NEXT] = np.array([bits["pos"] % MERSENNE_STATE_N], dtype=np.uint64).view(np.uint8)
        state[_NORMAL_IS_VALID] = np.array([self._next_double_normal is not None], dtype=np.int32).view(np.uint8)
        state[_NORMAL_Y] = np.array([self._next_double_normal or 0.0], dtype=np.float64).view(np.uint8)
        generator.set_state(tensor)

    def _uint32(self, count: int) -> np.ndarray:
        return self._bits.random_raw(count).astype(np.uint32)

    def _uniform_float(self, count: int) -> np.ndarray:
        """torch's uniform_real_distribution<float>(0, 1): the low 24 bits of one 32-bit draw."""
        return ((self._uint32(count) & 0xFFFFFF).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)

    def __call__(self, shape: tuple) -> np.ndarray:
        size = math.prod(shape)
        if size < 16:
            return np.array([self._double_normal() for _ in range(size)], dtype=np.float32).reshape(shape)
        data = self._uniform_float(size)
        blocks = size // 16 * 16
        data[:blocks] = _box_muller_16(data[:blocks].reshape(-1, 16)).reshape(-1)
        if size % 16:  # torch redraws the last 16 values (overlapping finished ones) and transforms them
            data[size - 16:] = _box_muller_16(self._uniform_float(16).reshape(1, 16)).reshape(-1)
        return data.reshape(shape)

    def _double_normal(self) -> float:
        """torch's normal_distribution<double>: Box-Muller on two 53-bit uniforms, the sine kept for later."""
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value
        u1, u2 = (self._uniform_double() for _ in range(2))
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def _uniform_double(self) -> float:
        high, low = (int(value) for value in self._uint32(2))
        return (((high << 32) | low) & ((1 << 53) - 1)) * 2.0 ** -53


def _box_muller_16(blocks: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16 on rows of 16 uniforms: the first 8 give the radius, the last 8 the angle."""
    u1 = np.float32(1.0) - blocks[:, :8]  # [0, 1) -> (0, 1] for the log
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = (2.0 * math.pi * blocks[:, 8:].astype(np.float64)).astype(np.float32)
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)


class GeneratorListNoise:
    """diffusers' list of generators: image ``i`` of a batch drawn from generator ``i``."""

    name = "torch"

    def __init__(self, sources: list[TorchNoise]):
        self.sources = sources

    def __call__(self, shape: tuple) -> np.ndarray:
        return np.concatenate([source((1, *shape[1:])) for source in self.sources])

    def sync(self) -> None:
        for source in self.sources:
            source.sync()


def generator_noise(generator, batch: int):
    """(the seed to record, the noise source) for diffusers' ``generator``: a CPU torch.Generator or a list
    with one per image."""
    generators = generator if isinstance(generator, list) else [generator]
    if not all(hasattr(item, "get_state") and hasattr(item, "initial_seed") for item in generators):
        raise InvalidRequest("generator must be a torch.Generator (or a list of them); without torch, pass seed=")
    if isinstance(generator, list) and len(generator) != batch:
        raise InvalidRequest(f"you have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {batch}")
    sources = [TorchNoise.from_torch(item) for item in generators]
    noise = GeneratorListNoise(sources) if isinstance(generator, list) else sources[0]
    return int(generators[0].initial_seed()), noise


def global_torch_noise():
    """torch's global generator as a noise source, when the caller's process has torch loaded (it passed a torch
    generator): diffusers' SD3 pipeline does not hand its generator to the scheduler, so the Flash sampler's
    per-step noise comes from ``torch.manual_seed``'s stream. None without torch."""
    import sys

    torch = sys.modules.get("torch")
    return None if torch is None else TorchNoise.from_torch(torch.default_generator)


NOISE_SOURCES = {"numpy": NumpyNoise, "torch": TorchNoise}


def noise_source(name: str, seed: int):
    """The named source seeded with ``seed``; a one-line ValueError for an unknown name."""
    try:
        return NOISE_SOURCES[name](seed)
    except KeyError:
        raise InvalidRequest(f"unknown noise source {name!r} (choose from {', '.join(NOISE_SOURCES)})") from None
