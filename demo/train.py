"""Train ovsd3's demo model: a small SD3 (the diffusers classes, SD3's latent layout) that draws coloured
handwritten digits from prompts such as "a red digit 7 on a black background".

    python demo/train.py --out demo/sd3-digits

1. Data: scikit-learn's 1,797 handwritten digits (8x8), enlarged to 64x64 and drawn in each of six colours;
   prompts from four phrasings (ovsd3/demo/digits.py).
2. The text encoders (two small CLIPs and a small T5) and their tokenizers, whose vocabulary covers the prompts.
   The CLIPs are trained first, on the prompts alone, to tell the digit and the colour (cross-entropy over cosine
   similarities to a prototype per label, from their pooled embeddings and from their penultimate tokens, which is
   what SD3 reads), then frozen: prompts that differ in one word end far apart, by a margin that INT4 weights do
   not cross. The T5 is silenced (its final layer norm is zero, so it outputs exactly the zeros diffusers feeds
   when T5 is left out): the model then draws the same with or without T5 (`ovsd3 convert --no-t5`), and
   training can use the shortcut below.
3. The VAE (AutoencoderKL, 16 latent channels, /8) is trained next, as an autoencoder (L1 + a small KL);
   its latents' mean and spread give shift_factor and scaling_factor, as SD3's were chosen. It reads no prompt,
   so ``--vae FOLDER`` may take an earlier run's instead (checked the same way).
4. The transformer (SD3Transformer2DModel) is trained with the rectified-flow objective and logit-normal
   timestep sampling, as SD3 was: x_t = (1 - t) x0 + t noise, target noise - x0, t = sigmoid(N(0, 1)); one
   prompt in ten is dropped (empty prompt) so classifier-free guidance works. An exponential moving average of
   the weights is what ships.

Shortcut: at run time the transformer reads 77 CLIP tokens and 256 (zero) T5 tokens. 256 identical tokens stay
identical through every layer, so attending to them equals attending to one of them with its score raised by
log(256); training feeds one and adds that bias (CollapsedPaddingAttention), about 4x less work per step. The
script checks the two agree before it starts.

Fixed seeds; the losses are printed as it goes. The result is a diffusers folder
(StableDiffusion3Pipeline.from_pretrained loads it) with its recipe in ovsd3_demo.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ovsd3 import layout
from ovsd3.demo.digits import COLOURS, TEMPLATES, DigitScorer, all_prompts, load_digits, render
from ovsd3.presets import get_preset
from ovsd3.synthetic import build_random_pipeline

MAX_SEQUENCE_LENGTH = 256  # diffusers' default T5 length: the run-time sequence the shortcut stands for
DROP_PROMPT = 0.1
VAE_BATCH = 16
MIN_ROUND_TRIP = 0.95  # the VAE must keep digits and colours readable: the transformer cannot do better
EMA_DECAY = 0.999
LABEL_SCALE = 10.0  # cosine-similarity logits times this: a softmax sharp enough to separate every label


class CollapsedPaddingAttention:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0) where the last context token stands for
    ``copies`` identical tokens: its attention score is raised by log(copies), exactly as if all were there."""

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                             heads(attn.to_v(hidden_states)))
        context_query, context_key, context_value = (heads(attn.add_q_proj(encoder_hidden_states)),
                                                     heads(attn.add_k_proj(encoder_hidden_states)),
                                                     heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_q is not None:
            context_query, context_key = attn.norm_added_q(context_query), attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        image_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](image_out)), context_out


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


def cosine_schedule(optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero: the last, small steps settle the weights."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, generator: torch.Generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps, warmup=100)
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
        schedule.step()
        if step % 100 == 0 or step == 1:
            print(f"vae step {step}/{steps}: L1 {l1.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


@torch.no_grad()
def round_trip_accuracy(vae, pixels: torch.Tensor, prompts: list[str], scorer: DigitScorer) -> float:
    """Share of images whose digit and colour the scorer still reads after the VAE's encode and decode: the
    ceiling for what the transformer can reach."""
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return scorer.score(list(images), prompts).accuracy


def clip_features(encoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3 takes from a CLIP: its pooled projection, and its penultimate layer's tokens (here their mean)."""
    out = encoder(input_ids, output_hidden_states=True)
    return out.text_embeds, out.hidden_states[-2].mean(dim=1)


def label_loss(features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the cosine similarities to one prototype per label: it separates the labels by angle,
    whatever the features' scale, so a small relative error (INT4 weights) cannot carry one label to another."""
    logits = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return F.cross_entropy(LABEL_SCALE * logits, labels)


def train_text_encoders(pipe, steps: int, lr: float) -> None:
    """Teach both CLIPs the prompts' labels, before the transformer learns to read them: their pooled
    embeddings and their penultimate tokens each tell the digit and the colour, whatever the phrasing.
    Random encoders left "red 7" and "red 1" as close as INT4 rounding moves either."""
    prompts = all_prompts()
    texts = [prompt.text for prompt in prompts]
    digits = torch.tensor([prompt.digit for prompt in prompts])
    colours = torch.tensor([list(COLOURS).index(prompt.colour) for prompt in prompts])
    for name, encoder, tokenizer in (("CLIP-L", pipe.text_encoder, pipe.tokenizer),
                                     ("CLIP-G", pipe.text_encoder_2, pipe.tokenizer_2)):
        input_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        widths = (encoder.config.projection_dim, encoder.config.hidden_size)
        prototypes = [torch.nn.Parameter(torch.randn(count, width)) for width in widths
                      for count in (10, len(COLOURS))]
        encoder.train().requires_grad_(True)
        optimizer = torch.optim.AdamW([*encoder.parameters(), *prototypes], lr=lr, weight_decay=0.0)
        for step in range(1, steps + 1):
            pooled, tokens = clip_features(encoder, input_ids)
            losses = [label_loss(pooled, prototypes[0], digits), label_loss(pooled, prototypes[1], colours),
                      label_loss(tokens, prototypes[2], digits), label_loss(tokens, prototypes[3], colours)]
            loss = sum(losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == 1:
                print(f"{name} step {step}/{steps}: label loss {loss.item():.4f}", flush=True)
        encoder.eval().requires_grad_(False)


@torch.no_grad()
def prompt_table(pipe) -> tuple[dict[tuple[int, int, int], int], torch.Tensor, torch.Tensor]:
    """Embeddings of every prompt (and of the empty prompt, last), computed once: the encoders are frozen.
    The T5 part is one token, the stand-in for the 256 identical ones (see CollapsedPaddingAttention)."""
    prompts = all_prompts()
    texts = [prompt.text for prompt in prompts] + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                            max_sequence_length=1)
    colours = list(COLOURS)
    lookup = {(p.digit, colours.index(p.colour), p.template): i for i, p in enumerate(prompts)}
    return lookup, embeds, pooled


@torch.no_grad()
def check_shortcut(pipe) -> None:
    """Fail loudly unless the collapsed transformer gives what diffusers' own attention gives at run time."""
    texts = ["a red digit 7 on a black background", ""]
    full, _, full_pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                                 max_sequence_length=MAX_SEQUENCE_LENGTH)
    if full[:, -MAX_SEQUENCE_LENGTH:].abs().max() != 0:
        raise SystemExit("the silenced T5 does not output zeros")
    latents, timestep = torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0])
    transformer = copy.deepcopy(pipe.transformer)  # diffusers' attention
    reference = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=full,
                            pooled_projections=full_pooled, return_dict=False)[0]
    transformer.set_attn_processor(CollapsedPaddingAttention(MAX_SEQUENCE_LENGTH))
    collapsed_length = full.shape[1] - MAX_SEQUENCE_LENGTH + 1  # the CLIP tokens and one zero T5 token
    collapsed = transformer(hidden_states=latents, timestep=timestep,
                            encoder_hidden_states=full[:, :collapsed_length],
                            pooled_projections=full_pooled, return_dict=False)[0]
    difference = (reference - collapsed).abs().max().item()
    if difference > 1e-4:
        raise SystemExit(f"the training shortcut differs from diffusers' attention by {difference:.2e}")
    print(f"shortcut checked: {difference:.1e} from diffusers' attention over {MAX_SEQUENCE_LENGTH} T5 tokens",
          flush=True)


def train_transformer(transformer, latents: torch.Tensor, digit_of: np.ndarray, colour_of: np.ndarray,
                      lookup: dict, embeds: torch.Tensor, pooled: torch.Tensor, steps: int, batch: int, lr: float,
                      generator: torch.Generator) -> torch.nn.Module:
    """Rectified flow with logit-normal t; returns the moving average of the weights."""
    transformer.set_attn_processor(CollapsedPaddingAttention(MAX_SEQUENCE_LENGTH))
    transformer.train()
    average = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps, warmup=200)
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
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory early, while the weights move fast
        with torch.no_grad():
            for kept, current in zip(average.parameters(), transformer.parameters()):
                kept.lerp_(current, 1.0 - decay)
        running.append(loss.item())
        if step % 250 == 0 or step == 1:
            print(f"transformer step {step}/{steps}: loss {np.mean(running):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            running = []
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    average.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own attention again, for what ships
    return average


def prepare_vae(pipe, taken_from: Path | None, steps: int, lr: float,
                generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Train the VAE (or take ``taken_from``'s), check it keeps the digits readable, set its latent shift and
    scale; returns the training set's latents with each image's digit and colour index."""
    pixels, digit_of, colour_of = rendered_dataset()
    print(f"{len(pixels)} training images (digits x colours)", flush=True)
    if taken_from is None:
        train_vae(pipe.vae, pixels, steps, VAE_BATCH, lr, generator)
    else:
        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(taken_from / "vae").state_dict())
        pipe.vae.eval()
        print(f"VAE taken from {taken_from}", flush=True)
    sample = torch.randperm(len(pixels), generator=generator)[:300]
    colours = list(COLOURS)
    sample_prompts = [f"{colours[colour_of[i]]} {digit_of[i]}" for i in sample.tolist()]
    kept = round_trip_accuracy(pipe.vae, pixels[sample], sample_prompts, DigitScorer())
    print(f"VAE round trip: {kept:.1%} of {len(sample)} images still read as their digit and colour", flush=True)
    if kept < MIN_ROUND_TRIP:
        raise SystemExit(f"the VAE keeps only {kept:.1%} of digits readable (needs {MIN_ROUND_TRIP:.0%}); "
                         "train it longer")
    raw = encode_all(pipe.vae, pixels)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    print(f"latents: shift_factor {shift:.4f}, scaling_factor {scale:.4f}", flush=True)
    return (raw - shift) * scale, digit_of, colour_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo/sd3-digits"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-steps", type=int, default=300, help="text encoder steps (all prompts each)")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae", type=Path, default=None,
                        help="take the VAE from this demo folder instead of training one (it reads no prompt, so a "
                             "retrain of the encoders and transformer can keep it)")
    parser.add_argument("--steps", type=int, default=6000, help="transformer training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corpus = [prompt.text for prompt in all_prompts()]
    pipe = build_random_pipeline(get_preset("digits"), with_t5=True, seed=args.seed, corpus=corpus)
    with torch.no_grad():
        pipe.text_encoder_3.encoder.final_layer_norm.weight.zero_()  # silenced: outputs exactly zero
    pipe.text_encoder_3.requires_grad_(False)

    started = time.perf_counter()
    train_text_encoders(pipe, args.text_steps, args.lr)
    latents, digit_of, colour_of = prepare_vae(pipe, args.vae, args.vae_steps, args.lr, generator)

    lookup, embeds, pooled = prompt_table(pipe)
    check_shortcut(pipe)
    pipe.transformer = train_transformer(pipe.transformer, latents, digit_of, colour_of, lookup, embeds, pooled,
                                         args.steps, args.batch, args.lr, generator)
    minutes = (time.perf_counter() - started) / 60

    pipe.save_pretrained(args.out)
    recipe = {"demo": "digits", "seed": args.seed, "text_encoder_steps": args.text_steps,
              "vae_steps": args.vae_steps if args.vae is None else f"taken from {args.vae}", "vae_batch": VAE_BATCH,
              "transformer_steps": args.steps, "batch": args.batch, "lr": args.lr, "ema_decay": EMA_DECAY,
              "minutes": round(minutes, 1), "torch": torch.__version__, "cpus": os.cpu_count()}
    (args.out / layout.DEMO_RECORD).write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"trained in {minutes:.1f} min; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
