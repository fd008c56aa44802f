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
Merged into the weights (``AdapterEdit``, float folders by default) or, where the weights are quantized or
``lora_mode="branch"`` asks for it, as side branches whose weights are the model's inputs (``BranchEdit``;
``ovsd3/ir/lora.py``), so new weights for the same adapters compile nothing (``next_edit``).
Text-encoder tensors are counted and left out (ovsd3 applies transformer LoRAs; openvino.genai does the same for SD3).

Every file is checked when it is opened, before any weight is multiplied: the safetensors header (dtypes ovsd3
reads: F16, BF16, F32, F64), finite values, factor shapes and ranks, the PEFT config or diffusers metadata
(types, finite alphas, patterns that compile), and, against the transformer's IR, the layer each update
lands on. A refusal is an ``InvalidRequest`` naming the file and the tensor or field.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ovsd3.errors import InvalidRequest, reason_of

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_ADAPTERS = 16  # applied at once; each is read, checked and multiplied out when the transformer compiles
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few hundred bytes
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", "hada_", "lokr_", "lora_mid", ".diff", "lora_B.bias")
_TEXT_PREFIXES = ("text_encoder", "lora_te")
# safetensors dtypes read as float32 (little-endian; BF16 widened bit for bit); F8, integers and booleans are not
_FLOAT_DTYPES = MappingProxyType({"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8"})
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


def _shown(value) -> str:
    """A value as an error quotes it: its repr, cut short (a field can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _number(value, what: str, *, text: bool = False) -> float:
    """``value`` as a finite float (a numeric string too where ``text``), or a one-line refusal naming ``what``."""
    kinds = (int, float, np.integer, np.floating) + ((str,) if text else ())
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidRequest(f"{what} is not a number (got {_shown(value)})")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{what} is not a number (got {_shown(value)})") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"{what} must be a finite number (got {_shown(value)})")
    return number


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter file or PEFT folder and the weight it is applied with (diffusers' ``adapter_weights``)."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: "str | Path | tuple | LoraAdapter") -> "LoraAdapter":
        """``PATH``, ``"PATH:WEIGHT"`` or ``(path, weight)``."""
        path, weight = _spec(spec, "a LoRA adapter")
        return cls(path, 1.0 if weight is None else weight)


def _spec(spec, what: str) -> tuple[Path, float | None]:
    """(path, the weight ``spec`` gives or None) of one adapter: a path, ``"PATH:WEIGHT"``, ``(path, weight)``."""
    if isinstance(spec, LoraAdapter):
        path, weight = spec.path, spec.weight
    elif isinstance(spec, tuple) and len(spec) == 2:
        path, weight = spec
    elif isinstance(spec, str):
        path, _, weight = spec.rpartition(":") if ":" in spec else (spec, "", None)
    elif isinstance(spec, os.PathLike):
        path, weight = spec, None
    else:
        raise InvalidRequest(f"{what} must be a path, 'PATH:WEIGHT' or (path, weight), not {_shown(spec)}")
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequest(f"{what} must be a path, 'PATH:WEIGHT' or (path, weight), not {_shown(spec)}")
    return Path(path), None if weight is None else _number(weight, f"LoRA weight of {path}", text=True)


def parse_adapters(adapter_names, adapter_weights=None, argument: str = "adapter_names") -> tuple[LoraAdapter, ...]:
    """diffusers' ``set_adapters(adapter_names, adapter_weights)`` as adapters. ``adapter_names``: one adapter or
    a list of them (paths: the files are ovsd3's adapter names); ``adapter_weights``: None (1, or the weight a
    spec carries), one number for all, or a list with one number (or None) per adapter. ``argument``: the
    caller's name for ``adapter_names``, for errors."""
    if adapter_names is None:
        specs = []
    elif isinstance(adapter_names, (str, os.PathLike, LoraAdapter)):
        specs = [adapter_names]
    elif isinstance(adapter_names, (list, tuple)):
        specs = list(adapter_names)
    else:
        raise InvalidRequest(f"{argument} must be a LoRA path or a list of them, not {_shown(adapter_names)}")
    if len(specs) > MAX_ADAPTERS:
        raise InvalidRequest(f"{argument} lists {len(specs)} adapters; at most {MAX_ADAPTERS} apply at once")
    weights = _weights(adapter_weights, len(specs))
    adapters = []
    for index, (spec, weight) in enumerate(zip(specs, weights)):
        path, own = _spec(spec, f"{argument}[{index}]")
        if own is not None and weight is not None:
            raise InvalidRequest(f"{argument}[{index}] gives {path} a weight and adapter_weights another: give "
                                 "it once")
        adapters.append(LoraAdapter(path, next((value for value in (own, weight) if value is not None), 1.0)))
    return tuple(adapters)


def _weights(adapter_weights, count: int) -> list[float | None]:
    if adapter_weights is None:
        return [None] * count
    if isinstance(adapter_weights, (list, tuple)):
        if len(adapter_weights) != count:
            raise InvalidRequest(f"adapter_weights has {len(adapter_weights)} weight(s) for {count} adapter(s)")
        if any(isinstance(weight, dict) for weight in adapter_weights):
            raise InvalidRequest("adapter_weights: per-block weights (dicts) are not supported; give one number per "
                                 "adapter")
        return [None if weight is None else _number(weight, f"adapter_weights[{index}]")
                for index, weight in enumerate(adapter_weights)]
    if isinstance(adapter_weights, dict):
        raise InvalidRequest("adapter_weights: per-component weights (dicts) are not supported; give one number per "
                             "adapter")
    return [_number(adapter_weights, "adapter_weights")] * count


@dataclass
class Factors:
    """One low-rank update of one module: delta = scale * B @ A (B's rows possibly a slice or a permutation)."""

    A: np.ndarray
    B: np.ndarray
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of B @ A: the layer's weight shape it must match."""
        return (self.B.shape[0], *self.A.shape[1:])

    def product(self) -> np.ndarray:
        """B @ A shaped as the layer's weight: [out, in], or [out, in, kh, kw] for a convolution (the patch
        embedding), whose B is a 1x1 convolution."""
        if self.A.ndim == 2:
            return self.B @ self.A
        rank = self.A.shape[0]
        return (self.B.reshape(self.B.shape[0], rank) @ self.A.reshape(rank, -1)).reshape(self.shape)


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data_offsets; ``__metadata__``) and where the data starts,
    once safetensors itself has checked it (JSON, offsets tiling the data, the file's length, text metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            return json.loads(file.read(length)), 8 + length
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidRequest(f"cannot read LoRA {path}: {reason_of(error)}") from None


def _read_tensors(path: Path, header: dict, start: int, keys: list[str]) -> dict[str, np.ndarray]:
    """``keys`` as float32 arrays; every dtype is checked before any is read, and NaN or infinity (which draw
    black images) refused."""
    odd = next((key for key in keys if header[key]["dtype"] not in _FLOAT_DTYPES), None)
    if odd is not None:
        raise InvalidRequest(f"LoRA {path}: tensor {odd} is {header[odd]['dtype']}; ovsd3 reads LoRA weights stored "
                             f"as {', '.join(_FLOAT_DTYPES)}")
    tensors = {}
    with open(path, "rb") as file:
        for key in keys:
            dtype, shape, (begin, end) = header[key]["dtype"], header[key]["shape"], header[key]["data_offsets"]
            file.seek(start + begin)
            raw = np.frombuffer(file.read(end - begin), dtype=_FLOAT_DTYPES[dtype])
            with np.errstate(over="ignore"):  # F64 past float32's range: infinity, refused below
                values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
            if values.size != math.prod(shape):
                raise InvalidRequest(f"cannot read LoRA {path}: tensor {key} is cut short (the file changed?)")
            if not np.isfinite(values).all():
                raise InvalidRequest(f"LoRA {path}: tensor {key} holds NaN or infinite values (as float32)")
            tensors[key] = values.reshape(shape)
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict, int]:
    """(the transformer's tensors as float32, the header's metadata, the text-encoder tensors left unread)."""
    header, start = _header(path)
    metadata = header.pop("__metadata__", None) or {}
    text = [key for key in header if key.startswith(_TEXT_PREFIXES)]
    keys = [key for key in header if not key.startswith(_TEXT_PREFIXES)]
    _check_supported(keys, path)
    return _read_tensors(path, header, start, keys), metadata, len(text)


def _check_supported(keys, path: Path) -> None:
    odd = next((key for key in keys if any(mark in key for mark in _UNSUPPORTED)), None)
    if odd is not None:
        raise InvalidRequest(f"{path} is not a plain LoRA (it has {odd}: DoRA, LoHa, LoKr, LoRA biases and full "
                             "diffs are not supported)")


def _pairs(tensors: dict[str, np.ndarray], prefix: str, names: tuple[str, str], path: Path,
           extra: tuple[str, ...] = ()) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A, B) for keys ``prefix<module>.<names[0]>.weight`` / ``.<names[1]>.weight``, their shapes
    checked. Any other key (but ``prefix...<extra>``) is refused, not left out: an adapter applied in part draws
    another picture."""
    pairs: dict[str, list] = {}
    for key, value in tensors.items():
        slot = next((slot for slot, name in enumerate(names)
                     if key.startswith(prefix) and key.endswith(f".{name}.weight")), None)
        if slot is None:
            if extra and key.startswith(prefix) and key.endswith(extra):
                continue
            raise InvalidRequest(f"LoRA {path}: tensor {key} is not a LoRA factor ovsd3 knows "
                                 f"({prefix}<layer>.{names[0]}.weight or .{names[1]}.weight)")
        module = key[len(prefix):-len(f".{names[slot]}.weight")]
        pairs.setdefault(module, [None, None])[slot] = (key, value)
    incomplete = next((module for module, pair in pairs.items() if any(part is None for part in pair)), None)
    if incomplete is not None:
        raise InvalidRequest(f"LoRA {path}: layer {incomplete} has only one of its two LoRA factors")
    for a, b in pairs.values():
        _check_factors(a, b, path)
    return {module: (a[1], b[1]) for module, (a, b) in pairs.items()}


def _check_factors(a: tuple[str, np.ndarray], b: tuple[str, np.ndarray], path: Path) -> None:
    """A is [rank, in] (or [rank, in, kh, kw]) and B [out, rank] (or [out, rank, 1, 1]), nothing empty."""
    (a_key, A), (b_key, B) = a, b
    if A.ndim not in (2, 4) or 0 in A.shape:
        raise InvalidRequest(f"LoRA {path}: tensor {a_key} has shape {list(A.shape)}; a LoRA down factor is "
                             "[rank, in] (or [rank, in, kh, kw]), rank and sizes at least 1")
    rank = A.shape[0]
    needed = (rank, 1, 1) if A.ndim == 4 else (rank,)
    if B.ndim != A.ndim or tuple(B.shape[1:]) != needed or B.shape[0] == 0:
        raise InvalidRequest(f"LoRA {path}: tensor {b_key} has shape {list(B.shape)}; with {a_key} of rank {rank} it "
                             f"must be [out, {', '.join(map(str, needed))}]")


def _lora_config(config, where: str) -> dict:
    """The PEFT LoraConfig fields ovsd3 uses, checked (``where`` names the file, or the header key, they are in)."""
    if not isinstance(config, dict):
        raise InvalidRequest(f"LoRA {where} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise InvalidRequest(f"LoRA {where}: field peft_type is not a string (got {_shown(peft_type)})")
    if peft_type.upper() != "LORA":
        raise InvalidRequest(f"LoRA {where}: field peft_type is {_shown(peft_type)}; only LoRA adapters are "
                             "supported (not LoHa, LoKr, ...)")
    for name in ("use_dora", "use_rslora"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise InvalidRequest(f"LoRA {where}: field {name} must be true or false (got {_shown(config[name])})")
    if config.get("use_dora"):
        raise InvalidRequest(f"LoRA {where}: a DoRA adapter (use_dora); only plain LoRA is supported")
    if config.get("r") is not None:
        _rank(config["r"], f"LoRA {where}: field r")
    if config.get("lora_alpha") is not None:
        _number(config["lora_alpha"], f"LoRA {where}: field lora_alpha")
    for name, check in (("alpha_pattern", _number), ("rank_pattern", _rank)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InvalidRequest(f"LoRA {where}: field {name} is not an object of pattern: value")
        for pattern, value in patterns.items():
            _pattern(pattern, f"LoRA {where}: {name} key {_shown(pattern)}")
            check(value, f"LoRA {where}: {name}[{_shown(pattern)}]")
    return config


def _rank(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{what} must be a whole number of at least 1 (got {_shown(value)})")
    return value


def _pattern(pattern: str, what: str) -> re.Pattern:
    """PEFT's match of a pattern key against a module name (``peft.utils.other.get_pattern_key``)."""
    try:
        return re.compile(rf"(.*\.)?({pattern})$")
    except (re.error, RecursionError, OverflowError) as error:
        raise InvalidRequest(f"{what} is not a regular expression ({reason_of(error)})") from None


def _matched(patterns: dict | None, module: str):
    for pattern, value in (patterns or {}).items():
        if _pattern(pattern, "pattern").match(module):
            return value
    return None


def _peft_factors(pairs: dict[str, tuple], config: dict | None, where: str) -> dict[str, list[Factors]]:
    """PEFT's scaling for each module: its alpha (``alpha_pattern`` first) / r (/ sqrt(r) with rsLoRA), the
    rank the config gives checked against the tensors' (PEFT would not load them otherwise)."""
    factors = {}
    for module, (A, B) in pairs.items():
        rank, scale = A.shape[0], 1.0
        if config is not None:
            stated = _matched(config.get("rank_pattern"), module) or config.get("r")
            if stated is not None and stated != rank:
                raise InvalidRequest(f"LoRA {where}: layer {module} has rank {rank}, the config says r={stated}")
            alpha = _matched(config.get("alpha_pattern"), module)
            alpha = config.get("lora_alpha") if alpha is None else alpha
            scale = float(rank if alpha is None else alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        factors[module] = [Factors(A, B, scale)]
    return factors


def _swap_halves(B: np.ndarray) -> np.ndarray:
    """MMDiT's adaLN (shift, scale) rows as diffusers' (scale, shift), where the checkpoint converter swaps them."""
    half = B.shape[0] // 2
    return np.concatenate([B[half:], B[:half]])


def _rows_split(B: np.ndarray, parts: int, name: str, path: Path) -> None:
    if B.shape[0] % parts:
        raise InvalidRequest(f"LoRA {path}: tensor lora_unet_{name}.lora_up.weight has {B.shape[0]} rows, which do "
                             f"not split into {parts} equal parts as this layer's do")


def _kohya_targets(name: str, B: np.ndarray, block_count: int, path: Path) -> list[tuple[str, np.ndarray]]:
    """(diffusers module, the B rows it takes) for one MMDiT module name (underscored, without ``lora_unet_``)."""
    if name in _KOHYA_OTHER:
        if name == "final_layer_adaLN_modulation_1":
            _rows_split(B, 2, name, path)
            B = _swap_halves(B)
        return [(_KOHYA_OTHER[name], B)]
    match = _KOHYA_BLOCK.match(name)
    if match is None:
        raise InvalidRequest(f"LoRA {path}: layer lora_unet_{name} is not one ovsd3 can place on the SD3 transformer")
    index, kind, part = int(match.group(1)), match.group(2), match.group(3)
    block = f"transformer_blocks.{index}"
    if part.endswith("qkv"):
        _rows_split(B, 3, name, path)
        names = ("to_q", "to_k", "to_v") if kind == "x_block" else ("add_q_proj", "add_k_proj", "add_v_proj")
        attention = "attn2" if part.startswith("attn2") else "attn"
        return [(f"{block}.{attention}.{target}", rows) for target, rows in zip(names, np.split(B, 3))]
    table = _X_BLOCK if kind == "x_block" else _CONTEXT_BLOCK
    if part not in table:
        raise InvalidRequest(f"LoRA {path}: layer lora_unet_{name} has no counterpart in diffusers' SD3 transformer")
    if kind == "context_block" and part == "adaLN_modulation_1" and index == block_count - 1:
        _rows_split(B, 2, name, path)
        B = _swap_halves(B)
    return [(f"{block}.{table[part]}", B)]


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


def _kohya_scale(alpha: np.ndarray | None, name: str, rank: int, path: Path) -> float:
    """alpha / rank; kohya and ComfyUI read no alpha (or 0) as scale 1."""
    if alpha is None:
        return 1.0
    if alpha.size != 1:
        raise InvalidRequest(f"LoRA {path}: tensor lora_unet_{name}.alpha has shape {list(alpha.shape)}; an alpha "
                             "is one number")
    value = float(alpha.reshape(-1)[0])
    return value / rank if value else 1.0


def _kohya_factors(tensors: dict[str, np.ndarray], path: Path, block_count: int) -> dict[str, list[Factors]]:
    normalised = {_kohya_key(key): value for key, value in tensors.items()}
    if len(normalised) != len(tensors):
        raise InvalidRequest(f"LoRA {path} names a layer twice (as diffusion_model.* and as lora_unet_*)")
    pairs = _pairs(normalised, "lora_unet_", ("lora_down", "lora_up"), path, extra=(".alpha",))
    orphan = next((key for key in normalised if key.endswith(".alpha")
                   and key[len("lora_unet_"):-len(".alpha")] not in pairs), None)
    if orphan is not None:
        raise InvalidRequest(f"LoRA {path}: tensor {orphan} is an alpha without its lora_down and lora_up factors")
    factors: dict[str, list[Factors]] = {}
    for name, (A, B) in pairs.items():
        scale = _kohya_scale(normalised.get(f"lora_unet_{name}.alpha"), name, A.shape[0], path)
        for module, rows in _kohya_targets(name, B, block_count, path):
            factors.setdefault(module, []).append(Factors(A, rows, scale))
    return factors


def _json_file(file: Path):
    """A small JSON file's content (the size checked before reading)."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InvalidRequest(f"LoRA {file} is {size} bytes; a PEFT config is a few hundred (at most "
                                 f"{MAX_CONFIG_BYTES})")
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InvalidRequest(f"LoRA {file} is not JSON ({reason_of(error)})") from None


def _saved_config(metadata: dict, path: Path) -> dict | None:
    """The LoraConfig diffusers saved in the header (``lora_adapter_metadata``), its ``transformer.`` fields."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return None
    where = f"{path} lora_adapter_metadata"
    try:
        saved = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest(f"LoRA {where} is not JSON ({reason_of(error)})") from None
    if not isinstance(saved, dict):
        raise InvalidRequest(f"LoRA {where} is not a JSON object")
    return _lora_config({key.removeprefix("transformer."): value for key, value in saved.items()
                         if key.startswith("transformer.")}, where)


def _peft_folder(path: Path) -> dict[str, list[Factors]]:
    if not (path / PEFT_CONFIG).is_file() or not (path / PEFT_WEIGHTS).is_file():
        raise InvalidRequest(f"LoRA folder {path} has no {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter folder)")
    config = _lora_config(_json_file(path / PEFT_CONFIG), str(path / PEFT_CONFIG))
    tensors, _, _ = _read_safetensors(path / PEFT_WEIGHTS)
    pairs = _pairs(tensors, "base_model.model.", ("lora_A", "lora_B"), path / PEFT_WEIGHTS)
    return _peft_factors(pairs, config, str(path / PEFT_CONFIG))


def read_adapter(path: Path, block_count: int) -> tuple[dict[str, list[Factors]], int]:
    """(module -> its updates, the number of text-encoder tensors left out) for a PEFT folder or a LoRA file,
    every tensor and field checked."""
    path = Path(path).expanduser()
    if path.is_dir():
        factors, text = _peft_folder(path), 0
    elif not path.is_file():
        raise InvalidRequest(f"LoRA {path}: no such file or folder")
    else:
        tensors, metadata, text = _read_safetensors(path)
        if any(key.startswith(("lora_unet_", "diffusion_model.")) for key in tensors):
            factors = _kohya_factors(tensors, path, block_count)
        elif any(key.startswith("transformer.") for key in tensors):
            pairs = _pairs(tensors, "transformer.", ("lora_A", "lora_B"), path)
            factors = _peft_factors(pairs, _saved_config(metadata, path), f"{path} lora_adapter_metadata")
        else:
            raise InvalidRequest(f"{path} holds no SD3 transformer LoRA (neither diffusers' `transformer.` keys nor "
                                 "kohya's `lora_unet_` ones)")
    if not factors:
        raise InvalidRequest(f"LoRA {path} holds no LoRA weights for the transformer")
    return factors, text


def _check_fits(update: Factors, module: str, shapes: dict[str, tuple], adapter: LoraAdapter) -> None:
    expected = shapes.get(module)
    if expected is None:
        raise InvalidRequest(f"LoRA {adapter.path}: it changes layer {module}, which this transformer does not have")
    if update.shape != tuple(expected):
        raise InvalidRequest(f"LoRA {adapter.path}: layer {module} is {list(expected)}, the adapter's B @ A would "
                             f"be {list(update.shape)}")
    _check_scale(update, module, adapter)


def _check_scale(update: Factors, module: str, adapter: LoraAdapter) -> None:
    if not math.isfinite(adapter.weight * update.scale) or abs(adapter.weight * update.scale) > 3e38:
        raise InvalidRequest(f"LoRA {adapter.path}: layer {module}'s weight x alpha / rank "
                             f"({adapter.weight} x {update.scale}) is beyond float32")


def _check_all_fit(read, shapes: dict[str, tuple]) -> None:
    for adapter, factors in read:
        for module, updates in factors.items():
            for update in updates:
                _check_fits(update, module, shapes, adapter)


def adapter_deltas(read: list[tuple[LoraAdapter, dict[str, list[Factors]]]],
                   shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """module -> the summed float32 delta of every adapter (weight x scale x B @ A), each update checked against
    its layer's weight shape (``shapes``: module -> [out, in(, kh, kw)]) before any is multiplied out."""
    _check_all_fit(read, shapes)
    deltas: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused where the weights are updated
        for adapter, factors in read:
            for module, updates in factors.items():
                for update in updates:
                    delta = np.float32(adapter.weight * update.scale) * update.product()
                    deltas[module] = deltas[module] + delta if module in deltas else delta
    return deltas


def adapter_branches(read: list[tuple[LoraAdapter, dict[str, list[Factors]]]],
                     shapes: dict[str, tuple]) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per adapter, module -> (A, B) of its side branch: the module's updates stacked along the rank (a kohya
    qkv update is three), each alpha / rank folded into its rows of B; the adapter's weight stays out (an input
    of the model). Checked against the layers' shapes first, as for a merge."""
    _check_all_fit(read, shapes)
    _check_branch_weights(read)
    branches = []
    for adapter, factors in read:
        branch = {}
        for module, updates in factors.items():
            A = np.concatenate([update.A for update in updates]).astype(np.float32)
            B = np.concatenate([update.B * np.float32(update.scale) for update in updates], axis=1)
            if not np.isfinite(B).all():
                raise InvalidRequest(f"LoRA {adapter.path}: layer {module}'s up factor x alpha / rank is beyond "
                                     "float32")
            branch[module] = (A, B.astype(np.float32))
        branches.append(branch)
    return branches


BRANCH_LIMIT = 65504.0  # FP16's largest value: what a merge into an FP16 folder refuses beyond, too


def _check_branch_weights(read) -> None:
    """Refuse a weight that could make a branch's update of one weight (``weight x scale x (B @ A)[i, j]``, at
    most ``rank x max|A| x max|B|`` times the weight and scale) go past FP16's range: the update a merge would
    refuse, and activations that would overflow into NaN (black images)."""
    for adapter, factors in read:
        for module, updates in factors.items():
            for update in updates:
                _check_scale(update, module, adapter)
                bound = abs(adapter.weight * update.scale) * update.A.shape[0] * float(np.abs(update.A).max()) \
                    * float(np.abs(update.B).max())
                if not bound <= BRANCH_LIMIT:
                    raise InvalidRequest(f"LoRA {adapter.path}: layer {module}'s update could reach {bound:.3g} at "
                                         f"weight {adapter.weight}, beyond FP16's range: lower the weight")


def _read_all(adapters: tuple[LoraAdapter, ...], block_count: int) -> tuple[list, int]:
    """(adapter, its factors) for each adapter, every file read and checked; and the text tensors left out."""
    read, text = [], 0
    for adapter in adapters:
        factors, ignored = read_adapter(adapter.path, block_count)
        read.append((adapter, factors))
        text += ignored
    return read, text


class AdapterEdit:
    """LoRA adapters merged into the transformer's weights (a ``ModelCompiler.edit``): the files are read and
    checked when it is made; the deltas are multiplied out at the first IR it sees, once each layer's shape is
    known, and kept for later compiles."""

    mode = "merge"

    def __init__(self, adapters: tuple[LoraAdapter, ...], block_count: int, read: list | None = None,
                 ignored_text_tensors: int = 0):
        self.adapters = adapters
        if read is None:
            read, ignored_text_tensors = _read_all(adapters, block_count)
        self._read, self.ignored_text_tensors = read, ignored_text_tensors
        self._deltas: dict[str, np.ndarray] | None = None

    def __call__(self, model) -> None:
        from ovsd3.ir.lora import AdapterMismatch, add_deltas, layer_shapes

        if self._deltas is None:
            self._deltas = adapter_deltas(self._read, layer_shapes(model))
        try:
            add_deltas(model, self._deltas)
        except AdapterMismatch as error:
            raise InvalidRequest(f"LoRA {', '.join(str(adapter.path) for adapter in self.adapters)}: {error}") from None

    def scale_inputs(self) -> dict[str, np.ndarray]:
        """The model inputs this edit adds, with their values: none (the weights are in the merged weights)."""
        return {}


class BranchEdit(AdapterEdit):
    """LoRA adapters as side branches beside the transformer's layers (``ovsd3.ir.lora.add_branches``), for any
    weights (FP16, INT8, INT4); the adapters' weights are the model's inputs ``lora_scale_<i>``."""

    mode = "branch"
    _branches: list | None = None  # built at the first IR, kept for later compiles

    def __call__(self, model) -> None:
        from ovsd3.ir.lora import AdapterMismatch, add_branches, layer_shapes

        if self._branches is None:
            self._branches = adapter_branches(self._read, layer_shapes(model))
        try:
            add_branches(model, self._branches)
        except AdapterMismatch as error:
            raise InvalidRequest(f"LoRA {', '.join(str(adapter.path) for adapter in self.adapters)}: {error}") from None

    def scale_inputs(self) -> dict[str, np.ndarray]:
        from ovsd3.ir.lora import SCALE_INPUT

        return {SCALE_INPUT.format(index): np.array(adapter.weight, dtype=np.float32)
                for index, adapter in enumerate(self.adapters)}

    def draws_the_same_ir(self, other: "BranchEdit") -> bool:
        """Whether ``other``'s IR is this one's: the same factors and scales, adapter by adapter (the weights,
        which are inputs, may differ)."""
        if len(self._read) != len(other._read):
            return False
        return all(_same_factors(mine, theirs) for (_, mine), (_, theirs) in zip(self._read, other._read))

    def reweighted(self, other: "BranchEdit") -> "BranchEdit":
        """This edit (its IR, its branches already built) with the adapters and weights of ``other``, which
        draws the same IR; each weight x alpha / rank checked as when the branches were built."""
        _check_branch_weights(other._read)
        twin = copy.copy(self)
        twin.adapters, twin._read = other.adapters, other._read
        return twin


def _same_factors(mine: dict[str, list[Factors]], theirs: dict[str, list[Factors]]) -> bool:
    if mine.keys() != theirs.keys():
        return False
    return all(len(mine[module]) == len(theirs[module]) and all(
        a.scale == b.scale and np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B)
        for a, b in zip(mine[module], theirs[module])) for module in mine)


LORA_MODES = ("merge", "branch")


def parse_lora_mode(mode, argument: str = "lora_mode") -> str | None:
    """``merge``, ``branch``, or None (merge on float weights, branch on quantized ones)."""
    if mode is None or (isinstance(mode, str) and mode in LORA_MODES):
        return mode
    raise InvalidRequest(f"{argument} must be one of {', '.join(LORA_MODES)} (or unset), not {_shown(mode)}")


def _chosen_mode(mode: str | None, model) -> str:
    """The mode adapters are applied in to ``model``: ``mode``, or by the weights where it is None."""
    from ovsd3.ir.lora import compressed_layers

    compressed = compressed_layers(model)
    if mode == "merge" and compressed:
        raise InvalidRequest(f"lora_mode merge: this transformer's weights are quantized (layer {compressed[0]} and "
                             f"{len(compressed) - 1} more), a LoRA cannot be merged into them: use lora_mode "
                             "branch (--lora-mode branch), or leave it unset")
    return mode or ("branch" if compressed else "merge")


def next_edit(current: AdapterEdit | None, adapters: tuple[LoraAdapter, ...], block_count: int,
              mode: str | None, read_model) -> tuple[AdapterEdit | None, bool]:
    """(the edit that applies ``adapters``, whether the IR changes from ``current``'s). Every file is read and
    checked, and the edit tried on ``read_model()`` (the transformer's IR), before anything is replaced. In
    branch mode, the same adapters with other weights keep ``current``'s IR: only its scale inputs change."""
    if not adapters:
        return None, current is not None
    read, text = _read_all(adapters, block_count)
    candidate = BranchEdit(adapters, block_count, read, text)
    if isinstance(current, BranchEdit) and mode != "merge" and current.draws_the_same_ir(candidate):
        return current.reweighted(candidate), False
    model = read_model()
    kind = BranchEdit if _chosen_mode(mode, model) == "branch" else AdapterEdit
    edit = kind(adapters, block_count, read, text)
    edit(model)  # every layer found and fitted now, not at a later (offloaded) compile
    return edit, True
