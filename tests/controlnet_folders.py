"""Tiny converted folders with a ControlNet, for the quantize and service tests (as tests/test_controlnet.py
builds its own: SD3ControlNetModel.from_transformer, its zero-initialised control layers randomised)."""

from __future__ import annotations

import shutil
from pathlib import Path


def controlnet_source(tiny_sd3: Path, out: Path, seed: int = 1) -> Path:
    """An InstantX-kind ControlNet (its own position embedding, zero pooled input) of the tiny transformer,
    saved as a diffusers folder."""
    import torch
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    torch.manual_seed(0)
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # controlnet_blocks and pos_embed_input start at zero: no effect until randomised
        for parameter in [*controlnet.controlnet_blocks.parameters(), *controlnet.pos_embed_input.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    controlnet.save_pretrained(out)
    return out


def with_controlnets(tiny_sd3: Path, converted: Path, sources: list[Path], out: Path,
                     weight_format: str) -> Path:
    """A copy of the converted folder ``converted`` with ``sources`` converted beside its transformer."""
    from ovsd3.convert.controlnet import convert_controlnet
    from ovsd3.convert.export import ExportOptions
    from ovsd3.convert.source import ModelSource

    folder = Path(shutil.copytree(converted, out))
    source, options = ModelSource.open(str(tiny_sd3)), ExportOptions(weight_format=weight_format)
    for index, controlnet in enumerate(sources):
        convert_controlnet(source, controlnet, index, folder, options)
    return folder
