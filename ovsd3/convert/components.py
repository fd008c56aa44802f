"""One ``convert_<component>`` per SD3 component, each around the shared export core.

Each function loads its component from the source, exports it, checks it against PyTorch on random
inputs of realistic shape, saves the config next to the IR, and drops the PyTorch module before
returning, so only one component is ever in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovsd3 import layout
from ovsd3.convert.export import (ComponentExport, ComponentResult, ExportOptions, export_component,
                                  export_config_for)
from ovsd3.convert.source import ModelSource
from ovsd3.errors import OvsdError, ParityError, reason_of

CLIP_TOKENS = 77
T5_TOKENS = 256  # diffusers' default max_sequence_length for SD3
# Tokenizer checks: plain, punctuation and case, digits and non-ASCII.
TOKENIZER_PROBES = (
    "a photo of a cat sitting on a red sofa",
    "An astronaut, riding a HORSE on the Moon!",
    "7 lighthouses; café at 19:30 - \u00e9t\u00e9",
)


def _rng(options: ExportOptions) -> np.random.Generator:
    return np.random.default_rng(options.seed)


def _save_transformers_config(module, folder: Path) -> None:
    module.config.save_pretrained(folder)


def _save_diffusers_config(module, folder: Path) -> None:
    module.save_config(folder)


def clip_outputs(module, inputs) -> dict:
    """A CLIP text encoder's outputs under the IR's output names."""
    result = module(input_ids=inputs["input_ids"], output_hidden_states=True)
    outputs = {"text_embeds": result.text_embeds, "last_hidden_state": result.last_hidden_state}
    outputs.update({f"hidden_states.{i}": hidden for i, hidden in enumerate(result.hidden_states)})
    # optimum-intel's exporter writes last_hidden_state (after the final LayerNorm) as the last
    # hidden_states output, where transformers returns the value before it. SD3 never reads that
    # output (it takes the penultimate layer, or earlier with clip skip), so hold the IR to what it has.
    outputs[f"hidden_states.{len(result.hidden_states) - 1}"] = result.last_hidden_state
    return outputs


def _text_encoder_job(source: ModelSource, component: str, options: ExportOptions) -> ComponentExport:
    module = source.load_text_encoder(component, source.load_dtype(component, options.weight_format))
    module.config.output_hidden_states = True
    module.text_model.config.output_hidden_states = True
    return ComponentExport(
        name=component, module=module,
        export_config=export_config_for(module, "clip-text-with-projection", "feature-extraction"),
        inputs={"input_ids": _rng(options).integers(0, module.config.vocab_size, (1, CLIP_TOKENS), dtype=np.int64)},
        reference=clip_outputs, save_config=_save_transformers_config)


def convert_text_encoder(source: ModelSource, component: str, out: Path, options: ExportOptions) -> ComponentResult:
    """CLIP-L (``text_encoder``) or CLIP-G (``text_encoder_2``): all hidden states are outputs, since SD3
    takes the penultimate one (or an earlier one with clip skip)."""
    return export_component(_text_encoder_job(source, component, options), out / component, options)


def _t5_job(source: ModelSource, options: ExportOptions) -> ComponentExport:
    module = source.load_text_encoder(layout.T5, source.load_dtype(layout.T5, options.weight_format))
    export_config = export_config_for(module, "t5-encoder-model", "feature-extraction")
    export_config.runtime_options = {"ACTIVATIONS_SCALE_FACTOR": "8.0"}
    return ComponentExport(
        name=layout.T5, module=module, export_config=export_config,
        inputs={"input_ids": _rng(options).integers(0, module.config.vocab_size, (1, CLIP_TOKENS), dtype=np.int64)},
        reference=lambda t5, inputs: {"last_hidden_state": t5(input_ids=inputs["input_ids"]).last_hidden_state},
        save_config=_save_transformers_config)


def convert_t5(source: ModelSource, out: Path, options: ExportOptions) -> ComponentResult:
    """T5-XXL encoder. Its activations overflow fp16, hence the runtime option optimum-intel also sets."""
    return export_component(_t5_job(source, options), out / layout.T5, options)


def transformer_parity_inputs(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 256x256-pixel latent (or the largest the position embedding allows) and a CLIP+T5-length text."""
    patch = config.patch_size
    side = min(32, config.pos_embed_max_size * patch) // patch * patch
    return {
        "hidden_states": rng.standard_normal((1, config.in_channels, side, side), dtype=np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, CLIP_TOKENS + T5_TOKENS, config.joint_attention_dim),
                                                     dtype=np.float32),
        "pooled_projections": rng.standard_normal((1, config.pooled_projection_dim), dtype=np.float32),
    }


def run_transformer(module, inputs) -> dict:
    """The PyTorch transformer on IR-named inputs, its output under the IR's name."""
    sample = module(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"],
                    encoder_hidden_states=inputs["encoder_hidden_states"],
                    pooled_projections=inputs["pooled_projections"], return_dict=False)[0]
    return {"out_sample": sample}


def _transformer_job(source: ModelSource, options: ExportOptions, lora_folder: Path | None) -> ComponentExport:
    module = source.load_transformer(source.load_dtype("transformer", options.weight_format))
    if lora_folder is not None:
        from ovsd3.convert.lora import merge_lora

        module = merge_lora(module, lora_folder)
    return transformer_job(module, options)


def transformer_job(module, options: ExportOptions) -> ComponentExport:
    """Exporting an SD3Transformer2DModel in memory (a source's, or one built from a preset's shapes)."""
    # The attributes optimum-intel's SD3 export sets before building the transformer's export config.
    module.config.text_encoder_projection_dim = module.config.joint_attention_dim
    module.config.requires_aesthetics_score = False
    module.config.time_cond_proj_dim = None
    return ComponentExport(
        name="transformer", module=module,
        export_config=export_config_for(module, "sd3-transformer", "semantic-segmentation"),
        inputs=transformer_parity_inputs(module.config, _rng(options)),
        reference=run_transformer, save_config=_save_diffusers_config)


def convert_transformer(source: ModelSource, out: Path, options: ExportOptions,
                        lora_folder: Path | None = None) -> ComponentResult:
    """The MMDiT transformer, with a LoRA adapter merged into its weights when one is given."""
    return export_component(_transformer_job(source, options, lora_folder), out / layout.TRANSFORMER, options)


def _vae_decoder_job(source: ModelSource, options: ExportOptions) -> ComponentExport:
    vae = source.load_vae(source.load_dtype("vae", options.weight_format))
    vae.forward = lambda latent_sample: vae.decode(z=latent_sample)
    return ComponentExport(
        name=layout.VAE_DECODER, module=vae,
        export_config=export_config_for(vae, "vae-decoder", "semantic-segmentation"),
        inputs={"latent_sample": _rng(options).standard_normal((1, vae.config.latent_channels, 16, 16),
                                                               dtype=np.float32)},
        reference=lambda model, inputs: {"sample": model.decode(inputs["latent_sample"]).sample},
        save_config=_save_diffusers_config)


def convert_vae_decoder(source: ModelSource, out: Path, options: ExportOptions) -> ComponentResult:
    return export_component(_vae_decoder_job(source, options), out / layout.VAE_DECODER, options)


def _vae_encoder_job(source: ModelSource, options: ExportOptions) -> ComponentExport:
    vae = source.load_vae(source.load_dtype("vae", options.weight_format))
    vae.forward = lambda sample: {"latent_parameters": vae.encode(x=sample)["latent_dist"].parameters}
    return ComponentExport(
        name=layout.VAE_ENCODER, module=vae,
        export_config=export_config_for(vae, "vae-encoder", "semantic-segmentation"),
        inputs={"sample": _rng(options).uniform(-1.0, 1.0, (1, 3, 128, 128)).astype(np.float32)},
        reference=lambda model, inputs: {"latent_parameters": model.encode(inputs["sample"]).latent_dist.parameters},
        save_config=_save_diffusers_config)


def convert_vae_encoder(source: ModelSource, out: Path, options: ExportOptions) -> ComponentResult:
    return export_component(_vae_encoder_job(source, options), out / layout.VAE_ENCODER, options)


@dataclass
class TokenizerResult:
    name: str
    probes: int
    notes: list[str]


def _pad_token_only_difference(tokenizer, expected: list[int], got: list[int]) -> bool:
    """True when the sole disagreement is a literal pad-token character in the text.

    SD3's CLIP-G tokenizer pads with "!" and declares it a special token, so Hugging Face reads a "!" in
    a prompt as the pad id, while openvino-tokenizers (hence optimum-intel and openvino.genai too) reads
    it as ordinary text. That is a known difference, not a broken export.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id or len(expected) != len(got):
        return False
    differing = [(e, g) for e, g in zip(expected, got) if e != g]
    return bool(differing) and all(e == pad_id for e, _ in differing)


def convert_tokenizer(source: ModelSource, component: str, out: Path) -> TokenizerResult:
    """The tokenizer files plus OpenVINO tokenizer/detokenizer models, checked token for token."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer as to_openvino

    tokenizer = source.load_tokenizer(component)
    folder = out / component
    tokenizer.save_pretrained(folder)
    try:
        ov_tokenizer, ov_detokenizer = to_openvino(tokenizer, with_detokenizer=True)
    except NotImplementedError:
        ov_tokenizer, ov_detokenizer = to_openvino(tokenizer, with_detokenizer=False), None
    except Exception as error:
        raise OvsdError(f"openvino-tokenizers cannot convert {component} ({type(tokenizer).__name__}): "
                        f"{reason_of(error)}") from None
    ov.save_model(ov_tokenizer, folder / layout.TOKENIZER_XML)
    if ov_detokenizer is not None:
        ov.save_model(ov_detokenizer, folder / layout.DETOKENIZER_XML)
    compiled = ov.Core().compile_model(folder / layout.TOKENIZER_XML, "CPU")
    notes = []
    for probe in TOKENIZER_PROBES:
        expected = list(tokenizer(probe)["input_ids"])
        got = compiled([probe])["input_ids"][0].tolist()
        if got == expected:
            continue
        if _pad_token_only_difference(tokenizer, expected, got):
            notes.append(f"a literal {tokenizer.pad_token!r} in a prompt is its pad token (id "
                         f"{tokenizer.pad_token_id}) to Hugging Face but text to OpenVINO tokenizers, "
                         f"as in optimum-intel and openvino.genai")
            continue
        raise ParityError(f"{component}: the OpenVINO tokenizer splits {probe!r} differently from "
                          f"the original ({got[:12]}... vs {expected[:12]}...)")
    return TokenizerResult(component, len(TOKENIZER_PROBES), sorted(set(notes)))


def write_scheduler(source: ModelSource, out: Path, flash: bool) -> None:
    """The scheduler config; Flash folders turn on diffusers' stochastic sampling (the Flash sampler)."""
    scheduler = source.load_scheduler()
    if flash:
        scheduler.register_to_config(stochastic_sampling=True)
    scheduler.save_pretrained(out / "scheduler")


def write_model_index(source: ModelSource, out: Path, with_t5: bool) -> None:
    """model_index.json as optimum-intel writes it: the source's, with T5 blanked when left out."""
    index = dict(source.model_index)
    index["_name_or_path"] = source.name
    if not with_t5:
        index["text_encoder_3"] = [None, None]
        index["tokenizer_3"] = [None, None]
    (out / layout.MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
