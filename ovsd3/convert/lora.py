"""Merging a PEFT LoRA adapter (Flash SD3) into the transformer before export.

Merged weights (W += scale * B @ A, PEFT's merge_and_unload) give a plain transformer IR with no LoRA
branches: the same size and speed as the base model, unlike tracing the adapter unmerged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ovsd3.errors import OvsdError, reason_of

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def resolve_adapter(adapter: str) -> Path:
    """A local PEFT adapter folder, or a model hub id downloaded to the local cache."""
    path = Path(adapter).expanduser()
    if path.exists():
        if not (path / ADAPTER_CONFIG).exists():
            raise OvsdError(f"LoRA adapter {adapter!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return path
    parts = adapter.split("/")
    if len(parts) != 2 or not all(parts):
        raise OvsdError(f"LoRA adapter {adapter!r} is neither an existing folder nor a model hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter, allow_patterns=[ADAPTER_CONFIG, "*.safetensors", "*.bin"]))
    except Exception as error:
        reason = reason_of(error)
        raise OvsdError(f"cannot download LoRA adapter {adapter!r} from the model hub ({reason}); "
                        f"pass a local PEFT adapter folder instead") from None


def _adapter_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OvsdError(f"LoRA adapter {folder} has no .safetensors weights")
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_adapter_fits(transformer: torch.nn.Module, folder: Path) -> int:
    """Raise a one-line error unless every LoRA tensor matches a module of the transformer.

    Returns the number of adapted modules. PEFT itself only warns about keys it cannot place, which
    would silently produce a model without the adapter.
    """
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise OvsdError(f"cannot read {folder / ADAPTER_CONFIG}: {error}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise OvsdError(f"adapter {folder} is a {config.get('peft_type')} adapter, not LoRA")
    modules = dict(transformer.named_modules())
    adapted = set()
    for key, shape in _adapter_tensors(folder).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        factor = "A" if ".lora_A." in key else "B"
        module_name = key.split(f".lora_{factor}.")[0].removeprefix(_PEFT_PREFIX)
        module = modules.get(module_name)
        if module is None:
            raise OvsdError(f"LoRA adapter does not fit the transformer: it adapts {module_name!r}, "
                            f"which the transformer does not have")
        if isinstance(module, torch.nn.Linear):
            expected_dim = module.in_features if factor == "A" else module.out_features
            got_dim = shape[1] if factor == "A" else shape[0]
        elif isinstance(module, torch.nn.Conv2d):
            expected_dim = module.in_channels if factor == "A" else module.out_channels
            got_dim = shape[1] if factor == "A" else shape[0]
        else:
            raise OvsdError(f"LoRA adapter does not fit the transformer: {module_name!r} is a "
                            f"{type(module).__name__}, not a Linear or Conv2d layer")
        if expected_dim != got_dim:
            raise OvsdError(f"LoRA adapter does not fit the transformer: {module_name}.lora_{factor} has shape "
                            f"{list(shape)}, the layer needs {expected_dim} there")
        adapted.add(module_name)
    if not adapted:
        raise OvsdError(f"LoRA adapter {folder} holds no LoRA weights")
    return len(adapted)


def merge_lora(transformer: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The transformer with the adapter merged into its weights (PEFT merge_and_unload)."""
    from peft import PeftModel

    check_adapter_fits(transformer, folder)
    try:
        peft_model = PeftModel.from_pretrained(transformer, str(folder))
    except Exception as error:
        raise OvsdError(f"cannot apply LoRA adapter {folder}: {reason_of(error)}") from None
    merged = peft_model.merge_and_unload()
    return merged.eval()
