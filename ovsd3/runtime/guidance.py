"""Skip-layer guidance, as diffusers' ``StableDiffusion3Pipeline`` runs it (recommended for SD3.5 Medium with
blocks 7, 8 and 9): on the steps i with ``steps * start < i < steps * stop``, and only when classifier-free
guidance runs, one more conditional transformer pass with those blocks skipped; the guided velocity becomes
``uncond + g * (cond - uncond) + scale * (cond - cond_skipped)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    @classmethod
    def of(cls, request) -> "SkipLayerGuidance | None":
        if not request.skip_guidance_layers:  # None or [] (as in diffusers, [] changes nothing)
            return None
        return cls(tuple(int(layer) for layer in request.skip_guidance_layers),
                   float(request.skip_layer_guidance_scale), float(request.skip_layer_guidance_start),
                   float(request.skip_layer_guidance_stop))

    def applies(self, index: int, steps: int) -> bool:
        """diffusers' window: both bounds strict, in Python floats."""
        return steps * self.start < index < steps * self.stop
