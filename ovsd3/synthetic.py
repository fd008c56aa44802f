"""Random-weight SD3 pipelines built in code, for tests and full-size measurements.

No model hub is needed: the tokenizers are generated from a small word list (a byte-level BPE for the
two CLIPs, a unigram vocabulary for T5, both in the formats the real checkpoints use, so
openvino-tokenizers converts them the same way), and the models are built from a preset's shapes.
"""

from __future__ import annotations

import contextlib
import json
import string
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from ovsd3.presets import SD3Arch

# Words the generated tokenizers know as whole tokens; anything else falls back to characters.
DEFAULT_CORPUS = (
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of mountains at sunset",
    "a bowl of fruit on a wooden table",
    "a lighthouse on a rocky coast during a storm",
    "a blue digit seven on a black background",
)

# Module names the Flash SD3 adapter targets (jasperai/flash-sd3, PEFT format).
FLASH_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2", "linear", "linear_1", "linear_2",
)


def _byte_level_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """A few rounds of plain BPE over whole words (with CLIP's end-of-word marker)."""
    segmented = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in words if word)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged: Counter = Counter()
        for symbols, count in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        segmented = merged
    return merges


def build_clip_tokenizer(corpus=DEFAULT_CORPUS, *, pad_token: str = "<|endoftext|>", num_merges: int = 200):
    """A CLIP byte-level BPE tokenizer with a small vocabulary learnt from ``corpus``.

    ``pad_token="!"`` reproduces CLIP-G in the real SD3 checkpoints, which pads with ``!`` (id 0 there).
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    words = [word for sentence in corpus for word in sentence.lower().split()]
    merges = _learn_bpe_merges(words, num_merges)
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def build_t5_tokenizer(corpus=DEFAULT_CORPUS):
    """A T5 unigram tokenizer: every corpus word is one piece, other text falls back to characters."""
    from transformers import T5Tokenizer

    words = sorted({word for sentence in corpus for word in sentence.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0 - 0.001 * i) for i, word in enumerate(words)]
    pieces += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Building directly in the target dtype keeps peak memory at one copy of the weights
    # (T5-XXL would need 19 GB if built in fp32 and cast afterwards).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _clip_text_encoder(arch, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # ClipArch's fields are CLIPTextConfig's own names.
    config = CLIPTextConfig(**dict(asdict(arch), vocab_size=max(arch.vocab_size, len(tokenizer))),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config)


def _t5_encoder(arch, tokenizer):
    from transformers import T5Config, T5EncoderModel

    # T5Arch's fields are T5Config's own names.
    config = T5Config(**dict(asdict(arch), vocab_size=max(arch.vocab_size, len(tokenizer))),
                      is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config)


def _tokenizers(with_t5: bool, corpus) -> dict:
    return {
        "tokenizer": build_clip_tokenizer(corpus),
        "tokenizer_2": build_clip_tokenizer(corpus, pad_token="!"),  # as in the real CLIP-G tokenizer
        "tokenizer_3": build_t5_tokenizer(corpus) if with_t5 else None,
    }


def _model_builders(arch: SD3Arch, tokenizers: dict) -> dict:
    """Zero-argument builders, so a caller can hold one component at a time."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    builders = {
        "transformer": lambda: SD3Transformer2DModel(**arch.transformer.diffusers_config()),
        "text_encoder": lambda: _clip_text_encoder(arch.clip_l, tokenizers["tokenizer"]),
        "text_encoder_2": lambda: _clip_text_encoder(arch.clip_g, tokenizers["tokenizer_2"]),
        "vae": lambda: AutoencoderKL(**arch.vae.diffusers_config()),
    }
    if tokenizers["tokenizer_3"] is not None:
        builders["text_encoder_3"] = lambda: _t5_encoder(arch.t5, tokenizers["tokenizer_3"])
    return builders


def _build(builder, dtype: torch.dtype):
    with _default_dtype(dtype):
        return builder().eval()


def _scheduler(arch: SD3Arch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=arch.scheduler_shift)


def build_random_pipeline(arch: SD3Arch, *, with_t5: bool = True, seed: int = 0,
                          dtype: torch.dtype = torch.float32, corpus=DEFAULT_CORPUS):
    """A StableDiffusion3Pipeline of ``arch``'s shapes with random weights, in memory."""
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizers = _tokenizers(with_t5, corpus)
    models = {name: _build(builder, dtype) for name, builder in _model_builders(arch, tokenizers).items()}
    models.setdefault("text_encoder_3", None)
    return StableDiffusion3Pipeline(scheduler=_scheduler(arch), **tokenizers, **models)


def _model_index(with_t5: bool) -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if with_t5 else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5Tokenizer"] if with_t5 else [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_random_pipeline(arch: SD3Arch, path: str | Path, *, with_t5: bool = True, seed: int = 0,
                         dtype: torch.dtype = torch.float32, corpus=DEFAULT_CORPUS,
                         log=lambda line: None) -> Path:
    """Write a random-weight pipeline as a diffusers folder (what ``from_pretrained`` reads).

    Components are built and written one at a time, so full-size SD3 with T5-XXL needs the memory of
    its largest component only.
    """
    import gc

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizers = _tokenizers(with_t5, corpus)
    for name, tokenizer in tokenizers.items():
        if tokenizer is not None:
            tokenizer.save_pretrained(path / name)
    for name, builder in _model_builders(arch, tokenizers).items():
        log(f"building {name}")
        module = _build(builder, dtype)
        module.save_pretrained(path / name)
        del module
        gc.collect()
    _scheduler(arch).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(_model_index(with_t5), indent=2, sort_keys=True) + "\n")
    return path


def save_random_lora(transformer, path: str | Path, *, rank: int = 4, lora_alpha: float = 8.0,
                     seed: int = 0, targets=FLASH_LORA_TARGETS, std: float = 0.2) -> Path:
    """Write a random PEFT adapter shaped like Flash SD3's (same target modules) for ``transformer``.

    PEFT initialises lora_B to zero (a no-op adapter); both factors are randomised here so that a
    merge that is wrong, or missing, changes the output.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(transformer, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    path = Path(path)
    peft_model.save_pretrained(path)
    # Undo the injection so the caller's transformer is left as it was.
    peft_model.unload()
    return path


def describe(path: str | Path) -> dict:
    """The model_index.json of a saved pipeline, for quick inspection."""
    return json.loads((Path(path) / "model_index.json").read_text())


def save_random_clip(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel (text and vision towers) with its processor, as `ovsd3 report --clip` loads
    a real one (for example openai/clip-vit-large-patch14)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    path = Path(path)
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
