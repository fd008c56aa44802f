"""Collapsing the all-zero T5 part of the transformer's text into one token with an attention bias.

Without T5 the text is 77 CLIP tokens followed by T zero tokens (diffusers' sequence). Those T tokens stay
identical through the transformer, and T identical keys act in attention exactly as one key whose logit is
raised by log(T) (``ovsd3/ir/attention_bias.py``). So the biased transformer on 77 + 1 tokens gives the image
output of the original on 77 + T tokens. Only rows whose T5 part is exactly zero qualify: one prompt with real
T5 embeddings in the batch and nothing is collapsed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.ir.attention_bias import ATTENTION_BIAS
from ovsd3.runtime.text import CLIP_MAX_LENGTH

COLLAPSED_TEXT_LENGTH = CLIP_MAX_LENGTH + 1  # the CLIP tokens and the one T5 token standing for all of them


@dataclass(frozen=True)
class TextCollapse:
    inputs: dict[str, np.ndarray]  # the transformer inputs, text collapsed or as given
    attention_bias: np.ndarray  # f32 [image tokens + text tokens of ``inputs``]
    copies: int  # how many T5 tokens the last text token stands for; 0: not collapsed

    @property
    def collapsed(self) -> bool:
        return self.copies > 0

    def biased_inputs(self) -> dict[str, np.ndarray]:
        """The inputs of the transformer with an ``attention_bias`` input."""
        return {**self.inputs, ATTENTION_BIAS: self.attention_bias}


def patch_size_of(folder: Path) -> int:
    config = json.loads((Path(folder) / layout.TRANSFORMER / "config.json").read_text())
    return int(config["patch_size"])


def image_token_count(hidden_states: np.ndarray, patch_size: int) -> int:
    """Image tokens of a latent [B, C, H, W]: the patch embedding is a stride-``patch_size`` convolution."""
    height, width = hidden_states.shape[-2:]
    return (height // patch_size) * (width // patch_size)


def t5_part_is_zero(encoder_hidden_states: np.ndarray) -> bool:
    """Whether every batch row has text beyond the CLIP tokens and all of it is exactly zero."""
    t5_part = encoder_hidden_states[:, CLIP_MAX_LENGTH:]
    return t5_part.shape[1] > 0 and not np.any(t5_part)  # NaN counts as nonzero


def collapse_text(inputs: dict[str, np.ndarray], patch_size: int) -> TextCollapse:
    """``inputs`` with the T5 part collapsed to one token and the bias that makes it exact, when the T5 part
    is all zeros in every row; otherwise ``inputs`` unchanged and a zero bias."""
    text = inputs["encoder_hidden_states"]
    image_tokens = image_token_count(inputs["hidden_states"], patch_size)
    if not t5_part_is_zero(text):
        return TextCollapse(dict(inputs), np.zeros(image_tokens + text.shape[1], np.float32), 0)
    copies = text.shape[1] - CLIP_MAX_LENGTH
    # Keys are [image tokens, text tokens] (JointAttnProcessor2_0's concatenation): the T5 token is the last.
    bias = np.zeros(image_tokens + COLLAPSED_TEXT_LENGTH, np.float32)
    bias[-1] = math.log(copies)
    collapsed = {**inputs, "encoder_hidden_states": np.ascontiguousarray(text[:, :COLLAPSED_TEXT_LENGTH])}
    return TextCollapse(collapsed, bias, copies)
