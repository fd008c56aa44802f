"""Train ovsd3's demo model: a small SD3 (the diffusers classes, SD3's latent layout) that draws coloured
handwritten digits from prompts such as "a red digit 7 on a black background".

    python demo/train.py --out demo/sd3-digits

1. Data: scikit-learn's 1,797 handwritten digits (8x8), enlarged to 64x64 and drawn in each of six colours;
   prompts from four phrasings (ovsd3/demo/digits.py).
2. The text encoders (two small CLIPs and a small T5) and their tokenizers, whose vocabulary covers the prompts, are
   randomly initialised and stay frozen: the transformer learns to read their embeddings.
3. The VAE (AutoencoderKL, 16 latent channels, /8) is trained first as an autoencoder (L1 + a small KL);
   its latents' mean and spread give shift_factor and scaling_factor, as SD3's were chosen.
4. The transformer (SD3Transformer2DModel) is trained with the rectified-flow objective and logit-normal
   timestep sampling, as SD3 was: x_t = (1 - t) x0 + t noise, target noise - x0, t = sigmoid(N(0, 1)); one
   prompt in ten is dropped (empty prompt) so classifier-free guidance works.

Fixed seeds; the losses are printed as it goes. The result is a diffusers folder
(StableDiffusion3Pipeline.from_pretrained loads it) with its recipe in ovsd3_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ovsd3 import layout
from ovsd3.demo.digits import COLOURS, TEMPLATES, all_prompts, load_digits, render
from ovsd3.presets import get_preset
from ovsd3.synthetic import build_random_pipeline

MAX_SEQUENCE_LENGTH = 256  # diffusers' default T5 length
DROP_PROMPT = 0.1


def rendered_dataset() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every digit in every colour: images in [-1, 1] (n, 3, 64, 64), their digit and colour index."""
    digits, labels = load_digits()
    images, digit_of, colour_of = [], [], []
    for colour_index, colour in enumerate(COLOURS):
        for digit, label in zip(digits, labels):
            images.append(render(digit, colour))
            digit_of.append(label)
            colour_of.append(colour_index)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, np.asarray(digit_of), np.asarray(colour_of)


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, generator: torch.Generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(pixels), (batch,), generator=generator)
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (reconstruction - x).abs().mean()
        loss = l1 + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == 1:
            print(f"vae step {step}/{steps}: L1 {l1.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


@torch.no_grad()
def prompt_table(pipe) -> tuple[dict[tuple[int, int, int], int], torch.Tensor, torch.Tensor]:
    """Embeddings of every prompt (and of the empty prompt, last), computed once: the encoders are frozen."""
    prompts = all_prompts()
    texts = [prompt.text for prompt in prompts] + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
    colours = list(COLOURS)
    lookup = {(p.digit, colours.index(p.colour), p.template): i for i, p in enumerate(prompts)}
    return lookup, embeds, pooled


def train_transformer(transformer, latents: torch.Tensor, digit_of: np.ndarray, colour_of: np.ndarray,
                      lookup: dict, embeds: torch.Tensor, pooled: torch.Tensor, steps: int, batch: int, lr: float,
                      generator: torch.Generator) -> None:
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    empty = len(embeds) - 1
    started, running = time.perf_counter(), []
    for step in range(1, steps + 1):
        index = torch.randint(len(latents), (batch,), generator=generator)
        templates = torch.randint(len(TEMPLATES), (batch,), generator=generator)
        rows = torch.tensor([lookup[(int(digit_of[i]), int(colour_of[i]), int(t))] for i, t in zip(index, templates)])
        rows[torch.rand(batch, generator=generator) < DROP_PROMPT] = empty
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal (0, 1), as SD3
        x_t = (1.0 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        velocity = transformer(hidden_states=x_t, timestep=t * 1000.0, encoder_hidden_states=embeds[rows],
                               pooled_projections=pooled[rows], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % 100 == 0 or step == 1:
            print(f"transformer step {step}/{steps}: loss {np.mean(running):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            running = []
    transformer.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo/sd3-digits"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2500, help="transformer training steps")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corpus = [prompt.text for prompt in all_prompts()]
    # A small T5 too: diffusers' from_pretrained then loads the folder with no extra arguments.
    pipe = build_random_pipeline(get_preset("digits"), with_t5=True, seed=args.seed, corpus=corpus)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.requires_grad_(False)

    started = time.perf_counter()
    pixels, digit_of, colour_of = rendered_dataset()
    print(f"{len(pixels)} training images (digits x colours)", flush=True)
    train_vae(pipe.vae, pixels, args.vae_steps, args.batch, args.lr, generator)
    raw = encode_all(pipe.vae, pixels)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    print(f"latents: shift_factor {shift:.4f}, scaling_factor {scale:.4f}", flush=True)

    lookup, embeds, pooled = prompt_table(pipe)
    train_transformer(pipe.transformer, latents, digit_of, colour_of, lookup, embeds, pooled, args.steps,
                      args.batch, args.lr, generator)
    minutes = (time.perf_counter() - started) / 60

    pipe.save_pretrained(args.out)
    recipe = {"demo": "digits", "seed": args.seed, "vae_steps": args.vae_steps, "transformer_steps": args.steps,
              "batch": args.batch, "lr": args.lr, "minutes": round(minutes, 1), "torch": torch.__version__, "cpus": os.cpu_count()}
    (args.out / layout.DEMO_RECORD).write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"trained in {minutes:.1f} min; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
