"""The demo ControlNet's world: a control image (the outline of a handwritten digit, white on black) and the
score "the drawn digit follows the control image, not the prompt".

The ControlNet for demo/sd3-digits (demo/train_controlnet.py) is trained on the outlines of the first
``TRAINING_DIGITS`` of scikit-learn's digits; the rest are held out, and evaluation draws its control images from
them, with prompts that name another digit, so a model that followed the prompt would score zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovsd3.demo.digits import COLOURS, IMAGE_SIZE, TEMPLATES, DigitPrompt, DigitScorer, load_digits

TRAINING_DIGITS = 1500  # of scikit-learn's 1,797: the last 297 are the held-out control images
STROKE_THRESHOLD = 0.5  # an enlarged digit's pixels brighter than this are its stroke
OUTLINE_WIDTH = 2  # pixels of stroke kept inside its edge
# What the questions of control_cases are, in a sentence (a report prints it above their score)
CASES_DESCRIPTION = ("control images: outlines of handwritten digits held out of the demo ControlNet's training; "
                     "every prompt names another digit, so a picture follows the control image only if the "
                     "ControlNet does the work")


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (3x3 erosion; outside the image counts as background)."""
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        height, width = mask.shape
        mask = np.logical_and.reduce([padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return mask


def outline(digit: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The control image for an 8x8 grey digit in [0, 1]: the edge of its stroke (enlarged as
    ``digits.render`` enlarges it), ``OUTLINE_WIDTH`` pixels wide, white on black, (size, size, 3) uint8."""
    from PIL import Image

    grey = Image.fromarray((np.clip(digit, 0.0, 1.0) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    stroke = np.asarray(grey, dtype=np.float32) / 255.0 > STROKE_THRESHOLD
    edge = stroke & ~_eroded(stroke, OUTLINE_WIDTH)
    return np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=2)


@dataclass(frozen=True)
class ControlCase:
    """One evaluation question: draw ``digit`` (shown by ``control``) in the colour ``prompt`` names, though
    ``prompt`` names another digit."""
    control: np.ndarray  # (64, 64, 3) uint8, white outline on black
    digit: int
    prompt: str


def other_digit(digit: int, index: int) -> int:
    """The ``index``-th digit other than ``digit``, cycling through all nine."""
    return (digit + 1 + index % 9) % 10


def control_cases(count: int) -> list[ControlCase]:
    """``count`` fixed questions from the held-out digits: every control digit, colour and phrasing in turn, each
    prompt naming a digit other than the control image's."""
    images, labels = load_digits()
    held_out = np.arange(TRAINING_DIGITS, len(images))
    by_digit = [held_out[labels[held_out] == digit] for digit in range(10)]
    colours = list(COLOURS)
    cases = []
    for index in range(count):
        digit = index % 10
        picks = by_digit[digit]
        image = images[picks[(index // 10) % len(picks)]]
        asked = DigitPrompt(other_digit(digit, index // 10), colours[(index // 10 + index) % len(colours)],
                            (index // 60 + index) % len(TEMPLATES))
        cases.append(ControlCase(outline(image), digit, asked.text))
    return cases


@dataclass
class ControlScore:
    follows: list[bool]  # the control image's digit, in the prompt's colour
    digit_follows_control: list[bool]
    digit_follows_prompt: list[bool]
    colour_matches: list[bool]

    @property
    def share(self) -> float:
        return float(np.mean(self.follows))

    def to_json(self) -> dict:
        return {"share": self.share, "digit_follows_control": float(np.mean(self.digit_follows_control)),
                "digit_follows_prompt": float(np.mean(self.digit_follows_prompt)),
                "colour": float(np.mean(self.colour_matches)), "follows": self.follows}


def score_control(scorer: DigitScorer, images, cases: list[ControlCase]) -> ControlScore:
    """How far ``images`` (one per case) follow their control image: the digit read from each picture against
    the control image's digit and the prompt's, and its colour against the prompt's."""
    if len(images) != len(cases):
        raise ValueError(f"{len(images)} images for {len(cases)} control cases")
    to_control, to_prompt, colours = [], [], []
    for image, case in zip(images, cases):
        asked = DigitPrompt.parse(case.prompt)
        if asked is None:
            raise ValueError(f"prompt {case.prompt!r} does not name one digit and one colour")
        digit, colour = scorer.read(image)
        to_control.append(digit == case.digit)
        to_prompt.append(digit == asked.digit)
        colours.append(colour == asked.colour)
    return ControlScore([d and c for d, c in zip(to_control, colours)], to_control, to_prompt, colours)
