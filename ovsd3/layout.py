"""The on-disk layout of an OpenVINO SD3 folder, as optimum-intel writes it, plus ovsd3's own record.

This module is shared by convert, quantize and the runtime, so it imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
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
# SD3 ControlNets (diffusers' SD3ControlNetModel), beside the transformer: controlnet/, controlnet_1/, ... in the
# order `ovsd3 convert --controlnet` was given them. model_index.json does not list them, so optimum-intel and
# openvino.genai, which load the components it lists, read such a folder as the plain pipeline.
CONTROLNET = "controlnet"
MAX_CONTROLNETS = 8

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
FLASH_LORA_ID = "jasperai/flash-sd3"

# The bounds of a generation request (ovsd3.runtime.request takes them from here), here because a folder's
# defaults must keep them and this module imports nothing of the runtime.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_BLOCKS = 1000  # transformer blocks: SD3.5 Large has 38


@dataclass(frozen=True)
class Field:
    """One field of a JSON file that ovsd3 reads from a model folder: its kind and (inclusive) bounds.
    Kinds: "int", "number" (finite), "bool", "text", "ints" (a list of integers), "object"."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    required: bool = False
    nullable: bool = False
    choices: tuple = ()
    above: float | None = None  # "number": strictly greater than this (a scale that is divided by)


def _describe(field: Field) -> str:
    if field.choices:
        return "one of " + ", ".join(repr(choice) for choice in field.choices)
    kind = {"int": "an integer", "number": "a finite number", "bool": "true or false", "text": "a string",
            "ints": "a list of integers", "object": "a JSON object"}[field.kind]
    if field.above is not None:
        kind += f" above {field.above:g}"
    if field.low is not None and field.high is not None:
        kind += f" from {field.low:g} to {field.high:g}"
    elif field.low is not None:
        kind += f" of at least {field.low:g}"
    elif field.high is not None:
        kind += f" up to {field.high:g}"
    return kind + (" (or null)" if field.nullable else "")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_bounds(value, field: Field) -> bool:
    return (field.low is None or value >= field.low) and (field.high is None or value <= field.high) \
        and (field.above is None or value > field.above)


def _valid(value, field: Field) -> bool:
    if field.choices:
        return isinstance(value, str) and value in field.choices
    if field.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and _in_bounds(value, field)
    if field.kind == "number":
        return _is_number(value) and math.isfinite(value) and _in_bounds(value, field)
    if field.kind == "ints":
        item = Field(field.name, "int", field.low, field.high)
        return isinstance(value, (list, tuple)) and all(_valid(element, item) for element in value)
    return isinstance(value, {"bool": bool, "text": str, "object": dict}[field.kind])


def _shown(value) -> str:
    text = json.dumps(value, allow_nan=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(path: Path, data: dict, fields: tuple[Field, ...], prefix: str = "") -> None:
    """A one-line OvsdError naming ``path`` and the first field of ``data`` that ``fields`` refuse."""
    from ovsd3.errors import OvsdError

    for rule in fields:
        if rule.name not in data:
            if rule.required:
                raise OvsdError(f"{path}: {prefix}{rule.name} is missing (it must be {_describe(rule)})")
            continue
        value = data[rule.name]
        if value is None and rule.nullable:
            continue
        if not _valid(value, rule):
            raise OvsdError(f"{path}: {prefix}{rule.name} must be {_describe(rule)} (got {_shown(value)})")


def check_known(path: Path, data: dict, fields: tuple[Field, ...], prefix: str = "") -> None:
    """Refuse a field that ``fields`` do not name (a typo would otherwise be ignored or crash later)."""
    from ovsd3.errors import OvsdError

    known = {field.name for field in fields}
    unknown = [name for name in data if name not in known]
    if unknown:
        raise OvsdError(f"{path}: unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class GenerationDefaults:
    """What `ovsd3 run` uses when the user does not say (diffusers' StableDiffusion3Pipeline defaults)."""

    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    sampler: str = "euler"  # "euler" (deterministic) or "flash" (stochastic, Flash SD3)
    skip_guidance_layers: tuple[int, ...] | None = None  # skip-layer guidance unless the request says otherwise

    def __post_init__(self) -> None:
        if isinstance(self.skip_guidance_layers, list):  # a list when read from JSON
            object.__setattr__(self, "skip_guidance_layers", tuple(self.skip_guidance_layers))
        values = asdict(self)
        check_fields(Path("GenerationDefaults"), values, defaults_fields(), "defaults.")


def defaults_fields() -> tuple[Field, ...]:
    """A folder's defaults keep the bounds that `ovsd3 run` and the Python keywords keep: a default of 10**9
    steps would otherwise grow until the machine kills the process."""
    return (Field("num_inference_steps", "int", 1, MAX_STEPS), Field("guidance_scale", "number", 0, MAX_GUIDANCE),
            Field("sampler", "text", choices=("euler", "flash")),
            Field("skip_guidance_layers", "ints", 0, MAX_BLOCKS - 1, nullable=True))


FLASH_DEFAULTS = GenerationDefaults(num_inference_steps=4, guidance_scale=0.0, sampler="flash")
# The sampler settings the model cards recommend (stabilityai's Hugging Face pages for each model).
SD35_LARGE_DEFAULTS = GenerationDefaults(num_inference_steps=28, guidance_scale=3.5)
SD35_LARGE_TURBO_DEFAULTS = GenerationDefaults(num_inference_steps=4, guidance_scale=0.0)
SD35_MEDIUM_DEFAULTS = GenerationDefaults(num_inference_steps=40, guidance_scale=4.5, skip_guidance_layers=(7, 8, 9))


def model_card_defaults(name: str, transformer_config: dict) -> GenerationDefaults:
    """The settings a model's card recommends, told apart by its transformer: MMDiT-X (dual attention
    layers) is SD3.5 Medium, QK-normalised MMDiT is SD3.5 Large (Turbo when its name says so: the two share
    the architecture), the rest SD3 Medium with diffusers' defaults. Skip-layer guidance needs the blocks
    it skips, so a smaller model of Medium's shape (a test model) gets Medium's settings without it."""
    if transformer_config.get("dual_attention_layers"):
        defaults = SD35_MEDIUM_DEFAULTS
        if max(defaults.skip_guidance_layers) >= transformer_config.get("num_layers", 0):
            defaults = replace(defaults, skip_guidance_layers=None)
        return defaults
    if transformer_config.get("qk_norm"):
        return SD35_LARGE_TURBO_DEFAULTS if "turbo" in str(name).lower() else SD35_LARGE_DEFAULTS
    return GenerationDefaults()


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
    controlnets: dict[str, str] | None = None  # ControlNet folder -> the source it was converted from
    # The CPU `ovsd3 quantize` chose the folder's formats for (--target-cpu), what it chose per component and why,
    # and the CPU plugin options those formats need at compile time: see CPU_TARGET_FIELDS
    cpu_target: dict | None = None

    def save(self, folder: Path) -> None:
        data = asdict(self)
        for newer in ("controlnets", "cpu_target"):  # left out when unset: ovsd3 0.2.0 refuses unknown fields
            if data[newer] is None:
                del data[newer]
        (Path(folder) / OVSD3_RECORD).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "FolderRecord | None":
        from ovsd3.errors import OvsdError

        path = Path(folder) / OVSD3_RECORD
        if not path.exists():
            return None
        data = read_json(path)
        try:
            check_known(path, data, RECORD_FIELDS)
            check_fields(path, data, RECORD_FIELDS)
            defaults = data.get("defaults", {})
            check_known(path, defaults, defaults_fields(), "defaults.")
            check_fields(path, defaults, defaults_fields(), "defaults.")
            if data.get("cpu_target") is not None:
                check_cpu_target(path, data["cpu_target"])
        except OvsdError as error:
            raise OvsdError(f"{path} is not an ovsd3 record: {str(error).removeprefix(f'{path}: ')}; delete it to "
                            "use the folder without ovsd3's defaults") from None
        return cls(**{**data, "defaults": GenerationDefaults(**defaults)})


RECORD_FIELDS = (
    Field("source", "text", required=True), Field("weight_format", "text", required=True),
    Field("has_t5", "bool", required=True), Field("flash_lora", "text", nullable=True),
    Field("defaults", "object"), Field("parity", "object"), Field("ovsd3_version", "text"),
    Field("quantization", "object", nullable=True), Field("demo", "text", nullable=True),
    Field("controlnets", "object", nullable=True), Field("cpu_target", "object", nullable=True))

CPU_ISA_LEVELS = ("avx2", "avx512", "vnni", "amx")  # what --target-cpu names; "this" is resolved to one of them
CPU_TARGET_FIELDS = (
    Field("target", "text", required=True, choices=("this", *CPU_ISA_LEVELS)),
    Field("isa", "text", required=True, choices=CPU_ISA_LEVELS), Field("cpu", "text"),
    Field("transformer", "text", required=True), Field("vae_decoder", "text", required=True),
    Field("runtime", "object"), Field("why", "text"), Field("measured", "object"))
# CPU plugin options a folder may ask for per component (cpu_target.runtime.<component>.<option>), and their
# bounds: a record must not pass OpenVINO anything else.
CPU_RUNTIME_FIELDS = (Field("DYNAMIC_QUANTIZATION_GROUP_SIZE", "int", low=0, high=1 << 20),)


def check_cpu_target(path: Path, target: dict) -> None:
    """A one-line OvsdError for a cpu_target record that names unknown fields, components or options."""
    from ovsd3.errors import OvsdError

    check_known(path, target, CPU_TARGET_FIELDS, "cpu_target.")
    check_fields(path, target, CPU_TARGET_FIELDS, "cpu_target.")
    for component, options in target.get("runtime", {}).items():
        if component not in MODEL_COMPONENTS:
            raise OvsdError(f"{path}: cpu_target.runtime.{component} is not a component "
                            f"(known: {', '.join(MODEL_COMPONENTS)})")
        if not isinstance(options, dict):
            raise OvsdError(f"{path}: cpu_target.runtime.{component} must be a JSON object")
        check_known(path, options, CPU_RUNTIME_FIELDS, f"cpu_target.runtime.{component}.")
        check_fields(path, options, CPU_RUNTIME_FIELDS, f"cpu_target.runtime.{component}.")


def cpu_runtime_options(record: "FolderRecord | None", component: str) -> dict:
    """The CPU plugin options ``component`` of a folder with ``record`` is compiled with (checked at load)."""
    if record is None or not record.cpu_target:
        return {}
    return dict(record.cpu_target.get("runtime", {}).get(component, {}))


def source_name(folder: Path) -> str:
    """The model a folder was made from, as its model index records it (optimum-intel and ovsd3 write the hub
    id or source path there), else the folder's own name."""
    index = Path(folder) / MODEL_INDEX
    name = read_json(index).get("_name_or_path") if index.exists() else None
    return name if isinstance(name, str) and name else Path(folder).name


def controlnet_component(index: int) -> str:
    """The folder of the ``index``-th ControlNet (0-based): controlnet, controlnet_1, controlnet_2, ..."""
    return CONTROLNET if index == 0 else f"{CONTROLNET}_{index}"


def controlnet_components(folder: Path) -> tuple[str, ...]:
    """The ControlNet folders a model folder holds, in order (counting stops at the first one missing)."""
    found = []
    while len(found) < MAX_CONTROLNETS and (Path(folder) / controlnet_component(len(found))).is_dir():
        found.append(controlnet_component(len(found)))
    return tuple(found)


def model_xml(folder: Path, component: str) -> Path:
    return Path(folder) / component / MODEL_XML


def ir_bytes(folder: Path, component: str) -> int:
    """Bytes of a component's IR (xml + bin) on disk; 0 when the folder has no such component."""
    xml = model_xml(folder, component)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size if xml.exists() else 0


def weight_bytes(folder: Path) -> int:
    """Bytes of every model IR in the folder: what loading all of it costs, about, once compiled."""
    return sum(ir_bytes(folder, component) for component in (*MODEL_COMPONENTS, *controlnet_components(folder)))


REQUIRED_COMPONENTS = (TRANSFORMER, CLIP_L, CLIP_G, VAE_DECODER)

# Sizes beyond any SD3 model by far (SD3.5 Large: 38 blocks, a 192-patch embedding, 4096-wide text): values
# past them are damage, and some would size arrays (joint_attention_dim the no-T5 zeros, num_train_timesteps
# the schedule) before anything else failed.
MAX_WIDTH = 65536
MAX_LATENT_SIDE = 1024
TRANSFORMER_FIELDS = (
    Field("joint_attention_dim", "int", 1, MAX_WIDTH, required=True),
    Field("pooled_projection_dim", "int", 1, MAX_WIDTH, required=True),
    Field("in_channels", "int", 1, 1024), Field("patch_size", "int", 1, 64),
    Field("sample_size", "int", 1, MAX_LATENT_SIDE),
    Field("pos_embed_max_size", "int", 1, MAX_LATENT_SIDE, nullable=True),
    Field("num_layers", "int", 1, MAX_BLOCKS), Field("dual_attention_layers", "ints", 0, MAX_BLOCKS - 1, nullable=True),
    Field("qk_norm", "text", nullable=True))
CONTROLNET_FIELDS = (
    Field("_class_name", "text", choices=("SD3ControlNetModel",), required=True),
    Field("in_channels", "int", 1, 1024), Field("patch_size", "int", 1, 64),
    Field("num_layers", "int", 1, MAX_BLOCKS, required=True),
    Field("num_attention_heads", "int", 1, 1024, required=True), Field("attention_head_dim", "int", 1, 4096, required=True),
    Field("joint_attention_dim", "int", 1, MAX_WIDTH, nullable=True),
    Field("pooled_projection_dim", "int", 1, MAX_WIDTH, required=True),
    Field("extra_conditioning_channels", "int", 0, 1024), Field("use_pos_embed", "bool"),
    Field("force_zeros_for_pooled_projection", "bool"))
VAE_FIELDS = (
    Field("block_out_channels", "ints", 1, MAX_WIDTH),
    # decoding divides by the scaling factor: zero, NaN or a huge one makes NaN or black images
    Field("scaling_factor", "number", high=1000, above=0), Field("shift_factor", "number", -1000, 1000))
SCHEDULER_FIELDS = (
    Field("_class_name", "text"), Field("shift", "number", high=1000, above=0),
    Field("num_train_timesteps", "int", 1, 100_000), Field("stochastic_sampling", "bool"),
    *(Field(name, "bool", nullable=True) for name in ("use_dynamic_shifting", "use_karras_sigmas",
                                                      "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")),
    Field("shift_terminal", "number", nullable=True))


def read_config(path: Path, fields: tuple[Field, ...]) -> dict:
    """A component's config.json with the fields the runtime reads checked."""
    config = read_json(path)
    check_fields(path, config, fields)
    return config


def read_controlnet_config(folder: Path, component: str, transformer_config: dict) -> dict:
    """A ControlNet's config.json, checked, and checked to fit the folder's transformer: the same latent channels
    and patch size, and residuals as wide as the transformer's image tokens."""
    from ovsd3.errors import OvsdError

    path = Path(folder) / component / "config.json"
    config = read_config(path, CONTROLNET_FIELDS)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    expected = transformer_config.get("num_attention_heads", 0) * transformer_config.get("attention_head_dim", 0)
    for name, value, wanted in (("in_channels", config.get("in_channels", 16), transformer_config.get("in_channels", 16)),
                                ("patch_size", config.get("patch_size", 2), transformer_config.get("patch_size", 2)),
                                ("num_attention_heads x attention_head_dim", width, expected or width)):
        if value != wanted:
            raise OvsdError(f"{path}: {name} is {value}, but the transformer's is {wanted}: this ControlNet is for "
                            f"another model")
    return config


def check_scheduler_config(path: Path, config: dict) -> None:
    check_fields(path, config, SCHEDULER_FIELDS)


def check_vae_blocks(path: Path, config: dict) -> None:
    """The VAE's downsampling is 2 per block after the first: an empty list (or dozens) is damage."""
    from ovsd3.errors import OvsdError

    blocks = config.get("block_out_channels")
    if blocks is not None and not 1 <= len(blocks) <= 8:
        raise OvsdError(f"{path}: block_out_channels must list 1 to 8 blocks (got {len(blocks)})")


def read_json(path: Path) -> dict:
    from ovsd3.errors import OvsdError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OvsdError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    if not isinstance(data, dict):
        raise OvsdError(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data


@dataclass(frozen=True)
class ModelFolder:
    """An OpenVINO SD3 folder (ovsd3's or optimum-intel's), checked and read once: what the runtime, quantize,
    report and serve need to know about it before compiling anything."""

    path: Path
    transformer_config: dict
    vae_config: dict
    scheduler_config: dict
    record: FolderRecord
    controlnet_configs: tuple[dict, ...] = ()  # controlnet/, controlnet_1/, ... in order

    @classmethod
    def open(cls, folder: str | Path) -> "ModelFolder":
        """A one-line OvsdError unless ``folder`` is an SD3 OpenVINO folder whose files hold what the runtime
        reads from them, of the right types and within bounds (the error names the file and the field)."""
        folder = Path(folder)
        check_folder(folder)
        scheduler = read_json(folder / SCHEDULER_CONFIG) if (folder / SCHEDULER_CONFIG).exists() else {}
        check_scheduler_config(folder / SCHEDULER_CONFIG, scheduler)
        transformer_config = read_config(folder / TRANSFORMER / "config.json", TRANSFORMER_FIELDS)
        vae_config = read_config(folder / VAE_DECODER / "config.json", VAE_FIELDS)
        check_vae_blocks(folder / VAE_DECODER / "config.json", vae_config)
        record = FolderRecord.load(folder) or FolderRecord(
            source=str(folder), weight_format="unknown", has_t5=model_xml(folder, T5).exists(),
            # an optimum-intel folder: its scheduler says whether it samples the Flash way, its model
            # index which model it came from
            defaults=FLASH_DEFAULTS if scheduler.get("stochastic_sampling") else
            model_card_defaults(source_name(folder), transformer_config))
        controlnets = tuple(read_controlnet_config(folder, name, transformer_config)
                            for name in controlnet_components(folder))
        model = cls(folder, transformer_config, vae_config, scheduler, record, controlnets)
        model._check_record()
        return model

    def _check_record(self) -> None:
        """What ovsd3.json says agrees with the folder: its T5, the blocks its skip-layer default names."""
        from ovsd3.errors import OvsdError

        path = self.path / OVSD3_RECORD
        if self.record.has_t5 and not model_xml(self.path, T5).exists():
            raise OvsdError(f"{path} says the folder has T5 (has_t5), but {model_xml(self.path, T5)} is missing")
        layers = self.record.defaults.skip_guidance_layers
        if layers and self.block_count and max(layers) >= self.block_count:
            raise OvsdError(f"{path}: defaults.skip_guidance_layers {list(layers)} are outside the transformer's "
                            f"blocks 0-{self.block_count - 1}")

    def check_defaults_within(self, max_steps: int, max_guidance: float, server: str) -> None:
        """The folder's defaults within a server's own limits (``ovsd3 serve`` and OVMS allow fewer steps than
        `ovsd3 run`): a request that names no step count must not get more than one that names them."""
        from ovsd3.errors import OvsdError

        defaults, source = self.record.defaults, self.path / OVSD3_RECORD
        if defaults.num_inference_steps > max_steps:
            raise OvsdError(f"{source}: defaults.num_inference_steps {defaults.num_inference_steps} is above "
                            f"{server}'s maximum of {max_steps}")
        if defaults.guidance_scale > max_guidance:
            raise OvsdError(f"{source}: defaults.guidance_scale {defaults.guidance_scale:g} is above {server}'s "
                            f"maximum of {max_guidance:g}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def native_size(self) -> int:
        """The image size the model was made for (transformer sample_size x the VAE's downsampling)."""
        return int(self.transformer_config.get("sample_size", 128)) * self.vae_scale_factor

    @property
    def max_size(self) -> int | None:
        """The largest side it can draw: the learned position embedding covers pos_embed_max_size patches a side
        (None when the config does not say)."""
        patches = int(self.transformer_config.get("pos_embed_max_size") or 0)
        return patches * self.patch_size * self.vae_scale_factor or None

    @property
    def block_count(self) -> int:
        """The transformer's blocks (``num_layers``; 0 when the config does not say)."""
        return int(self.transformer_config.get("num_layers", 0))

    @property
    def has_t5(self) -> bool:
        return model_xml(self.path, T5).exists() and (self.path / TOKENIZER_OF[T5]).exists()

    def has(self, component: str) -> bool:
        return model_xml(self.path, component).exists()


REPORT_JSON, BENCHMARK_JSON, OVMS_CONFIG = "report.json", "benchmark.json", "config.json"
OVMS_GRAPH = "graph.pbtxt"

# What each command writes in its output folder, as patterns of relative paths ("*" within one name only).
# `--overwrite` replaces a folder only when every file in it matches: anything else is the user's.
_TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
                    "openvino_detokenizer.bin", "*.json", "merges.txt", "vocab.txt", "*.model", "*.jinja")
MODEL_FOLDER_FILES = (
    MODEL_INDEX, OVSD3_RECORD, SCHEDULER_CONFIG,
    *(f"{component}/{name}" for component in MODEL_COMPONENTS for name in ("config.json", MODEL_XML, MODEL_BIN)),
    *(f"{tokenizer}/{name}" for tokenizer in TOKENIZER_OF.values() for name in _TOKENIZER_FILES),
    *(f"{CONTROLNET}{suffix}/{name}" for suffix in ("", "_*") for name in ("config.json", MODEL_XML, MODEL_BIN)),
)
OUTPUT_FILES = {
    "convert": MODEL_FOLDER_FILES,
    "quantize": MODEL_FOLDER_FILES,  # and what the source folder holds besides, which quantize copies
    "report": (REPORT_JSON, "report.md", "grid.png", "chart.png", "images/*/*.png"),
    "benchmark": (BENCHMARK_JSON, "benchmark.md", "benchmark.png", "images/*.png"),
    "ovms-config": (OVMS_CONFIG, f"*/{OVMS_GRAPH}"),
    "calibration": ("plan.json", "prompt_*.npz", ".prompt_*.tmp.npz"),  # quantize's --calib-cache
}
COMMAND_LINES = {"ovms-config": "ovsd3 serve --write-ovms-config"}


def output_files(command: str) -> tuple[str, ...]:
    """The patterns of what ``command`` writes in its output folder (see OUTPUT_FILES)."""
    return OUTPUT_FILES.get(command, ())


def command_line(command: str) -> str:
    """How the user types ``command``: "ovsd3 report", "ovsd3 serve --write-ovms-config"."""
    return COMMAND_LINES.get(command, f"ovsd3 {command}")


def _matches(parts: tuple[str, ...], pattern: str, whole: bool) -> bool:
    from fnmatch import fnmatchcase

    names = pattern.split("/")
    if len(parts) > len(names) or (whole and len(parts) != len(names)):
        return False
    return all(fnmatchcase(part, name) for part, name in zip(parts, names))


def unexpected_file(folder: Path, patterns: tuple[str, ...]) -> str | None:
    """The first path (relative, sorted) under ``folder`` that none of ``patterns`` accounts for: a file that no
    pattern matches, a folder that leads to none, a link or anything that is not a plain file; None when the
    folder holds only what the patterns describe."""
    import os

    folder = Path(folder)
    for root, folders, files in os.walk(folder):
        folders.sort()
        here = Path(root).relative_to(folder).parts
        for name in sorted(files + folders):
            path, parts = Path(root) / name, (*here, name)
            is_folder = path.is_dir() and not path.is_symlink()
            plain = is_folder or (path.is_file() and not path.is_symlink())
            if not plain or not any(_matches(parts, pattern, whole=not is_folder) for pattern in patterns):
                return "/".join(parts) + ("/" + _first_file(path) if is_folder else "")
    return None


def _first_file(folder: Path) -> str:
    """The first file under ``folder``, relative (what names a stray folder best), or "" for an empty one."""
    files = sorted(path for path in folder.rglob("*") if not path.is_dir() or path.is_symlink())
    return files[0].relative_to(folder).as_posix() if files else ""


def _ovms_config(data) -> bool:
    """An OVMS config as `serve --write-ovms-config` writes it: model_config_list entries naming their models."""
    entries = data.get("model_config_list") if isinstance(data, dict) else None
    return isinstance(entries, list) and bool(entries) and all(
        isinstance(entry, dict) and isinstance(entry.get("config"), dict)
        and isinstance(entry["config"].get("name"), str) for entry in entries)


def made_by(folder: Path) -> str | None:
    """Which ovsd3 command wrote ``folder`` ("convert", "quantize", "report", "benchmark", "ovms-config"), by the
    file each leaves behind; None for anything else (a model or folder the user brought). `--overwrite` replaces
    only a folder that the same command made, and only when it holds nothing else (:func:`unexpected_file`)."""
    folder = Path(folder)
    try:
        if (folder / OVSD3_RECORD).is_file():
            record = json.loads((folder / OVSD3_RECORD).read_text())
            return "quantize" if isinstance(record, dict) and record.get("quantization") else "convert"
        for command, marker in (("report", REPORT_JSON), ("benchmark", BENCHMARK_JSON)):
            if (folder / marker).is_file():
                return command
        if (folder / OVMS_CONFIG).is_file() and _ovms_config(json.loads((folder / OVMS_CONFIG).read_text())):
            return "ovms-config"
    except (OSError, ValueError, TypeError):
        return None
    return None


def check_folder(folder: Path) -> None:
    """A one-line error unless ``folder`` is an SD3 OpenVINO folder (ovsd3 or optimum-intel) with every IR
    whole and T5 either complete or absent."""
    from ovsd3.errors import OvsdError

    if not folder.is_dir():
        raise OvsdError(f"model folder {folder} does not exist")
    if not (folder / MODEL_INDEX).exists():
        raise OvsdError(f"{folder} is not an OpenVINO SD3 folder (no {MODEL_INDEX})")
    index = read_json(folder / MODEL_INDEX)
    check_fields(folder / MODEL_INDEX, index, (Field("_class_name", "text"),))
    class_name = index.get("_class_name", "?")
    if not class_name.startswith("StableDiffusion3"):
        raise OvsdError(f"{folder} holds a {class_name}, not Stable Diffusion 3")
    if any((folder / TRANSFORMER).glob("diffusion_pytorch_model*")):
        raise OvsdError(f"{folder} holds a PyTorch (diffusers) model, not OpenVINO IR: convert it first "
                        f"(ovsd3 convert {folder} OUT)")
    for component in REQUIRED_COMPONENTS:
        if not model_xml(folder, component).exists():
            raise OvsdError(f"{folder} is missing component {component!r} ({model_xml(folder, component)})")
    for tokenizer in (TOKENIZER_OF[CLIP_L], TOKENIZER_OF[CLIP_G]):
        if not (folder / tokenizer / TOKENIZER_XML).exists():
            raise OvsdError(f"{folder} is missing its OpenVINO {tokenizer} ({tokenizer}/{TOKENIZER_XML})")
    check_t5_pair(folder, index)
    check_controlnets(folder)
    for xml in (*(model_xml(folder, name) for name in (*MODEL_COMPONENTS, *controlnet_components(folder))),
                *(folder / name / TOKENIZER_XML for name in TOKENIZER_OF.values())):
        if xml.exists():
            check_ir(xml)


def check_t5_pair(folder: Path, index: dict) -> None:
    """T5 needs its encoder and its tokenizer: with only one, the prompt would silently lose T5 (and
    openvino.genai refuses such a folder: it reads tokenizer_3 beside text_encoder_3). A tokenizer alone is
    damage only where the model index lists a T5 encoder."""
    from ovsd3.errors import OvsdError

    encoder, tokenizer = model_xml(folder, T5), folder / TOKENIZER_OF[T5] / TOKENIZER_XML
    if encoder.exists() and not tokenizer.exists():
        raise OvsdError(f"{folder} has {T5} but no {TOKENIZER_OF[T5]} ({tokenizer} is missing): T5 cannot read "
                        f"prompts without it; copy it back, or delete {T5} to run without T5")
    listed = index.get(T5)
    if tokenizer.exists() and not encoder.exists() and isinstance(listed, list) and any(listed):
        raise OvsdError(f"{folder} has {TOKENIZER_OF[T5]} and its {MODEL_INDEX} lists {T5}, but {encoder} is "
                        f"missing: copy it back, or convert again without T5")


def check_controlnets(folder: Path) -> None:
    """Each ControlNet folder holds its IR and config, and they are numbered without a gap (a controlnet_2 with
    no controlnet_1 would be silently left out)."""
    from ovsd3.errors import OvsdError

    present = controlnet_components(folder)
    for component in present:
        for name in (MODEL_XML, "config.json"):
            if not (folder / component / name).is_file():
                raise OvsdError(f"{folder} has a ControlNet folder {component}/ without {name}")
    stray = sorted(path.name for path in folder.glob(f"{CONTROLNET}_*") if path.name not in present)
    if stray:
        raise OvsdError(f"{folder}: {stray[0]}/ follows no {controlnet_component(len(present))}/ (ControlNets are "
                        f"numbered controlnet, controlnet_1, ... without a gap)")


_CONSTANT = re.compile(rb"<data\b[^>]*?\boffset=\"(\d+)\"[^>]*?\bsize=\"(\d+)\"")


def check_ir(xml: Path) -> None:
    """An OpenVINO IR read whole: its .xml complete and its .bin holding every constant the .xml points at
    (a copy cut short fails here in one line, not minutes later inside OpenVINO, or as a missing file)."""
    from ovsd3.errors import OvsdError

    try:
        text = xml.read_bytes()
    except OSError as error:
        raise OvsdError(f"cannot read {xml}: {error.strerror}") from None
    if not text.rstrip().endswith(b"</net>"):
        raise OvsdError(f"{xml} is not a whole OpenVINO IR (it does not end with </net>): copy it again")
    needed = max((int(offset) + int(size) for offset, size in _CONSTANT.findall(text)), default=0)
    weights = xml.with_suffix(".bin")
    if needed and not weights.is_file():
        raise OvsdError(f"{weights} is missing (its {xml.name} reads {needed} bytes from it): copy it again")
    if needed and weights.stat().st_size < needed:
        raise OvsdError(f"{weights} is truncated: {weights.stat().st_size} bytes where {xml.name} reads "
                        f"{needed}; copy it again")
