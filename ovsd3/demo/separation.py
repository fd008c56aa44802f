"""How far apart a model's text encoders put the demo's prompts, and how much of that a quantized copy keeps.

Works on embeddings (one row per prompt of :func:`ovsd3.demo.digits.all_prompts`, any width), so any runtime
can supply them:

- separation: PSNR between two prompts that differ in one word only (the digit, or the colour), median over all
  such pairs; lower is further apart;
- displacement: PSNR between the same prompt's embeddings from the two models (what quantized weights move);
- kept: the share of prompts whose candidate embedding is still nearest to a reference embedding of its own
  digit and colour; margin: per prompt, the distance from its reference embedding to the nearest reference
  embedding of another digit or colour, over how far the candidate moved it (above 1: no prompt moved as far as
  the nearest prompt asking for something else).

PSNR is over the reference embedding's peak: 10 log10(max|a|^2 / mean((a - b)^2)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovsd3 import metrics
from ovsd3.demo.digits import COLOURS, DigitPrompt


@dataclass(frozen=True)
class Separation:
    digit_db: float  # median PSNR between prompts that differ in the digit only
    colour_db: float  # ... in the colour only
    displacement_db: float  # median PSNR between a prompt's reference and candidate embeddings
    kept: float  # share of candidate embeddings nearest to a reference one of their own label
    smallest_margin: float
    median_margin: float

    def row(self, name: str) -> str:
        return (f"| {name} | {self.digit_db:.1f} dB | {self.colour_db:.1f} dB | {self.displacement_db:.1f} dB | "
                f"{self.kept:.1%} | {self.smallest_margin:.2f}x (median {self.median_margin:.1f}x) |")


TABLE_HEADER = ("| embedding | separation: other digit | other colour | displacement | nearest own label | "
                "smallest margin |\n|---|---|---|---|---|---|")


def embeddings(pipe, texts: list[str]) -> dict[str, np.ndarray]:
    """Per prompt, from an ovsd3 pipeline's text encoders: the pooled embedding, and the CLIP part of the token
    embeddings the transformer attends to (T5's part is zeros on the demo), each flattened."""
    from ovsd3.runtime.text import CLIP_MAX_LENGTH

    encoded = pipe.text.encode(texts)
    return {"pooled": encoded.pooled_embeds.reshape(len(texts), -1),
            "clip tokens": encoded.prompt_embeds[:, :CLIP_MAX_LENGTH].reshape(len(texts), -1)}


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Over the reference's peak magnitude (an embedding's span around zero is what a move is measured against)."""
    return metrics.psnr(reference, other, data_range=float(np.abs(reference).max()))


def one_word_pairs(prompts: list[DigitPrompt]) -> dict[str, list[tuple[int, int]]]:
    """Index pairs of prompts equal but for the digit, or but for the colour (the next digit or colour)."""
    index = {(p.digit, p.colour, p.template): i for i, p in enumerate(prompts)}
    colours = list(COLOURS)
    pairs = {"digit": [], "colour": []}
    for (digit, colour, template), i in index.items():
        if (digit + 1, colour, template) in index:
            pairs["digit"].append((i, index[(digit + 1, colour, template)]))
        following = colours[(colours.index(colour) + 1) % len(colours)]
        if following != colour and (digit, following, template) in index:
            pairs["colour"].append((i, index[(digit, following, template)]))
    return pairs


def separation(reference: np.ndarray, candidate: np.ndarray, prompts: list[DigitPrompt]) -> Separation:
    """``reference`` and ``candidate``: (prompts, width) embeddings of ``prompts`` from two models."""
    labels = np.array([[p.digit, list(COLOURS).index(p.colour)] for p in prompts])
    pairs = one_word_pairs(prompts)
    apart = {kind: float(np.median([psnr(reference[i], reference[j]) for i, j in found]))
             for kind, found in pairs.items()}
    displacement = np.linalg.norm(candidate - reference, axis=1)
    nearest = np.linalg.norm(candidate[:, None] - reference[None], axis=2).argmin(axis=1)
    kept = float(np.mean((labels[nearest] == labels).all(axis=1)))
    between = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    other = (labels[:, None] != labels[None]).any(axis=2)
    margin = np.where(other, between, np.inf).min(axis=1) / np.maximum(displacement, 1e-12)
    moved = float(np.median([psnr(reference[i], candidate[i]) for i in range(len(prompts))]))
    return Separation(apart["digit"], apart["colour"], moved, kept, float(margin.min()), float(np.median(margin)))
