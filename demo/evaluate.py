"""Score the demo model: the share of generated images whose digit and colour match the prompt.

    python demo/evaluate.py --diffusers demo/sd3-digits --ovsd3 digits-ov --ovsd3 digits-int8 --genai digits-ov -n 120

diffusers (PyTorch) runs the shipped model; ovsd3 runs converted folders; openvino.genai's Text2ImagePipeline runs
a converted folder twice, its TaylorSeer step caching off and on (its default for SD3); all at the same prompts
and seeds (genai's TorchGenerator draws diffusers' noise), at diffusers' default steps and guidance (28, 7)
unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ovsd3.demo.digits import DigitScorer, evaluation_prompts


def diffusers_images(model: Path, prompts: list[str], steps: int, guidance: float, batch: int = 20) -> list:
    import torch
    from diffusers import StableDiffusion3Pipeline

    has_t5 = (Path(model) / "text_encoder_3").exists()
    without_t5 = {} if has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32, **without_t5)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def ovsd3_images(folder: Path, prompts: list[str], steps: int, guidance: float, cache: str = "off") -> list:
    from ovsd3.runtime import SD3Pipeline

    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None)
    return [pipe(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, cache=cache).images[0]
            for seed, prompt in enumerate(prompts)]


def genai_images(folder: Path, prompts: list[str], steps: int, guidance: float, taylorseer: bool) -> list:
    import openvino_genai
    from PIL import Image

    from ovsd3.report.peers import genai_pipeline

    pipe = genai_pipeline({"folder": folder, "device": "CPU", "taylorseer": taylorseer})
    return [Image.fromarray(pipe.generate(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                          generator=openvino_genai.TorchGenerator(seed)).data[0])
            for seed, prompt in enumerate(prompts)]


def runs(args) -> list[tuple[str, Path, object]]:
    """(what, folder, draw(folder, prompts, steps, guidance)) for each model asked for."""
    def genai(taylorseer: bool):
        return lambda *given: genai_images(*given, taylorseer=taylorseer)

    def ovsd3(cache: str):
        return lambda *given: ovsd3_images(*given, cache=cache)

    return ([("diffusers", folder, diffusers_images) for folder in args.diffusers]
            + [("ovsd3" if cache == "off" else f"ovsd3 (cache {cache})", folder, ovsd3(cache))
               for folder in args.ovsd3 for cache in args.cache or ["off"]]
            + [(f"genai (TaylorSeer {'on' if cached else 'off'})", folder, genai(cached))
               for folder in args.genai for cached in (False, True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers", type=Path, action="append", default=[], help="a diffusers folder")
    parser.add_argument("--ovsd3", type=Path, action="append", default=[], help="an OpenVINO folder")
    parser.add_argument("--genai", type=Path, action="append", default=[],
                        help="an OpenVINO folder for openvino.genai (drawn with its step caching off, then on)")
    parser.add_argument("--cache", action="append", default=None, metavar="MODE",
                        help="ovsd3's step caching, as `ovsd3 run --cache` (repeat: each ovsd3 folder with each)")
    parser.add_argument("-n", type=int, default=120, help="generations per model")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--save", type=Path, default=None, help="write a grid of the first 60 images per model")
    args = parser.parse_args()
    prompts = evaluation_prompts(args.n)
    scorer = DigitScorer()
    for index, (kind, folder, draw) in enumerate(runs(args)):
        started = time.perf_counter()
        images = draw(folder, prompts, args.steps, args.guidance)
        score = scorer.score(images, prompts).to_json()
        print(f"{kind} {folder}: {score['accuracy']:.1%} match (digit {score['digit_accuracy']:.1%}, colour "
              f"{score['colour_accuracy']:.1%}) over {len(prompts)} generations, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        if args.save:
            save_grid(images, args.save / f"{index:02d}-{kind.split()[0]}-{folder.name}.png")
    return 0


def save_grid(images: list, path: Path) -> None:
    from PIL import Image

    grid = Image.new("RGB", (64 * 10, 64 * 6))
    for index, image in enumerate(images[:60]):
        grid.paste(image, (64 * (index % 10), 64 * (index // 10)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


if __name__ == "__main__":
    sys.exit(main())
