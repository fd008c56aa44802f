"""Prompt encoding as diffusers' StableDiffusion3Pipeline does it, with OpenVINO tokenizers and encoders.

CLIP-L and CLIP-G: 77 tokens, no attention mask, token embeddings from the penultimate layer (or earlier
with clip skip), pooled embeddings from the projection. Their token embeddings are joined on the feature
axis, zero-padded (or cropped) to T5's width, and followed on the sequence axis by T5's (or by
zeros of the same shape when the folder has no T5).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ovsd3 import layout
from ovsd3.errors import InvalidRequest, OvsdError
from ovsd3.runtime.devices import InferRequests, OnUse

CLIP_MAX_LENGTH = 77


@dataclass
class PromptEmbeddings:
    prompt_embeds: np.ndarray  # (batch, 77 + max_sequence_length, joint_attention_dim)
    pooled_embeds: np.ndarray  # (batch, clip_l projection + clip_g projection)

    def repeat(self, times: int) -> "PromptEmbeddings":
        """Each prompt's embeddings ``times`` times in a row (several images per prompt)."""
        return PromptEmbeddings(np.repeat(self.prompt_embeds, times, axis=0),
                                np.repeat(self.pooled_embeds, times, axis=0))

    @staticmethod
    def concat(first: "PromptEmbeddings", second: "PromptEmbeddings") -> "PromptEmbeddings":
        return PromptEmbeddings(np.concatenate([first.prompt_embeds, second.prompt_embeds]),
                                np.concatenate([first.pooled_embeds, second.pooled_embeds]))


class Tokenizer:
    """An OpenVINO tokenizer model, padded and truncated in numpy as Hugging Face does it."""

    def __init__(self, compiled_and_model, name: str = "tokenizer"):
        self.compiled, model = compiled_and_model
        # openvino-tokenizers records the special ids in the model's rt_info (the compiled model drops it).
        self.pad_id, self.eos_id = (special_id(model, key, name) for key in ("pad_token_id", "eos_token_id"))

    def __call__(self, prompts: list[str], max_length: int, requests: InferRequests | None = None) -> np.ndarray:
        """Token ids, (prompts, max_length); ``requests``: the caller's infer requests (None: the model's own)."""
        result = self.compiled(prompts) if requests is None else requests(self.compiled, prompts)
        ids, mask = result["input_ids"], result["attention_mask"]
        out = np.full((len(prompts), max_length), self.pad_id, dtype=np.int64)
        for row, (row_ids, row_mask) in enumerate(zip(ids, mask)):
            tokens = row_ids[row_mask.astype(bool)]
            if len(tokens) > max_length:  # keep the closing end-of-text token, as truncation does
                tokens = np.append(tokens[: max_length - 1], tokens[-1])
            out[row, : len(tokens)] = tokens
        return out


def special_id(model, key: str, name: str) -> int:
    """A token id from a tokenizer IR's rt_info; a one-line error naming the file where it is absent or not
    a non-negative integer (a tokenizer not made by openvino-tokenizers, or edited)."""
    try:
        value = int(model.get_rt_info(key).astype(int))
    except (RuntimeError, TypeError, ValueError):
        value = -1
    if value < 0:
        raise OvsdError(f"{name}/{layout.TOKENIZER_XML} has no valid {key} in its rt_info: convert the model "
                        "again (openvino-tokenizers writes it)")
    return value


class TextEncoders:
    """The two CLIPs and T5 (if the folder has it), compiled, run on ``requests`` (the pipeline's own)."""

    def __init__(self, compiler, joint_attention_dim: int, has_t5: bool, static_batch: int | None = None,
                 max_sequence_length: int = 256, compile_now: bool = True, requests: InferRequests | None = None):
        def encoder(name: str, length: int) -> OnUse:
            shapes = None if static_batch is None else {"input_ids": [static_batch, length]}
            return OnUse(lambda: compiler.compile(name, shapes), compile_now)

        self.joint_attention_dim = joint_attention_dim
        clip_tokenizers = (layout.TOKENIZER_OF[layout.CLIP_L], layout.TOKENIZER_OF[layout.CLIP_G])
        self.clip_tokenizers = [Tokenizer(compiler.compile_tokenizer(name), name) for name in clip_tokenizers]
        self.clip_encoders = [encoder(name, CLIP_MAX_LENGTH) for name in (layout.CLIP_L, layout.CLIP_G)]
        t5_tokenizer = layout.TOKENIZER_OF[layout.T5]
        self.t5_tokenizer = Tokenizer(compiler.compile_tokenizer(t5_tokenizer), t5_tokenizer) if has_t5 else None
        self.t5_encoder = encoder(layout.T5, max_sequence_length) if has_t5 else None
        self.requests = requests or InferRequests()
        self.infer_seconds = 0.0

    def clone(self, requests: InferRequests) -> "TextEncoders":
        """The same tokenizers and compiled encoders, run on ``requests``, with timings of its own."""
        twin = copy.copy(self)
        twin.requests, twin.infer_seconds = requests, 0.0
        return twin

    def release(self) -> None:
        """Drop the compiled encoders (model offload); the tokenizers, small, stay."""
        for encoder in (*self.clip_encoders, self.t5_encoder):
            if encoder is not None:
                encoder.release()

    def _run(self, compiled, input_ids: np.ndarray) -> dict:
        import time

        start = time.perf_counter()
        result = self.requests(compiled, {"input_ids": input_ids})
        self.infer_seconds += time.perf_counter() - start
        return {name: result[port] for port in compiled.outputs for name in port.get_names()}

    def _clip(self, index: int, prompts: list[str], clip_skip: int | None) -> tuple[np.ndarray, np.ndarray]:
        outputs = self._run(self.clip_encoders[index], self.clip_tokenizers[index](prompts, CLIP_MAX_LENGTH,
                                                                                    self.requests))
        num_states = sum(name.startswith("hidden_states.") for name in outputs)
        layer = num_states - ((clip_skip or 0) + 2)  # hidden_states[-2], or [-(clip_skip + 2)]
        if layer < 0:  # diffusers fails with an IndexError here
            raise InvalidRequest(f"clip_skip must be at most {num_states - 2}: the CLIP text encoders have "
                                 f"{num_states - 1} layers (got {clip_skip})")
        return outputs[f"hidden_states.{layer}"], outputs["text_embeds"]

    def encode(self, prompts: list[str], *, prompts_2: list[str] | None = None, prompts_3: list[str] | None = None,
               clip_skip: int | None = None, max_sequence_length: int = 256) -> PromptEmbeddings:
        """CLIP-L reads ``prompts``, CLIP-G ``prompts_2`` and T5 ``prompts_3`` (each defaulting to ``prompts``,
        as diffusers' prompt_2 and prompt_3 do)."""
        clip_l, pooled_l = self._clip(0, prompts, clip_skip)
        clip_g, pooled_g = self._clip(1, prompts_2 or prompts, clip_skip)
        if self.t5_encoder is not None:
            t5_ids = self.t5_tokenizer(prompts_3 or prompts, max_sequence_length, self.requests)
            t5_embeds = self._run(self.t5_encoder, t5_ids)["last_hidden_state"]
        else:
            t5_embeds = np.zeros((len(prompts), max_sequence_length, self.joint_attention_dim), dtype=np.float32)
        clip_embeds = fit_width(np.concatenate([clip_l, clip_g], axis=-1), t5_embeds.shape[-1])
        prompt_embeds = np.concatenate([clip_embeds, t5_embeds], axis=1).astype(np.float32)
        pooled_embeds = np.concatenate([pooled_l, pooled_g], axis=-1).astype(np.float32)
        return PromptEmbeddings(prompt_embeds, pooled_embeds)


def fit_width(embeds: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the joined CLIP features to T5's width, or crop them where CLIP is wider (diffusers pads
    with a negative width there, which crops)."""
    if embeds.shape[-1] >= width:
        return embeds[..., :width]
    return np.pad(embeds, ((0, 0), (0, 0), (0, width - embeds.shape[-1])))
