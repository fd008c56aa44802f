"""SD3 ControlNets (diffusers' ``SD3ControlNetModel``) to IR beside the transformer: ``controlnet/``,
``controlnet_1/``, ... each checked against PyTorch like every other component.

optimum-intel has no export config for them, so they are traced with OpenVINO's PyTorch frontend directly.
The IR takes ``hidden_states`` (the noisy latents, 4D), ``controlnet_cond`` (the control image's latents),
``timestep``, ``encoder_hidden_states`` (absent where the ControlNet has no text embedder: SD3.5 Large's 8B
ones) and ``pooled_projections``; it gives ``controlnet_block_samples.{i}``, one residual per ControlNet block,
unscaled (the runtime scales them by ``controlnet_conditioning_scale``). A ControlNet with
``use_pos_embed=False`` (SD3.5 Large's) reads the transformer's patch embedding, as diffusers' pipeline gives
it one: it is copied into the export, so its IR too takes the 4D latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ovsd3 import layout
from ovsd3.convert.components import CLIP_TOKENS, T5_TOKENS, _rng, _save_diffusers_config
from ovsd3.convert.export import ComponentExport, ComponentResult, ExportOptions, export_component
from ovsd3.convert.source import ModelSource
from ovsd3.errors import OvsdError, reason_of

OUTPUT_PREFIX = "controlnet_block_samples"
CONFIG = "config.json"


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG, "*.safetensors"]))
    except Exception as error:  # connection, gating and missing repositories come in many types
        raise OvsdError(f"cannot download ControlNet {repo_id!r} from the model hub ({reason_of(error)}); pass a "
                        f"local diffusers ControlNet folder instead") from None


def resolve_controlnet(spec: str, transformer_config: dict) -> Path:
    """A local SD3ControlNetModel folder or a model hub id (downloaded), its config checked to fit the
    transformer now, before any component is exported."""
    path = Path(spec).expanduser()
    if path.exists():
        folder = path
    elif len(spec.split("/")) == 2 and all(spec.split("/")) and not spec.startswith((".", "~")):
        folder = _download(spec)
    else:
        raise OvsdError(f"--controlnet {spec!r} is neither an existing folder nor a model hub id (owner/name)")
    if not (folder / CONFIG).is_file():
        raise OvsdError(f"--controlnet {spec!r} is not a diffusers ControlNet folder (no {CONFIG})")
    layout.read_controlnet_config(folder.parent, folder.name, transformer_config)
    if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
        raise OvsdError(f"--controlnet {spec!r} has no weights (*.safetensors) in {folder}")
    return folder


def _transformer_pos_embed(source: ModelSource, controlnet):
    """The transformer's patch embedding (its ``pos_embed.*`` weights alone), as diffusers'
    ``_get_pos_embed_from_transformer`` builds it for a ControlNet with ``use_pos_embed=False``."""
    from diffusers.models.embeddings import PatchEmbed
    from safetensors import safe_open

    config = layout.read_json(source.root / layout.TRANSFORMER / CONFIG)
    pos_embed = PatchEmbed(height=config.get("sample_size", 128), width=config.get("sample_size", 128),
                           patch_size=config.get("patch_size", 2), in_channels=config.get("in_channels", 16),
                           embed_dim=controlnet.config.num_attention_heads * controlnet.config.attention_head_dim,
                           pos_embed_max_size=config.get("pos_embed_max_size"))
    weights = {}
    for file in sorted((source.root / layout.TRANSFORMER).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            weights.update({key.removeprefix("pos_embed."): handle.get_tensor(key)
                            for key in handle.keys() if key.startswith("pos_embed.")})
    try:
        pos_embed.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise OvsdError(f"cannot give the ControlNet the transformer's patch embedding: {reason_of(error)}") from None
    return pos_embed.float()


class _Traced(torch.nn.Module):
    """The ControlNet with the IR's inputs, in order, and its block samples as a flat tuple."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, hidden_states, controlnet_cond, timestep, pooled_projections, encoder_hidden_states=None):
        samples = self.controlnet(hidden_states=hidden_states, controlnet_cond=controlnet_cond, timestep=timestep,
                                  encoder_hidden_states=encoder_hidden_states,
                                  pooled_projections=pooled_projections, return_dict=False)[0]
        return tuple(samples)


def input_names(config) -> list[str]:
    names = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections"]
    return names + (["encoder_hidden_states"] if config.get("joint_attention_dim") is not None else [])


def parity_inputs(config: dict, transformer_config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 256x256-pixel latent (or the largest the position embedding allows) and a CLIP+T5-length text."""
    patch, channels = config.get("patch_size", 2), config.get("in_channels", 16)
    side = min(32, (transformer_config.get("pos_embed_max_size") or 16) * patch) // patch * patch
    inputs = {
        "hidden_states": rng.standard_normal((1, channels, side, side), dtype=np.float32),
        "controlnet_cond": rng.standard_normal((1, channels + config.get("extra_conditioning_channels", 0),
                                                side, side), dtype=np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "pooled_projections": rng.standard_normal((1, config["pooled_projection_dim"]), dtype=np.float32),
    }
    if config.get("joint_attention_dim") is not None:
        inputs["encoder_hidden_states"] = rng.standard_normal((1, CLIP_TOKENS + T5_TOKENS,
                                                               config["joint_attention_dim"]), dtype=np.float32)
    return inputs


def run_controlnet(module, inputs) -> dict:
    """The PyTorch ControlNet on IR-named inputs, its block samples under the IR's names."""
    samples = module(**inputs)
    return {f"{OUTPUT_PREFIX}.{index}": sample for index, sample in enumerate(samples)}


def _trace(inputs: dict[str, np.ndarray]):
    """The tracing function for ``inputs``: dynamic batch, latent size and text length; fp16 weights when asked."""
    def trace(module, xml_path: Path, weight_format: str) -> None:
        import openvino as ov

        dynamic = {"hidden_states": [-1, None, -1, -1], "controlnet_cond": [-1, None, -1, -1], "timestep": [-1],
                   "pooled_projections": [-1, None], "encoder_hidden_states": [-1, -1, None]}
        shapes = [(name, ov.PartialShape([value.shape[axis] if size is None else size
                                          for axis, size in enumerate(dynamic[name])]))
                  for name, value in inputs.items()]
        with torch.no_grad():
            model = ov.convert_model(module, example_input={name: torch.from_numpy(value) for name, value in
                                                            inputs.items()}, input=shapes)
        for index, output in enumerate(model.outputs):
            output.get_tensor().set_names({f"{OUTPUT_PREFIX}.{index}"})
        for parameter, (name, _) in zip(model.get_parameters(), shapes):
            parameter.output(0).get_tensor().set_names({name})
            parameter.set_friendly_name(name)
        ov.save_model(model, xml_path, compress_to_fp16=weight_format == "fp16")

    return trace


def _job(source: ModelSource, folder: Path, name: str, options: ExportOptions) -> ComponentExport:
    from diffusers import SD3ControlNetModel

    try:
        controlnet = SD3ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    except Exception as error:
        raise OvsdError(f"cannot load ControlNet {folder}: {reason_of(error)}") from None
    if controlnet.pos_embed is None:
        controlnet.pos_embed = _transformer_pos_embed(source, controlnet)
    transformer_config = layout.read_json(source.root / layout.TRANSFORMER / CONFIG)
    inputs = parity_inputs(dict(controlnet.config), transformer_config, _rng(options))
    return ComponentExport(name=name, module=_Traced(controlnet), export_config=None, inputs=inputs,
                           reference=run_controlnet, trace=_trace(inputs),
                           save_config=lambda module, out: _save_config(module.controlnet, out))


def _save_config(controlnet, out: Path) -> None:
    _save_diffusers_config(controlnet, out)
    config = json.loads((out / CONFIG).read_text())  # diffusers records the class; keep it for the layout check
    config.setdefault("_class_name", "SD3ControlNetModel")
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert_controlnet(source: ModelSource, folder: Path, index: int, out: Path,
                       options: ExportOptions) -> ComponentResult:
    name = layout.controlnet_component(index)
    return export_component(_job(source, folder, name, options), out / name, options)
