"""Where the PyTorch model comes from: a model hub id or a local diffusers folder.

Components are loaded one at a time, in the dtype their checkpoint is stored in, so that the whole of
SD3 Medium with T5-XXL never has to be in memory at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ovsd3 import layout
from ovsd3.errors import OvsdError, reason_of

SD3_PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
LOADED_16BIT = ("transformer", "text_encoder_3")  # the components too big to load in fp32

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _hub_patterns(with_t5: bool) -> list[str]:
    folders = list(REQUIRED) + (list(T5_PARTS) if with_t5 else [])
    # Only the diffusers layout; the repos also hold single-file checkpoints we must not download.
    patterns = ["model_index.json"]
    for folder in folders:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors", f"{folder}/*.txt", f"{folder}/*.model"]
    return patterns


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _download(repo_id: str, with_t5: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(with_t5)))
    except GatedRepoError:
        raise OvsdError(f"model hub repository {repo_id!r} is gated: accept its licence on the hub and log in "
                        f"(`hf auth login`), or pass a local diffusers folder") from None
    except RepositoryNotFoundError:
        raise OvsdError(f"model hub repository {repo_id!r} does not exist (or needs a login)") from None
    except Exception as error:  # connection errors come in many types
        reason = reason_of(error)
        raise OvsdError(f"cannot download {repo_id!r} from the model hub ({reason}); check the network, "
                        f"or pass a local diffusers folder instead") from None


@dataclass
class ModelSource:
    """A validated SD3 diffusers folder (local, or a hub snapshot)."""

    name: str
    root: Path
    model_index: dict

    @classmethod
    def open(cls, model: str, *, with_t5: bool = True) -> "ModelSource":
        path = Path(model).expanduser()
        if path.exists():
            root = path
        elif _looks_like_hub_id(model):
            root = _download(model, with_t5)
        else:
            raise OvsdError(f"MODEL {model!r} is neither an existing folder nor a model hub id (owner/name)")
        source = cls(model, root, cls._read_index(root, model))
        source._check_components(with_t5)
        return source

    @property
    def demo(self) -> str | None:
        """Which ovsd3 demo this model is (demo/train.py marks its output), if any."""
        marker = self.root / layout.DEMO_RECORD
        try:
            return json.loads(marker.read_text()).get("demo") if marker.exists() else None
        except (OSError, ValueError, AttributeError):
            return None

    @staticmethod
    def _read_index(root: Path, model: str) -> dict:
        index_path = root / "model_index.json"
        if not root.is_dir() or not index_path.exists():
            raise OvsdError(f"{model!r} is not a diffusers pipeline folder (no model_index.json)")
        index = layout.read_json(index_path)
        class_name = index.get("_class_name", "?")
        if class_name not in SD3_PIPELINE_CLASSES:
            raise OvsdError(f"{model!r} is a {class_name}, not a Stable Diffusion 3 pipeline")
        return index

    def declares(self, component: str) -> bool:
        entry = self.model_index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

    @property
    def has_t5(self) -> bool:
        return all(self.declares(part) for part in T5_PARTS)

    def _check_components(self, with_t5: bool) -> None:
        wanted = list(REQUIRED) + (list(T5_PARTS) if with_t5 and self.has_t5 else [])
        for component in wanted:
            folder = self.root / component
            if not self.declares(component):
                raise OvsdError(f"{self.name!r} has no {component} (model_index.json does not list it)")
            if not folder.is_dir() or not any(folder.iterdir()):
                raise OvsdError(f"{self.name!r} is missing component {component!r} (no folder {folder})")
            if component not in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
                if not (folder / "config.json").exists():
                    raise OvsdError(f"component {component!r} has no config.json in {folder}")
                if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
                    raise OvsdError(f"component {component!r} has no weights in {folder}")

    def checkpoint_dtype(self, component: str) -> torch.dtype:
        """The dtype the component's weights are stored in (read from a safetensors header)."""
        from safetensors import safe_open

        files = sorted((self.root / component).glob("*.safetensors"))
        if not files:
            return torch.float32
        try:
            with safe_open(files[0], framework="pt") as handle:
                for key in handle.keys():
                    dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except Exception as error:  # safetensors raises its own SafetensorError for a cut or corrupt file
            raise OvsdError(f"cannot read {files[0]}: {reason_of(error)} (a truncated or corrupt download?)") from None
        return torch.float32

    def load_dtype(self, component: str, weight_format: str) -> torch.dtype:
        """fp16 for the big components (transformer, T5) of a 16-bit checkpoint in an fp16 export, so no
        fp32 copy of them ever exists; fp32 otherwise.

        The CLIPs and the VAE (at most 0.7B parameters, under 3 GB in fp32) load in fp32 even from 16-bit
        checkpoints: PyTorch's fp16 kernels on a CPU are slow (the full-size VAE's fp16 reference run
        took minutes), and the IR is stored in fp16 all the same.
        """
        stored = self.checkpoint_dtype(component)
        if weight_format == "fp16" and component in LOADED_16BIT and stored in (torch.float16, torch.bfloat16):
            return torch.float16
        return torch.float32

    def _load(self, loader, component: str, dtype: torch.dtype, dtype_kwarg: str):
        try:
            module = loader.from_pretrained(self.root, subfolder=component, **{dtype_kwarg: dtype})
        except Exception as error:
            reason = reason_of(error)
            raise OvsdError(f"cannot load {component} from {self.name!r}: {reason}") from None
        return module.eval()

    def load_transformer(self, dtype: torch.dtype):
        from diffusers import SD3Transformer2DModel

        return self._load(SD3Transformer2DModel, "transformer", dtype, "torch_dtype")

    def load_vae(self, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        return self._load(AutoencoderKL, "vae", dtype, "torch_dtype")

    def load_text_encoder(self, component: str, dtype: torch.dtype):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        loader = T5EncoderModel if component == "text_encoder_3" else CLIPTextModelWithProjection
        return self._load(loader, component, dtype, "dtype")

    def load_tokenizer(self, component: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.root / component)
        except Exception as error:
            raise OvsdError(f"cannot load {component} from {self.name!r}: {error}") from None

    def load_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config_path = self.root / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise OvsdError(f"cannot read {config_path}: {error}") from None
        if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise OvsdError(f"scheduler is {config.get('_class_name')}, expected FlowMatchEulerDiscreteScheduler")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
