"""Writes ovsd3/calibration/prompts.txt and ovsd3/calibration/heldout_prompts.txt (the project's own prompt sets,
shipped inside the package).

Descriptive captions of the kind conceptual_captions holds (people, animals, places, objects, events,
illustrations), composed from hand-written parts with a fixed seed so the files are reproducible:

    python calibration/make_prompts.py

The held-out set is disjoint from the calibration set: the quality gate must not judge a quantized model
on the prompts it was calibrated with.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "a young woman", "an old man", "a group of friends", "a street musician", "a chef", "a cyclist",
    "a little girl", "a firefighter", "a surfer", "a dancer", "a farmer", "a businessman", "a knight",
    "an astronaut", "a golden retriever", "a tabby cat", "a red fox", "a herd of elephants", "a flock of birds",
    "a horse", "a polar bear", "a hummingbird", "a sea turtle", "a lion", "an owl", "a vintage car",
    "a steam locomotive", "a sailboat", "a hot air balloon", "a lighthouse", "a wooden cabin", "a castle",
    "a city skyline", "a suspension bridge", "a bowl of ramen", "a stack of pancakes", "a bouquet of tulips",
    "a cup of coffee", "an old bicycle", "a grand piano", "a robot", "a dragon", "a mountain village",
    "a field of sunflowers", "a waterfall", "a desert canyon", "a snowy forest", "a tropical beach",
    "a busy market", "a cathedral", "a vegetable garden", "a campfire", "a windmill", "a pair of sneakers",
]
SETTINGS = [
    "at sunset", "in the rain", "on a foggy morning", "under a starry sky", "in autumn", "during a storm",
    "in a crowded street", "on a quiet beach", "in a sunlit meadow", "at the edge of a cliff",
    "in a modern kitchen", "in a snowy landscape", "by a mountain lake", "in a neon-lit alley",
    "inside an old library", "on a wooden table", "in front of a brick wall", "at a summer festival",
    "in a misty jungle", "on a city rooftop", "in a field of lavender", "next to a river", "at night",
    "in the desert", "in a greenhouse", "on a frozen lake", "at the harbor", "in a small cafe",
]
STYLES = [
    "photograph", "close-up photograph", "aerial photograph", "black and white photograph", "oil painting",
    "watercolor painting", "pencil sketch", "digital illustration", "cartoon illustration", "3d render",
    "vintage postcard", "cinematic still", "studio portrait", "wide-angle landscape photo", "pixel art",
    "ink drawing", "low-poly render", "film photograph",
]
DETAILS = [
    "", "", "", ", highly detailed", ", soft light", ", vibrant colors", ", dramatic lighting",
    ", shallow depth of field", ", pastel tones", ", golden hour light", ", high contrast",
]


def compose(rng: random.Random) -> str:
    style = rng.choice(STYLES)
    article = "an" if style[0] in "aeiou" else "a"
    return f"{article} {style} of {rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}{rng.choice(DETAILS)}"


def make(count: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng, prompts = random.Random(seed), []
    while len(prompts) < count:
        prompt = compose(rng)
        if prompt not in exclude and prompt not in prompts:
            prompts.append(prompt)
    return prompts


def main() -> None:
    sets = Path(__file__).resolve().parents[1] / "ovsd3" / "calibration"  # package data, in the wheel
    calibration = make(400, seed=0)
    heldout = make(24, seed=1, exclude=set(calibration))
    (sets / "prompts.txt").write_text("\n".join(calibration) + "\n")
    (sets / "heldout_prompts.txt").write_text("\n".join(heldout) + "\n")
    print(f"wrote {len(calibration)} calibration and {len(heldout)} held-out prompts")


if __name__ == "__main__":
    main()
