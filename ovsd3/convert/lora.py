"""Merging a PEFT LoRA adapter (Flash SD3) into the transformer before export.

Merged weights (W += scale * B @ A, PEFT's merge_and_unload) give a plain transformer IR with no LoRA
branches: the same size and speed as the base model, unlike tracing the adapter unmerged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ovsd3.errors import OvsdError, reason_of

ADAPTER_CONFIG = "adapter_config.json"


def resolve_adapter(adapter: str) -> Path:
    """A local PEFT adapter folder, or a model hub id downloaded to the local cache; its files checked now
    (config fields, tensor dtypes, shapes and values), before any component is exported."""
    from ovsd3.runtime.adapters import read_adapter

    folder = _adapter_folder(adapter)
    read_adapter(folder, block_count=0)
    return folder


def _adapter_folder(adapter: str) -> Path:
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


def check_adapter_fits(transformer: torch.nn.Module, folder: Path) -> int:
    """Raise a one-line error unless the adapter's files are sound (ovsd3.runtime.adapters checks the config's
    fields, the tensors' dtypes, shapes and values) and every update matches a module of the transformer.

    Returns the number of adapted modules. PEFT itself only warns about keys it cannot place, which
    would silently produce a model without the adapter.
    """
    from ovsd3.runtime.adapters import read_adapter

    factors, _ = read_adapter(folder, block_count=0)  # a PEFT folder: no kohya names to place
    modules = dict(transformer.named_modules())
    for module_name, updates in factors.items():
        module = modules.get(module_name)
        if module is None:
            raise OvsdError(f"LoRA adapter does not fit the transformer: it adapts {module_name!r}, "
                            f"which the transformer does not have")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise OvsdError(f"LoRA adapter does not fit the transformer: {module_name!r} is a "
                            f"{type(module).__name__}, not a Linear or Conv2d layer")
        expected = tuple(module.weight.shape)
        for update in updates:
            if update.shape != expected:
                raise OvsdError(f"LoRA adapter does not fit the transformer: {module_name} is {list(expected)}, "
                                f"the adapter's B @ A would be {list(update.shape)}")
    return len(factors)


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
