"""The demo's world: scikit-learn's handwritten digits, coloured, with prompts that say which digit in which
colour; and a scorer that reads both back from a generated image (the project's offline stand-in for a CLIP
score).

scikit-learn's digits are the UCI "Optical Recognition of Handwritten Digits" set (CC BY 4.0): 1,797 images of
8x8 pixels, 16 grey levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ovsd3.errors import OvsdError

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45), "green": (45, 205, 70), "blue": (60, 100, 245),
    "yellow": (240, 215, 40), "magenta": (215, 60, 215), "cyan": (40, 215, 225),
}
TEMPLATES = (
    "a {colour} digit {digit} on a black background",
    "the number {digit} in {colour}",
    "a handwritten {colour} {digit}",
    "{colour} {digit}",
)
_DIGIT = re.compile(r"(?<![\w.])(\d)(?![\w.])")


@dataclass(frozen=True)
class DigitPrompt:
    digit: int
    colour: str
    template: int = 0

    @property
    def text(self) -> str:
        return TEMPLATES[self.template].format(digit=self.digit, colour=self.colour)

    @classmethod
    def parse(cls, text: str) -> "DigitPrompt | None":
        """The digit and colour a prompt asks for; None when it names not exactly one of each."""
        digits = _DIGIT.findall(text)
        colours = [name for name in COLOURS if re.search(rf"\b{name}\b", text.lower())]
        if len(digits) != 1 or len(colours) != 1:
            return None
        return cls(int(digits[0]), colours[0])


def all_prompts() -> list[DigitPrompt]:
    return [DigitPrompt(digit, colour, template) for digit in range(10) for colour in COLOURS
            for template in range(len(TEMPLATES))]


def _require_sklearn() -> None:
    """The digits and the classifier come from scikit-learn, which only the report and test extras install:
    reports and the quantize gate both score digits, so the one-line error is given here, once for both."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise OvsdError("scoring digits needs scikit-learn: pip install scikit-learn (or 'ovsd3[report]')") from None


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) in [0, 1], labels (n,))."""
    _require_sklearn()
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def render(digit: np.ndarray, colour: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """An 8x8 grey digit as a (size, size, 3) uint8 image: smoothly enlarged, in ``colour`` on black."""
    from PIL import Image

    grey = Image.fromarray((np.clip(digit, 0.0, 1.0) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    intensity = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    return np.round(intensity * np.asarray(COLOURS[colour], dtype=np.float32)).astype(np.uint8)


@dataclass
class DigitScore:
    matches: list[bool]  # digit and colour both as the prompt asks
    digit_matches: list[bool]
    colour_matches: list[bool]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.matches))

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "digit_accuracy": float(np.mean(self.digit_matches)),
                "colour_accuracy": float(np.mean(self.colour_matches)), "matches": self.matches}


class DigitScorer:
    """Reads the digit (a support-vector classifier trained on the 8x8 digits, scikit-learn's own example
    recipe) and the colour (nearest palette hue of the bright pixels) from a generated image."""

    def __init__(self, images: np.ndarray | None = None, labels: np.ndarray | None = None):
        """Trained on all of scikit-learn's digits, or on ``images`` (n, 8, 8) in [0, 1] and ``labels``."""
        _require_sklearn()
        from sklearn.svm import SVC

        if images is None:
            images, labels = load_digits()
        self.classifier = SVC(gamma=0.001 * 256).fit(images.reshape(len(images), -1), labels)
        palette = np.asarray(list(COLOURS.values()), dtype=np.float64)
        self._palette = palette / palette.max(axis=1, keepdims=True)

    @staticmethod
    def _as_array(image) -> np.ndarray:
        return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)

    def read(self, image) -> tuple[int, str]:
        """(digit, colour) drawn in ``image`` (a PIL image or an (H, W, 3) array)."""
        pixels = self._as_array(image) / 255.0
        grey = pixels.max(axis=2)
        height, width = grey.shape
        small = grey[: height // 8 * 8, : width // 8 * 8].reshape(8, height // 8, 8, width // 8).mean(axis=(1, 3))
        digit = int(self.classifier.predict(small.reshape(1, -1))[0])
        bright = grey > 0.5 * grey.max() if grey.max() > 0 else np.ones_like(grey, dtype=bool)
        mean = pixels[bright].mean(axis=0)
        chroma = mean / max(mean.max(), 1e-6)
        colour = list(COLOURS)[int(np.argmin(((self._palette - chroma) ** 2).sum(axis=1)))]
        return digit, colour

    def score(self, images, prompts: list[str]) -> DigitScore:
        digit_matches, colour_matches = [], []
        for image, prompt in zip(images, prompts):
            asked = DigitPrompt.parse(prompt)
            if asked is None:
                raise ValueError(f"prompt {prompt!r} does not name one digit and one colour")
            digit, colour = self.read(image)
            digit_matches.append(digit == asked.digit)
            colour_matches.append(colour == asked.colour)
        return DigitScore([d and c for d, c in zip(digit_matches, colour_matches)], digit_matches, colour_matches)


def evaluation_prompts(count: int) -> list[str]:
    """``count`` prompts that walk through every digit, colour and phrasing in turn (a fixed set, so two models
    are scored on the same questions)."""
    colours = list(COLOURS)
    prompts = []
    for index in range(count):
        digit, colour = index % 10, colours[(index // 10 + index) % len(colours)]
        prompts.append(DigitPrompt(digit, colour, (index // 60 + index) % len(TEMPLATES)).text)
    return prompts


def calibration_prompts(count: int, seed: int = 7) -> list[str]:
    """``count`` demo prompts in a fixed shuffled order (for quantization calibration)."""
    prompts = [prompt.text for prompt in all_prompts()]
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:count]]
