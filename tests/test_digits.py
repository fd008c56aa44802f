"""The demo's data and its scorer: prompts say what they ask, rendered digits are read back."""

from __future__ import annotations

import numpy as np
import pytest

from ovsd3.demo.digits import COLOURS, TEMPLATES, DigitPrompt, DigitScorer, all_prompts, load_digits, render


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
