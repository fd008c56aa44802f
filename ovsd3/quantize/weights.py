"""Weight-only compression (INT4 / INT8) of the text encoders and the VAE with NNCF."""

from __future__ import annotations

from dataclasses import dataclass

from ovsd3.errors import OvsdError

WEIGHT_MODES = ("int4_sym", "int4_asym", "int8")


@dataclass(frozen=True)
class WeightCompression:
    mode: str = "int4_sym"  # the published recipe: INT4_SYM, group size 128, ratio 0.8
    group_size: int = 128
    ratio: float = 0.8

    def check(self) -> None:
        if self.mode not in WEIGHT_MODES:
            raise OvsdError(f"--weights must be one of {', '.join(WEIGHT_MODES)}")
        if not 0.0 < self.ratio <= 1.0:
            raise OvsdError(f"--ratio must be in (0, 1] (got {self.ratio})")
        if self.group_size < 1 and self.group_size != -1:
            raise OvsdError(f"--group-size must be positive, or -1 for per-channel (got {self.group_size})")


def compress(model, options: WeightCompression):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if options.mode == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    mode = nncf.CompressWeightsMode.INT4_SYM if options.mode == "int4_sym" else nncf.CompressWeightsMode.INT4_ASYM
    # Layers whose width is not a multiple of the group size get the largest power-of-two group that fits,
    # rather than failing the whole command.
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    return nncf.compress_weights(model, mode=mode, group_size=options.group_size, ratio=options.ratio,
                                 advanced_parameters=advanced)
