"""Full-width SD3 Medium pieces with random weights, FP16 IR and their quantized variants, for the INT8 studies
(benchmarks/int8_profile.py, int8_variants.py, int8_single_layer.py).

    python benchmarks/int8_models.py --workdir /tmp/ovsd3-int8 [--blocks 3]

writes WORKDIR/fp16/{transformer,vae_decoder}/openvino_model.xml (exported as `ovsd3 convert` does: optimum-intel's
SD3 export configs, fp16 weights) and WORKDIR/int8/... (the transformer by ovsd3's own `quantize_transformer`, the
decoder by `quantize_vae_decoder`, both on synthetic calibration inputs: values do not change speed). SD3 Medium's
full width (24 heads x 64, 4096-wide text, 2048 pooled), cut to ``--blocks`` of its 24 blocks: per-call time scales
with the blocks, the per-op mix does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

XML = "openvino_model.xml"
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as a no-T5 pipeline feeds by default


def transformer_inputs(batch: int, size: int, rng: np.random.Generator, text_tokens: int = TEXT_TOKENS) -> dict:
    side = size // 8
    return {"hidden_states": rng.standard_normal((batch, 16, side, side), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, text_tokens, 4096), dtype=np.float32),
            "pooled_projections": rng.standard_normal((batch, 2048), dtype=np.float32)}


def decoder_inputs(size: int, rng: np.random.Generator) -> dict:
    return {"latent_sample": rng.standard_normal((1, 16, size // 8, size // 8), dtype=np.float32)}


def export_transformer(xml: Path, blocks: int) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    from ovsd3.convert.export import _trace, export_config_for
    from ovsd3.presets import get_preset

    arch = dataclasses.replace(get_preset("sd3-medium").transformer, num_layers=blocks)
    torch.manual_seed(0)
    module = SD3Transformer2DModel(**arch.diffusers_config()).to(torch.float16).eval()
    module.config.text_encoder_projection_dim = module.config.joint_attention_dim
    module.config.requires_aesthetics_score = False
    module.config.time_cond_proj_dim = None
    xml.parent.mkdir(parents=True, exist_ok=True)
    _trace(module, export_config_for(module, "sd3-transformer", "semantic-segmentation"), xml, "fp16")


def export_decoder(xml: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    from ovsd3.convert.export import _trace, export_config_for
    from ovsd3.presets import get_preset

    torch.manual_seed(0)
    vae = AutoencoderKL(**get_preset("sd3-medium").vae.diffusers_config()).to(torch.float16).eval()
    vae.forward = lambda latent_sample: vae.decode(z=latent_sample)
    xml.parent.mkdir(parents=True, exist_ok=True)
    _trace(vae, export_config_for(vae, "vae-decoder", "semantic-segmentation"), xml, "fp16")


def quantize_transformer_ir(source: Path, out: Path, samples: int, size: int, **options) -> None:
    import openvino as ov

    from ovsd3.quantize.transformer import TransformerQuantization, quantize_transformer

    rng = np.random.default_rng(0)
    model = ov.Core().read_model(source)
    quantized = quantize_transformer(model, [transformer_inputs(1, size, rng) for _ in range(samples)],
                                     TransformerQuantization(subset_size=samples, slices=1, **options))
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, out)


def quantize_decoder_ir(source: Path, out: Path, samples: int, size: int) -> None:
    import openvino as ov

    from ovsd3.quantize.vae import VaeDecoderQuantization, quantize_vae_decoder

    rng = np.random.default_rng(0)
    model = ov.Core().read_model(source)
    quantized = quantize_vae_decoder(model, [decoder_inputs(size, rng) for _ in range(samples)],
                                     VaeDecoderQuantization())
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, out)


def build(workdir: Path, blocks: int, samples: int, size: int) -> None:
    """Each model once: a finished file is kept (delete the workdir to rebuild)."""
    from ovsd3.quantize.pipeline import _quiet_nncf

    _quiet_nncf()
    fp16, int8 = workdir / "fp16", workdir / "int8"
    steps = ((fp16 / "transformer" / XML, lambda out: export_transformer(out, blocks)),
             (fp16 / "vae_decoder" / XML, export_decoder),
             (int8 / "transformer" / XML,
              lambda out: quantize_transformer_ir(fp16 / "transformer" / XML, out, samples, size)),
             (int8 / "vae_decoder" / XML,
              lambda out: quantize_decoder_ir(fp16 / "vae_decoder" / XML, out, samples, size)))
    for xml, make in steps:
        if not xml.exists():
            print(f"building {xml}", flush=True)
            make(xml)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-int8"))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="calibration inputs")
    parser.add_argument("--calib-size", type=int, default=256)
    args = parser.parse_args()
    build(args.workdir, args.blocks, args.samples, args.calib_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
