"""The on-disk layout of an OpenVINO SD3 folder, as optimum-intel writes it, plus ovsd3's own record.

This module is shared by convert, quantize and the runtime, so it imports nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
MODEL_INDEX = "model_index.json"
DEMO_RECORD = "ovsd3_demo.json"  # in a diffusers folder trained by demo/train.py: which demo and its recipe
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
OVSD3_RECORD = "ovsd3.json"

TRANSFORMER = "transformer"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
CLIP_L, CLIP_G, T5 = "text_encoder", "text_encoder_2", "text_encoder_3"
TEXT_ENCODERS = (CLIP_L, CLIP_G, T5)
TOKENIZER_OF = {CLIP_L: "tokenizer", CLIP_G: "tokenizer_2", T5: "tokenizer_3"}
MODEL_COMPONENTS = (TRANSFORMER, CLIP_L, CLIP_G, T5, VAE_DECODER, VAE_ENCODER)

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
FLASH_LORA_ID = "jasperai/flash-sd3"


@dataclass(frozen=True)
class GenerationDefaults:
    """What `ovsd3 run` uses when the user does not say (diffusers' StableDiffusion3Pipeline defaults)."""

    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    sampler: str = "euler"  # "euler" (deterministic) or "flash" (stochastic, Flash SD3)


FLASH_DEFAULTS = GenerationDefaults(num_inference_steps=4, guidance_scale=0.0, sampler="flash")


@dataclass
class FolderRecord:
    """ovsd3.json: how a folder was made. Other runtimes ignore it; `ovsd3 run` reads its defaults."""

    source: str
    weight_format: str
    has_t5: bool
    flash_lora: str | None = None
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    parity: dict[str, dict] = field(default_factory=dict)
    ovsd3_version: str = ""
    quantization: dict | None = None  # what `ovsd3 quantize` did, with its size table and quality gate
    demo: str | None = None  # "digits" for the shipped demo model: reports and the gate can score its pictures

    def save(self, folder: Path) -> None:
        (Path(folder) / OVSD3_RECORD).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "FolderRecord | None":
        path = Path(folder) / OVSD3_RECORD
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["defaults"] = GenerationDefaults(**data.get("defaults", {}))
        return cls(**data)


def model_xml(folder: Path, component: str) -> Path:
    return Path(folder) / component / MODEL_XML


def ir_bytes(folder: Path, component: str) -> int:
    """Bytes of a component's IR (xml + bin) on disk; 0 when the folder has no such component."""
    xml = model_xml(folder, component)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size if xml.exists() else 0
