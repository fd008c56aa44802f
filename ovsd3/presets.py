"""SD3-family architectures as named presets.

These describe shapes only (no weights). They are used to build random-weight pipelines for tests
(the ``tiny*`` presets) and for full-size speed and size measurements, where values do not matter.
Numbers for the real models are copied from their published diffusers configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class TransformerArch:
    """SD3Transformer2DModel (MMDiT / MMDiT-X) configuration."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()

    def diffusers_config(self) -> dict:
        config = asdict(self)
        config["dual_attention_layers"] = tuple(self.dual_attention_layers)
        return config


@dataclass(frozen=True)
class ClipArch:
    """CLIPTextModelWithProjection configuration (CLIP-L or CLIP-G text tower)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    hidden_act: str = "quick_gelu"
    vocab_size: int = 49408
    max_position_embeddings: int = 77


@dataclass(frozen=True)
class T5Arch:
    """T5EncoderModel configuration."""

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    vocab_size: int = 32128
    feed_forward_proj: str = "gated-gelu"


@dataclass(frozen=True)
class VaeArch:
    """AutoencoderKL configuration with SD3's 16 latent channels and /8 downsampling."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def diffusers_config(self) -> dict:
        n = len(self.block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


@dataclass(frozen=True)
class SD3Arch:
    """A whole SD3-family pipeline: transformer, two CLIPs, T5 and VAE."""

    name: str
    transformer: TransformerArch
    clip_l: ClipArch
    clip_g: ClipArch
    t5: T5Arch
    vae: VaeArch = field(default_factory=VaeArch)
    scheduler_shift: float = 3.0

    def __post_init__(self) -> None:
        # CLIP widths may add up to more than joint_attention_dim: diffusers crops them then (tiny-wide-clip).
        if self.clip_l.projection_dim + self.clip_g.projection_dim != self.transformer.pooled_projection_dim:
            raise ValueError(f"{self.name}: CLIP projections must add up to pooled_projection_dim")
        if self.t5.d_model != self.transformer.joint_attention_dim:
            raise ValueError(f"{self.name}: T5 width must equal joint_attention_dim")


_CLIP_L = ClipArch(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu")
_CLIP_G = ClipArch(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
_T5_XXL = T5Arch(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)

_TINY_CLIP_L = ClipArch(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=16, vocab_size=1000)
_TINY_CLIP_G = ClipArch(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=24, hidden_act="gelu", vocab_size=1000)
_TINY_T5 = T5Arch(d_model=48, d_ff=64, d_kv=8, num_heads=2, num_layers=2, vocab_size=512)
_TINY_VAE = VaeArch(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


PRESETS: Mapping[str, SD3Arch] = MappingProxyType({
    "sd3-medium": SD3Arch(
        name="sd3-medium",
        transformer=TransformerArch(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                    joint_attention_dim=4096, caption_projection_dim=1536,
                                    pooled_projection_dim=2048, pos_embed_max_size=192),
        clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
    "sd3.5-medium": SD3Arch(
        name="sd3.5-medium",
        transformer=TransformerArch(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                    joint_attention_dim=4096, caption_projection_dim=1536,
                                    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                                    dual_attention_layers=tuple(range(13))),
        clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
    "sd3.5-large": SD3Arch(
        name="sd3.5-large",
        transformer=TransformerArch(num_layers=38, num_attention_heads=38, attention_head_dim=64,
                                    joint_attention_dim=4096, caption_projection_dim=2432,
                                    pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm"),
        clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
    # Tiny shapes for tests: every code path of the real models, seconds to convert.
    "tiny": SD3Arch(
        name="tiny",
        transformer=TransformerArch(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                    joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40,
                                    pos_embed_max_size=24, sample_size=16),
        clip_l=_TINY_CLIP_L, clip_g=_TINY_CLIP_G, t5=_TINY_T5, vae=_TINY_VAE,
    ),
    "tiny-sd3.5": SD3Arch(
        name="tiny-sd3.5",
        transformer=TransformerArch(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                    joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40,
                                    pos_embed_max_size=24, sample_size=16, qk_norm="rms_norm",
                                    dual_attention_layers=(0,)),
        clip_l=_TINY_CLIP_L, clip_g=_TINY_CLIP_G, t5=_TINY_T5, vae=_TINY_VAE,
    ),
    # diffusers' own small SD3 test configurations: CLIP-L + CLIP-G (16 + 24) wider than the joint width (32).
    "tiny-wide-clip": SD3Arch(
        name="tiny-wide-clip",
        transformer=TransformerArch(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=40,
                                    pos_embed_max_size=24, sample_size=16),
        clip_l=_TINY_CLIP_L, clip_g=_TINY_CLIP_G, t5=T5Arch(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2,
                                                             vocab_size=512), vae=_TINY_VAE,
    ),
    # The demo model (ovsd3/demo): 64x64 coloured digits, latents 16 x 8 x 8, trained on 2 CPU cores.
    "digits": SD3Arch(
        name="digits",
        transformer=TransformerArch(num_layers=4, num_attention_heads=4, attention_head_dim=32,
                                    joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
                                    pos_embed_max_size=16, sample_size=8),
        clip_l=ClipArch(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32, vocab_size=1000),
        clip_g=ClipArch(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32, hidden_act="gelu", vocab_size=1000),
        t5=T5Arch(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=512),
        vae=VaeArch(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    ),
})


def get_preset(name: str) -> SD3Arch:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown architecture preset {name!r}; known: {', '.join(PRESETS)}") from None
