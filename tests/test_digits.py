"""The demo's data and its scorer: prompts say what they ask, rendered digits are read back."""

from __future__ import annotations

import numpy as np
import pytest

from ovsd3.demo.digits import COLOURS, TEMPLATES, DigitPrompt, DigitScorer, all_prompts, load_digits, render
from ovsd3.demo.separation import one_word_pairs, separation


def test_prompts_parse_back_to_what_they_ask():
    prompts = all_prompts()
    assert len(prompts) == 10 * len(COLOURS) * len(TEMPLATES)
    for prompt in prompts:
        assert DigitPrompt.parse(prompt.text) == DigitPrompt(prompt.digit, prompt.colour)
    assert DigitPrompt.parse("a lighthouse in a storm") is None
    assert DigitPrompt.parse("a red 3 and a blue 4") is None  # two of each: not one question


def test_scorer_reads_held_out_digits_and_colours():
    """Trained on half of the digits, it reads the other half, rendered in every colour, as a generated
    image would look."""
    images, labels = load_digits()
    half = len(images) // 2
    scorer = DigitScorer(images[:half], labels[:half])
    rng = np.random.default_rng(0)
    picks = rng.choice(np.arange(half, len(images)), size=120, replace=False)
    colours = list(COLOURS)
    drawn = [render(images[i], colours[n % len(colours)]) for n, i in enumerate(picks)]
    prompts = [DigitPrompt(int(labels[i]), colours[n % len(colours)]).text for n, i in enumerate(picks)]
    score = scorer.score(drawn, prompts)
    assert all(score.colour_matches)
    assert score.accuracy >= 0.95
    # a wrong prompt is caught: every image scored against the next digit
    wrong = [DigitPrompt((int(labels[i]) + 1) % 10, colours[n % len(colours)]).text for n, i in enumerate(picks)]
    assert scorer.score(drawn, wrong).accuracy <= 0.05


def test_scorer_refuses_prompts_it_cannot_check():
    scorer = DigitScorer()
    with pytest.raises(ValueError, match="one digit and one colour"):
        scorer.score([np.zeros((64, 64, 3), np.uint8)], ["a lighthouse"])


def test_separation_measures_how_far_a_candidate_moved_each_prompt():
    """Embeddings that code the digit and the colour: a small move keeps every prompt (margin = the nearest other
    label's distance over the move); moving each prompt onto the next digit's embedding keeps none."""
    prompts = all_prompts()
    reference = np.array([np.concatenate([np.eye(10)[p.digit], np.eye(len(COLOURS))[list(COLOURS).index(p.colour)],
                                          [0.01 * p.template]]) for p in prompts])
    pairs = one_word_pairs(prompts)
    assert len(pairs["digit"]) == 9 * len(COLOURS) * 4 and len(pairs["colour"]) == 10 * len(COLOURS) * 4
    moved = reference.copy()
    moved[:, -1] += 0.1  # every prompt moved by 0.1; another label is sqrt(2) away
    measured = separation(reference, moved, prompts)
    assert measured.kept == 1.0 and measured.smallest_margin == pytest.approx(np.sqrt(2) / 0.1)
    assert measured.digit_db < measured.displacement_db
    index = {(p.digit, p.colour, p.template): i for i, p in enumerate(prompts)}
    swapped = reference[[index[((p.digit + 1) % 10, p.colour, p.template)] for p in prompts]]
    assert separation(reference, swapped, prompts).kept == 0.0
