r"""INT8 activation quantization of the VAE decoder with NNCF, calibrated on the final latents that the
folder's own pipeline produced while calibration recorded the transformer's inputs.

Weight-only INT4 leaves the decoder as slow as before: at 512x512 it is bound by its activations (every
3x3 convolution at 256x256 and 512x512 pixels), so only INT8 activations make it faster.

How the defaults were chosen. Quality: the demo model's trained decoder (demo/sd3-digits), calibrated on
the final latents of 8 prompts (what `--calib 200` records at 28 steps), scored on 60 held-out prompts'
latents by the decoded images' PSNR against the FP16 IR executed in f32. For scale: the FP16 IR at the
CPU's default bf16 scores 60.6 dB, INT4 weights (the `weights` mode) 57.4 dB; every INT8 variant below
drew all 60 digits right. Speed: SD3's full-size decoder with random weights at 512x512 on this
project's 2-core machine while it was busy (benchmarks/vae_decoder_int8.py times the final choice). One
change at a time from the defaults (50.6 dB):

    GroupNormalization and Add inputs quantized too (NNCF's placement)   45.6 dB
    Add inputs quantized too                                             46.1 dB
    activation ranges by NNCF's default (mean of per-sample extremes)   42.5 dB
    preset performance (symmetric activations)                          49.9 dB
    fast bias correction / full bias correction                         49.9 / 50.5 dB
    conv_in and conv_out quantized too                                  49.6 dB
    mid-block attention kept in float too                               51.2 dB
    last up block (up_blocks.3) kept in float too                       52.4 dB
    64 calibration samples instead of 8                                 51.9 dB

- Only convolution and MatMul inputs are quantized (``FLOAT_TYPES``): NNCF also puts FakeQuantize on the
  residual Adds and in front of every GroupNormalization, which costs 5 dB (the residual stream carries
  the image's detail over a wide range) and bought no speed (median of 5: 12.9 s with them, 12.2 s
  without; FP16 19.3 s).
- Activation ranges by global min/max (NNCF's ``MINMAX``): the decoder gets one sample per prompt, so
  few, and averaging their extremes clips what the next image reaches (8 dB here).
- Preset ``mixed`` (asymmetric activations): most convolutions read SiLU outputs, which stay above -0.28,
  where a symmetric range wastes half its codes.
- No bias correction: neither kind helped, and the full one takes five times as long to quantize.
- No SmoothQuant: it applies to MatMuls (here only the mid block's attention projections), not to
  convolutions; model_type stays None (a convolutional network).
- Kept in float (``KEEP_FLOAT``): conv_in, which reads the latents, and conv_out, which writes the pixels,
  nearly free in float (16 input channels; 3 output channels). A sweep keeping one layer at a time in
  float (all 31 convolutions and MatMuls, everything else INT8 in NNCF's default placement, 45.4 dB)
  found no layer worth more than 0.22 dB (conv_out the most, conv_in +0.09 dB): the error is spread over
  the decoder. The last up block gains 1.8 dB but holds about a fifth of the decoder's work at 512x512
  (14.5 s against 12.2 s above): add ``.*up_blocks\.3\..*`` to ``keep_float`` for a decoder that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ovsd3.errors import OvsdError

VAE_DECODER_MODES = ("int8", "weights")
# Node-name patterns (regular expressions, matched against the whole name) kept in float: the decoder's
# first and last convolutions. Names as optimum-intel's exporter writes them (ovsd3 convert uses it).
KEEP_FLOAT = (r".*decoder\.conv_in/.*", r".*decoder\.conv_out/.*")
FLOAT_TYPES = ("GroupNormalization", "Add")  # their inputs stay float; convolutions' and MatMuls' are INT8


@dataclass(frozen=True)
class VaeDecoderQuantization:
    mode: str = "int8"  # "int8": INT8 activations and weights; "weights": the --weights mode, as before
    keep_float: tuple[str, ...] = KEEP_FLOAT  # node-name patterns left in float

    def check(self) -> None:
        if self.mode not in VAE_DECODER_MODES:
            raise OvsdError(f"--vae-decoder must be one of {', '.join(VAE_DECODER_MODES)} (got {self.mode!r})")


def quantize_vae_decoder(model, samples, options: VaeDecoderQuantization):
    """``model`` (the decoder's ov.Model) with INT8 activations and weights, calibrated on ``samples``
    (an iterable of ``{"latent_sample": array}`` with a length: every sample is used)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    count = len(samples)
    if count < 1:
        raise OvsdError("no recorded latents to calibrate the VAE decoder on")
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                              disable_bias_correction=True)
    # validate=False: a decoder exported by another tool may name its first and last convolutions otherwise.
    ignored = nncf.IgnoredScope(patterns=list(options.keep_float), types=list(FLOAT_TYPES), validate=False)
    return nncf.quantize(model, nncf.Dataset(samples), preset=nncf.QuantizationPreset.MIXED, subset_size=count,
                         ignored_scope=ignored, advanced_parameters=advanced)
