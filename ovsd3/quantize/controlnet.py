"""ControlNets in ``ovsd3 quantize``: each quantized as the transformer is (INT8 activations from the same
calibration pass, or weights only with ``--transformer-weights``), its patch embeddings kept in float.

A ControlNet's inputs are the transformer's (noisy latents, timestep, text embeddings, pooled) plus the control
image's VAE latents. They are taken from the transformer's recorded calls, so no second sampling pass runs:
each call's ``controlnet_cond`` is the calibration image's own latents (the final latents its prompt drew, as
the VAE encodes that picture: diffusers' ``(sample - shift) * scaling``, the shift left out for ControlNets with
``force_zeros_for_pooled_projection``), repeated over the call's batch; the pooled input is zeros where the
first ControlNet forces it (as the runtime feeds it) and the prompt's pooled embeddings otherwise. A picture
of the prompt's own subject is what a tile ControlNet sees, and its latents have the ranges of real control
images' (the demo has no outline maker to draw edges from). An inpainting ControlNet (one extra conditioning
channel) gets the same latents with the inverted centre-square mask (:func:`calibration_mask`) as that channel.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import numpy as np

from ovsd3 import layout
from ovsd3.quantize import calibration
from ovsd3.quantize.transformer import (TransformerQuantization, compress_transformer, nncf_int8,
                                        patch_embedding_convolution)

CONTROL_SOURCE = "the calibration images' own VAE latents (each prompt's final latents)"


class RecordedControlSamples:
    """The ControlNet's calibration set, built from the recorded transformer calls (read one prompt at a time).

    ``zero_pooled``: the pooled input is zeros; ``shift``: the VAE shift the control latents are taken
    against (0 for ControlNets with ``force_zeros_for_pooled_projection``, as diffusers encodes for them);
    ``text``: the ControlNet takes ``encoder_hidden_states``."""

    def __init__(self, cache_dir: Path, count: int, *, scaling: float, shift: float, zero_pooled: bool,
                 text: bool, mask: bool = False):
        self.cache_dir, self.count = cache_dir, count
        self.scaling, self.shift, self.zero_pooled, self.text = scaling, shift, zero_pooled, text
        self.mask = mask  # an inpainting ControlNet: its last channel is the inverted mask (CALIBRATION_MASK)

    def _control_latents(self, decoder_input: np.ndarray) -> np.ndarray:
        # decoder_input = latents / scaling + shift is the VAE's sample of the drawn picture
        return ((decoder_input - np.float32(self.shift)) * np.float32(self.scaling)).astype(np.float32)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        produced = 0
        for path in sorted(self.cache_dir.glob("prompt_*.npz")):
            with np.load(path) as arrays:
                calls = {name: arrays[name] for name in calibration.INPUT_NAMES}
                control = self._control_latents(arrays[calibration.DECODER_INPUT])
            for call in range(len(calls["timestep"])):
                if produced == self.count:
                    return
                yield self._sample({name: calls[name][call] for name in calibration.INPUT_NAMES}, control)
                produced += 1

    def _sample(self, call: dict[str, np.ndarray], control: np.ndarray) -> dict[str, np.ndarray]:
        batch = call["hidden_states"].shape[0]
        pooled = call["pooled_projections"]
        if self.mask:
            kept = 1.0 - calibration_mask(*control.shape[2:])  # diffusers feeds 1 - mask
            control = np.concatenate([control, kept[None, None]], axis=1)
        sample = {"hidden_states": call["hidden_states"], "controlnet_cond": np.repeat(control, batch, axis=0),
                  "timestep": call["timestep"],
                  "pooled_projections": np.zeros_like(pooled) if self.zero_pooled else pooled}
        if self.text:
            sample["encoder_hidden_states"] = call["encoder_hidden_states"]
        return sample

    def __len__(self) -> int:
        return self.count


def control_samples(model: layout.ModelFolder, config: dict, cache_dir: Path, count: int) -> RecordedControlSamples:
    """The calibration set of the ControlNet with ``config`` in ``model``; the first ControlNet decides the
    pooled input and the VAE shift for all of them, as diffusers' pipeline (and ovsd3's runtime) does."""
    first = model.controlnet_configs[0]
    zero_pooled = bool(first.get("force_zeros_for_pooled_projection", True))
    inpainting = config.get("extra_conditioning_channels", 0) == 1
    vae = model.vae_config
    # an inpainting ControlNet's latents are always taken against the shift, its pooled input zeros (as the
    # runtime feeds it, after diffusers' StableDiffusion3ControlNetInpaintingPipeline)
    shift = float(vae.get("shift_factor", 0.0609)) if inpainting or not zero_pooled else 0.0
    return RecordedControlSamples(cache_dir, count, scaling=float(vae.get("scaling_factor", 1.5305)), shift=shift,
                                  zero_pooled=zero_pooled or inpainting,
                                  text=config.get("joint_attention_dim") is not None, mask=inpainting)


def calibration_mask(height: int, width: int) -> np.ndarray:
    """The mask an inpainting ControlNet is calibrated and gated with: 1 (redraw) on the centre half of each
    side, 0 around it, as (height, width) float32. What is masked sets the ranges, not the content."""
    mask = np.zeros((height, width), dtype=np.float32)
    mask[height // 4:height - height // 4, width // 4:width - width // 4] = 1.0
    return mask


def patch_embeddings(model) -> list[str]:
    """The convolutions that embed the latents and the control latents: kept in float, as the transformer's."""
    return [patch_embedding_convolution(model, name) for name in ("hidden_states", "controlnet_cond")]


def quantize_controlnet(model, samples, options: TransformerQuantization):
    """``model`` (a ControlNet's ov.Model) with INT8 activations calibrated on ``samples``, by the transformer's
    NNCF call (its form included: on CPUs without VNNI the attention stays in float). Quantized whole: a
    full-size InstantX ControlNet (6 blocks, 1.2 GB in FP16) is about one of the transformer's slices."""
    return nncf_int8(model, samples, options, {*patch_embeddings(model), *options.ignore})


def quantize_controlnets(core, model: layout.ModelFolder, staging: Path, options: TransformerQuantization,
                         cache_dir: Path | None, count: int, log) -> list[tuple[str, int, int, str]]:
    """Every ControlNet of ``model`` quantized into ``staging``: (component, bytes before, after, format) each."""
    import openvino as ov

    rows = []
    for component, config in zip(layout.controlnet_components(model.path), model.controlnet_configs):
        ir = core.read_model(layout.model_xml(model.path, component))
        if options.weights is not None:
            log(f"      {component}: {options.label} only")
            quantized = compress_transformer(ir, options.weights)
        else:
            log(f"      {component}: INT8 ({count} samples; control latents: {CONTROL_SOURCE})")
            quantized = quantize_controlnet(ir, control_samples(model, config, cache_dir, count), options)
        ov.save_model(quantized, layout.model_xml(staging, component))
        del ir, quantized
        gc.collect()
        rows.append((component, layout.ir_bytes(model.path, component), layout.ir_bytes(staging, component),
                     options.label))
    return rows


def summary(model: layout.ModelFolder, options: TransformerQuantization, count: int) -> dict | None:
    """What the record says of the ControlNets (None where the folder has none)."""
    components = layout.controlnet_components(model.path)
    if not components:
        return None
    if options.weights is not None:
        return {name: {"mode": f"{options.weights} weights"} for name in components}
    return {name: {"mode": "int8", "calibration_samples": count, "control_latents": CONTROL_SOURCE}
            for name in components}
