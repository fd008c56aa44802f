"""Train the demo ControlNet for demo/sd3-digits: an outline of a handwritten digit in, that digit drawn in the
colour the prompt asks, even when the prompt names another digit.

    python demo/train_controlnet.py --model demo/sd3-digits --out demo/sd3-digits-controlnet > demo/train_controlnet.log

1. The ControlNet is diffusers' ``SD3ControlNetModel.from_transformer(transformer, num_layers=2)``: the SD3 Medium
   kind (its own position embedding, ``use_pos_embed=True``; InstantX's conventions: zero pooled projection, the
   control latents not shifted), its two blocks copied from the demo transformer's first two, its control patch
   embedding and output linears starting at zero, as diffusers' train_controlnet_sd3.py builds one.
2. Data: the first ``TRAINING_DIGITS`` of scikit-learn's digits (the rest are held out for evaluation), each in
   the six colours; the control image is the digit's outline, white on black (ovsd3/demo/control.py). The prompt
   names the target's colour and, nine times in ten, another digit (and one prompt in ten is empty, as for
   classifier-free guidance): the prompt cannot tell the digit, only the control image can.
3. The demo's transformer, VAE and text encoders are frozen; the targets' VAE latents, the control images' latent
   distributions and every prompt's embeddings are computed once. Loss: rectified flow with logit-normal
   timesteps, as demo/train.py trains the transformer; the ControlNet's residuals are added to the frozen
   transformer's blocks as the pipeline adds them. It trains with demo/train.py's shortcut for the 256 zero T5
   tokens (checked against diffusers' attention, ControlNet included, before training starts). An exponential
   moving average of the ControlNet's weights is what ships.

One thread (the machine is shared), fixed seeds; the result is a diffusers folder (config.json and
diffusion_pytorch_model.safetensors, fp32) that StableDiffusion3ControlNetPipeline loads, with its recipe in
training.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo/train.py's shortcut and schedule
from train import MAX_SEQUENCE_LENGTH, CollapsedPaddingAttention, cosine_schedule, prompt_table  # noqa: E402

from ovsd3.demo.control import TRAINING_DIGITS, outline  # noqa: E402
from ovsd3.demo.digits import COLOURS, TEMPLATES, load_digits, render  # noqa: E402

CONTROL_LAYERS = 2
PROMPT_NAMES_CONTROL_DIGIT = 0.1  # the prompt's digit is drawn uniformly: 1 in 10 it is the control image's
DROP_PROMPT = 0.1
EMA_DECAY = 0.999
RECORD = "training.json"


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images as the pipelines feed them to the VAE: (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def latent_distribution(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's VAE posterior (mean, std), raw (not shifted or scaled)."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def training_set(vae) -> dict[str, torch.Tensor]:
    """Targets (every training digit in every colour) as scaled latents, with their digit image's index and
    colour; the control images' posteriors (one per digit image), scaled as the pipeline scales them (SD3
    Medium ControlNets with a zero pooled projection: no shift)."""
    digits, labels = load_digits()
    digits, labels = digits[:TRAINING_DIGITS], labels[:TRAINING_DIGITS]
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    targets, digit_index, colour_index = [], [], []
    for colour_number, colour in enumerate(COLOURS):
        targets += [render(digit, colour) for digit in digits]
        digit_index += range(len(digits))
        colour_index += [colour_number] * len(digits)
    target_mean, _ = latent_distribution(vae, to_pixels(targets))
    control_mean, control_std = latent_distribution(vae, to_pixels([outline(digit) for digit in digits]))
    return {"x0": (target_mean - shift) * scale, "digit_index": torch.tensor(digit_index),
            "colour_index": torch.tensor(colour_index), "label": torch.from_numpy(labels),
            "control_mean": control_mean * scale, "control_std": control_std * scale}


def predict(controlnet, transformer, x_t, timestep, embeds, pooled, control) -> torch.Tensor:
    """The velocity with control, as StableDiffusion3ControlNetPipeline computes it (conditioning scale 1)."""
    residuals = controlnet(hidden_states=x_t, controlnet_cond=control, encoder_hidden_states=embeds,
                           pooled_projections=torch.zeros_like(pooled), timestep=timestep, return_dict=False)[0]
    return transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                       block_controlnet_hidden_states=residuals, return_dict=False)[0]


@torch.no_grad()
def check_shortcut(pipe, controlnet) -> None:
    """Fail loudly unless the collapsed attention gives what diffusers' attention gives at run time, with the
    ControlNet's residuals (made non-zero here: they start at zero) flowing into the transformer."""
    texts = ["a red digit 7 on a black background", ""]
    full, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
    probe = copy.deepcopy(controlnet)
    for parameter in [*probe.controlnet_blocks.parameters(), *probe.pos_embed_input.parameters()]:
        parameter.normal_(0, 0.05)
    transformer = copy.deepcopy(pipe.transformer)
    latents, control, timestep = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0])
    reference = predict(probe, transformer, latents, timestep, full, pooled, control)
    for model in (probe, transformer):
        model.set_attn_processor(CollapsedPaddingAttention(MAX_SEQUENCE_LENGTH))
    collapsed = predict(probe, transformer, latents, timestep, full[:, :full.shape[1] - MAX_SEQUENCE_LENGTH + 1],
                        pooled, control)
    difference = (reference - collapsed).abs().max().item()
    if difference > 1e-4:
        raise SystemExit(f"the training shortcut differs from diffusers' attention by {difference:.2e}")
    print(f"shortcut checked with the ControlNet: {difference:.1e} from diffusers' attention", flush=True)


def sample_batch(data: dict, lookup: dict, empty_row: int, batch: int, generator: torch.Generator):
    """(x0, control latents, prompt rows) for ``batch`` random targets; the prompt names the target's colour and
    a random digit, or is empty."""
    pick = torch.randint(len(data["x0"]), (batch,), generator=generator)
    digit_image = data["digit_index"][pick]
    named = torch.randint(10, (batch,), generator=generator)
    templates = torch.randint(len(TEMPLATES), (batch,), generator=generator)
    rows = torch.tensor([lookup[(int(d), int(c), int(t))]
                         for d, c, t in zip(named, data["colour_index"][pick], templates)])
    rows[torch.rand(batch, generator=generator) < DROP_PROMPT] = empty_row
    mean, std = data["control_mean"][digit_image], data["control_std"][digit_image]
    control = mean + std * torch.randn(mean.shape, generator=generator)  # the pipeline samples the posterior
    return data["x0"][pick], control, rows


def train(controlnet, transformer, data: dict, prompts: tuple, args, generator: torch.Generator):
    """Rectified flow through the frozen transformer; returns the moving average of the ControlNet's weights."""
    lookup, embeds, pooled = prompts
    for model in (controlnet, transformer):
        model.set_attn_processor(CollapsedPaddingAttention(MAX_SEQUENCE_LENGTH))
    transformer.eval().requires_grad_(False)
    controlnet.train()
    average = copy.deepcopy(controlnet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, args.steps, warmup=100)
    started, running = time.perf_counter(), []
    for step in range(1, (args.stop_after or args.steps) + 1):
        x0, control, rows = sample_batch(data, lookup, len(embeds) - 1, args.batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))  # logit-normal, as SD3
        x_t = (1.0 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        velocity = predict(controlnet, transformer, x_t, t * 1000.0, embeds[rows], pooled[rows], control)
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, current in zip(average.parameters(), controlnet.parameters()):
                kept.lerp_(current, 1.0 - decay)
        running.append(loss.item())
        if step % 100 == 0 or step == 1:
            print(f"controlnet step {step}/{args.steps}: loss {np.mean(running):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            running = []
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save(average, args.out, {"steps_so_far": step})
    return average


def save(controlnet, out: Path, record: dict) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    shipped = copy.deepcopy(controlnet)
    shipped.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own attention, for what ships
    shipped.save_pretrained(out, safe_serialization=True)
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("demo/sd3-digits"))
    parser.add_argument("--out", type=Path, default=Path("demo/sd3-digits-controlnet"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end the run after this many steps of the --steps schedule (what a run cut short "
                             "ships: the same weights as its checkpoint at that step)")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="save the moving average every so many steps (0: only at the end)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or not 0 < args.lr < 1:
        parser.error("--steps and --batch must be at least 1, --lr between 0 and 1")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        parser.error(f"--stop-after must be between 1 and --steps ({args.steps})")

    from diffusers import SD3ControlNetModel, StableDiffusion3Pipeline

    torch.set_num_threads(1)  # a shared 2-core machine
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    controlnet = SD3ControlNetModel.from_transformer(pipe.transformer, num_layers=CONTROL_LAYERS,
                                                     num_extra_conditioning_channels=0)
    check_shortcut(pipe, controlnet)
    data = training_set(pipe.vae)
    prompts = prompt_table(pipe)
    print(f"{len(data['x0'])} targets from {TRAINING_DIGITS} digit images, {len(prompts[1])} prompt embeddings "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    average = train(controlnet, pipe.transformer, data, prompts, args, generator)
    minutes = (time.perf_counter() - started) / 60
    record = {"demo": "digits-controlnet", "model": str(args.model), "seed": args.seed, "layers": CONTROL_LAYERS,
              "training_digits": TRAINING_DIGITS, "steps": args.stop_after or args.steps,
              "schedule_steps": args.steps, "batch": args.batch, "lr": args.lr,
              "ema_decay": EMA_DECAY, "minutes": round(minutes, 1), "threads": 1, "torch": torch.__version__}
    save(average, args.out, record)
    print(f"trained in {minutes:.1f} min; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
