"""SD3 LoRA adapters read from their files, as the transformer's weight deltas (numpy and safetensors only).

Formats, and the scale each carries (what diffusers + PEFT apply):
- a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>``):
  ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA, ``alpha_pattern`` per module);
- a diffusers file (``pytorch_lora_weights.safetensors``, keys ``transformer.<module>``): the ``lora_adapter_metadata``
  it was saved with, else 1 (diffusers' SD3 loader passes no alphas);
- a kohya / ComfyUI file (keys ``lora_unet_joint_blocks_N_x_block_attn_qkv`` or ``diffusion_model.joint_blocks...``,
  the MMDiT module names most published SD3 LoRAs use): ``alpha / rank`` (1 without alpha), mapped onto
  diffusers' modules as diffusers' own checkpoint converter maps the weights (qkv split in three, the last block's
  and the final layer's shift/scale halves swapped).

Several adapters add up: delta W = sum of weight_i * scale_i * B_i @ A_i, exactly what ``set_adapters`` does.
Text-encoder tensors are counted and left out (ovsd3 applies transformer LoRAs; openvino.genai does the same for SD3).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ovsd3.errors import OvsdError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", "hada_", "lokr_", "lora_mid", ".diff", "lora_B.bias")
_TEXT_PREFIXES = ("text_encoder", "lora_te")
_KOHYA_BLOCK = re.compile(r"^joint_blocks_(\d+)_(x_block|context_block)_(attn2?_qkv|attn2?_proj|mlp_fc1|mlp_fc2|"
                          r"adaLN_modulation_1)$")
_KOHYA_OTHER = MappingProxyType({
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
})
_X_BLOCK = MappingProxyType({"attn_proj": "attn.to_out.0", "attn2_proj": "attn2.to_out.0", "mlp_fc1": "ff.net.0.proj",
                             "mlp_fc2": "ff.net.2", "adaLN_modulation_1": "norm1.linear"})
_CONTEXT_BLOCK = MappingProxyType({"attn_proj": "attn.to_add_out", "mlp_fc1": "ff_context.net.0.proj",
                                   "mlp_fc2": "ff_context.net.2", "adaLN_modulation_1": "norm1_context.linear"})


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter file or PEFT folder and the weight it is applied with (diffusers' ``adapter_weights``)."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: "str | Path | tuple | LoraAdapter") -> "LoraAdapter":
        """``PATH``, ``PATH:WEIGHT`` or ``(path, weight)``."""
        if isinstance(spec, LoraAdapter):
            return spec
        if isinstance(spec, tuple):
            path, weight = spec
        else:
            path, _, weight = str(spec).rpartition(":") if ":" in str(spec) else (str(spec), "", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise OvsdError(f"LoRA weight {weight!r} of {path} is not a number (give PATH or PATH:WEIGHT)") from None
        if not math.isfinite(weight):
            raise OvsdError(f"LoRA weight of {path} must be a finite number (got {weight})")
        return cls(Path(path), weight)


@dataclass
class Factors:
    """One low-rank update of one module: delta = scale * B @ A (B's rows possibly a slice or a permutation)."""

    A: np.ndarray
    B: np.ndarray
    scale: float

    def product(self) -> np.ndarray:
        """B @ A shaped as the layer's weight: [out, in], or [out, in, kh, kw] for a convolution (the patch
        embedding), whose B is a 1x1 convolution."""
        if self.A.ndim == 2:
            return self.B @ self.A
        rank = self.A.shape[0]
        return (self.B.reshape(self.B.shape[0], rank) @ self.A.reshape(rank, -1)).reshape(
            self.B.shape[0], *self.A.shape[1:])


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise OvsdError(f"cannot read LoRA {path}: {error}") from None


def _check_supported(keys, path: Path) -> None:
    odd = next((key for key in keys if any(mark in key for mark in _UNSUPPORTED)), None)
    if odd is not None:
        raise OvsdError(f"{path} is not a plain LoRA (it has {odd}: DoRA, LoHa, LoKr, LoRA biases and full diffs "
                        "are not supported)")


def _pairs(tensors: dict[str, np.ndarray], prefix: str, a_name: str, b_name: str, path: Path) -> dict[str, tuple]:
    """module -> (A, B) for keys ``prefix<module>.<a_name>.weight`` / ``.<b_name>.weight``."""
    pairs: dict[str, list] = {}
    for key, value in tensors.items():
        for slot, name in ((0, a_name), (1, b_name)):
            suffix = f".{name}.weight"
            if key.startswith(prefix) and key.endswith(suffix):
                pairs.setdefault(key[len(prefix):-len(suffix)], [None, None])[slot] = value.astype(np.float32)
    incomplete = next((module for module, pair in pairs.items() if any(part is None for part in pair)), None)
    if incomplete is not None:
        raise OvsdError(f"{path}: layer {incomplete} has only one of its two LoRA factors")
    return {module: tuple(pair) for module, pair in pairs.items()}


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for ``module``: its alpha (``alpha_pattern`` first, matched as PEFT matches it) / r."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft_factors(pairs: dict[str, tuple], config: dict | None) -> dict[str, list[Factors]]:
    return {module: [Factors(A, B, 1.0 if config is None else _peft_scale(config, module, A.shape[0]))]
            for module, (A, B) in pairs.items()}


def _swap_halves(B: np.ndarray) -> np.ndarray:
    """MMDiT's adaLN (shift, scale) rows as diffusers' (scale, shift), where the checkpoint converter swaps them."""
    half = B.shape[0] // 2
    return np.concatenate([B[half:], B[:half]])


def _kohya_targets(name: str, B: np.ndarray, block_count: int) -> list[tuple[str, np.ndarray]]:
    """(diffusers module, the B rows it takes) for one MMDiT module name (underscored, without ``lora_unet_``)."""
    if name in _KOHYA_OTHER:
        return [(_KOHYA_OTHER[name], _swap_halves(B) if name == "final_layer_adaLN_modulation_1" else B)]
    match = _KOHYA_BLOCK.match(name)
    if match is None:
        raise OvsdError(f"LoRA layer lora_unet_{name} is not one ovsd3 can place on the SD3 transformer")
    index, kind, part = int(match.group(1)), match.group(2), match.group(3)
    block = f"transformer_blocks.{index}"
    if part.endswith("qkv"):
        names = ("to_q", "to_k", "to_v") if kind == "x_block" else ("add_q_proj", "add_k_proj", "add_v_proj")
        attention = "attn2" if part.startswith("attn2") else "attn"
        return [(f"{block}.{attention}.{target}", rows) for target, rows in zip(names, np.split(B, 3))]
    table = _X_BLOCK if kind == "x_block" else _CONTEXT_BLOCK
    if part not in table:
        raise OvsdError(f"LoRA layer lora_unet_{name} has no counterpart in diffusers' SD3 transformer")
    last_context_norm = kind == "context_block" and part == "adaLN_modulation_1" and index == block_count - 1
    return [(f"{block}.{table[part]}", _swap_halves(B) if last_context_norm else B)]


def _kohya_key(key: str) -> str:
    """``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight`` as kohya spells it:
    ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``."""
    if not key.startswith("diffusion_model."):
        return key
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            module = key[len("diffusion_model."):-len(suffix)]
            return f"lora_unet_{module.replace('.', '_')}{suffix}"
    return key


def _kohya_factors(tensors: dict[str, np.ndarray], path: Path, block_count: int) -> dict[str, list[Factors]]:
    normalised = {_kohya_key(key): value for key, value in tensors.items()}
    factors: dict[str, list[Factors]] = {}
    for name, (A, B) in _pairs(normalised, "lora_unet_", "lora_down", "lora_up", path).items():
        alpha = normalised.get(f"lora_unet_{name}.alpha")
        alpha = float(np.asarray(alpha).reshape(-1)[0]) if alpha is not None else 0.0
        scale = alpha / A.shape[0] if alpha else 1.0  # kohya and ComfyUI: no alpha (or 0) means 1
        for module, rows in _kohya_targets(name, B, block_count):
            factors.setdefault(module, []).append(Factors(A, rows, scale))
    return factors


def read_adapter(path: Path, block_count: int) -> tuple[dict[str, list[Factors]], int]:
    """(module -> its updates, the number of text-encoder tensors left out) for a PEFT folder or a LoRA file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file() or not (path / PEFT_WEIGHTS).is_file():
            raise OvsdError(f"LoRA folder {path} has no {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter folder)")
        config = json.loads((path / PEFT_CONFIG).read_text())
        if config.get("use_dora"):
            raise OvsdError(f"{path} is a DoRA adapter: only plain LoRA is supported")
        tensors, _ = _read_safetensors(path / PEFT_WEIGHTS)
        _check_supported(tensors, path)
        return _peft_factors(_pairs(tensors, "base_model.model.", "lora_A", "lora_B", path), config), 0
    if not path.is_file():
        raise OvsdError(f"LoRA {path}: no such file or folder")
    tensors, metadata = _read_safetensors(path)
    _check_supported(tensors, path)
    text = [key for key in tensors if key.startswith(_TEXT_PREFIXES)]
    tensors = {key: value for key, value in tensors.items() if not key.startswith(_TEXT_PREFIXES)}
    if any(key.startswith(("lora_unet_", "diffusion_model.")) for key in tensors):
        return _kohya_factors(tensors, path, block_count), len(text)
    if any(key.startswith("transformer.") for key in tensors):
        saved = json.loads(metadata["lora_adapter_metadata"]) if metadata.get("lora_adapter_metadata") else None
        config = None if saved is None else {key.removeprefix("transformer."): value for key, value in saved.items()
                                             if key.startswith("transformer.")}
        return _peft_factors(_pairs(tensors, "transformer.", "lora_A", "lora_B", path), config), len(text)
    raise OvsdError(f"{path} holds no SD3 transformer LoRA (neither diffusers' `transformer.` keys nor kohya's "
                    "`lora_unet_` ones)")


def adapter_deltas(adapters: list[LoraAdapter], block_count: int) -> tuple[dict[str, np.ndarray], int]:
    """module -> the summed float32 weight delta of every adapter; and the text-encoder tensors left out."""
    deltas: dict[str, np.ndarray] = {}
    ignored = 0
    for adapter in adapters:
        factors, text = read_adapter(adapter.path, block_count)
        ignored += text
        for module, updates in factors.items():
            for update in updates:
                delta = np.float32(adapter.weight * update.scale) * update.product()
                deltas[module] = deltas[module] + delta if module in deltas else delta
    return deltas, ignored
