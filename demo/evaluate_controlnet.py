"""Score the demo ControlNet: the share of pictures whose digit follows the control image (an outline of a held-out
handwritten digit) in the colour the prompt asks, though every prompt names another digit.

    python demo/evaluate_controlnet.py -n 120
    python demo/evaluate_controlnet.py --ovsd3 digits-cn-fp16 --ovsd3 digits-cn-int8 --no-diffusers -n 120

diffusers' StableDiffusion3ControlNetPipeline runs the shipped model and ControlNet; ``--ovsd3 FOLDER`` runs a
folder converted with ``ovsd3 convert demo/sd3-digits FOLDER --controlnet demo/sd3-digits-controlnet`` through
ovsd3's runtime (``control_image=``, diffusers' keyword). Each is run twice on the same prompts and seeds: with
the control image, and without it (the digit then follows the prompt: the share falls to about zero, which shows
the ControlNet does the work). 28 steps and guidance 7, diffusers' defaults, unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ovsd3.demo.control import ControlCase, control_cases, score_control
from ovsd3.demo.digits import DigitScorer

BATCH = 20


def diffusers_images(model: Path, controlnet: Path | None, cases: list[ControlCase], steps: int, guidance: float,
                     scale: float = 1.0) -> list:
    """Pictures from diffusers, with the control images (``controlnet`` given) or from the plain pipeline."""
    import torch
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline
    from PIL import Image

    if controlnet is None:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
            model, controlnet=SD3ControlNetModel.from_pretrained(controlnet), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(cases), BATCH):
        chunk = cases[start:start + BATCH]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        control = {} if controlnet is None else {
            "control_image": [Image.fromarray(case.control) for case in chunk],
            "controlnet_conditioning_scale": scale}
        torch.manual_seed(start)  # the pipeline samples the control image's latents from torch's global stream
        images += pipe([case.prompt for case in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, **control).images
    return images


def ovsd3_images(folder: Path, cases: list[ControlCase], steps: int, guidance: float, controlled: bool) -> list:
    """Pictures from ovsd3's runtime, with ``control_image=`` (diffusers' keyword) when ``controlled``."""
    from PIL import Image

    from ovsd3.runtime import SD3Pipeline

    pipe = SD3Pipeline.load(folder, device="CPU", cache_dir=None)
    images = []
    for seed, case in enumerate(cases):
        control = {"control_image": Image.fromarray(case.control)} if controlled else {}
        images += pipe(case.prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                       **control).images
    return images


def runs(args) -> list[tuple[str, object]]:
    """(what, draw(cases)) for each runtime asked for, each with and without its control images."""
    drawn = []
    if args.diffusers:
        for controlnet in (args.controlnet, None):
            drawn.append((f"diffusers {args.model} {'with' if controlnet else 'WITHOUT'} control",
                          lambda cases, c=controlnet: diffusers_images(args.model, c, cases, args.steps,
                                                                       args.guidance, args.scale)))
    for folder in args.ovsd3:
        for controlled in (True, False):
            drawn.append((f"ovsd3 {folder} {'with' if controlled else 'WITHOUT'} control",
                          lambda cases, f=folder, c=controlled: ovsd3_images(f, cases, args.steps, args.guidance, c)))
    return drawn


def evaluate(what: str, draw, cases: list[ControlCase], scorer: DigitScorer, save: Path | None) -> dict | None:
    """Draw and score one runtime; an ovsd3 without ControlNet support yet (or a folder without a ControlNet)
    is reported in one line and skipped, so the other runtimes still run."""
    from ovsd3.errors import OvsdError

    started = time.perf_counter()
    try:
        images = draw(cases)
    except OvsdError as error:  # InvalidRequest too: e.g. "got an unexpected keyword argument 'control_image'"
        print(f"{what}: skipped: {str(error).splitlines()[0]}", flush=True)
        return None
    score = score_control(scorer, images, cases).to_json()
    print(f"{what}: {score['share']:.1%} follow the control image (digit follows control "
          f"{score['digit_follows_control']:.1%}, digit follows prompt {score['digit_follows_prompt']:.1%}, colour "
          f"{score['colour']:.1%}) over {len(cases)} generations, {time.perf_counter() - started:.0f} s", flush=True)
    if save is not None:
        save_grid(images, cases, save / (what.replace(" ", "_").replace("/", "-") + ".png"))
    return score


def save_grid(images: list, cases: list[ControlCase], path: Path) -> None:
    """The first 30 control images, each above its picture."""
    from PIL import Image

    grid = Image.new("RGB", (64 * 10, 64 * 6))
    for index, (image, case) in enumerate(zip(images[:30], cases[:30])):
        x, y = 64 * (index % 10), 128 * (index // 10)
        grid.paste(Image.fromarray(case.control), (x, y))
        grid.paste(image, (x, y + 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("demo/sd3-digits"), help="the diffusers demo model")
    parser.add_argument("--controlnet", type=Path, default=Path("demo/sd3-digits-controlnet"))
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="only the ovsd3 folders")
    parser.add_argument("--ovsd3", type=Path, action="append", default=[],
                        help="an OpenVINO folder converted with --controlnet (repeatable)")
    parser.add_argument("-n", type=int, default=120, help="generations per runtime and setting")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale (diffusers)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (diffusers)")
    parser.add_argument("--save", type=Path, default=None, help="write a grid of control images and pictures")
    args = parser.parse_args()
    if args.n < 1 or args.threads < 1:
        parser.error("-n and --threads must be at least 1")
    import torch

    torch.set_num_threads(args.threads)  # on a busy machine, threads spinning for a core they never get cost most
    cases, scorer = control_cases(args.n), DigitScorer()
    for what, draw in runs(args):
        evaluate(what, draw, cases, scorer, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
