"""Which OpenVINO device runs which component, and compiling them (model cache, static shapes)."""

from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ovsd3 import layout
from ovsd3.errors import OvsdError, reason_of
from ovsd3.memory import release_freed, trimmed_mappings

# Names a user may give in a per-component device plan, and the components each one covers.
COMPONENT_GROUPS = {
    "transformer": (layout.TRANSFORMER,),
    "text": (layout.CLIP_L, layout.CLIP_G, layout.T5),
    "text_encoder": (layout.CLIP_L,),
    "text_encoder_2": (layout.CLIP_G,),
    "text_encoder_3": (layout.T5,),
    "vae": (layout.VAE_DECODER, layout.VAE_ENCODER),
    "vae_decoder": (layout.VAE_DECODER,),
    "vae_encoder": (layout.VAE_ENCODER,),
}
_VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ovsd3" / "model_cache"


@dataclass(frozen=True)
class DevicePlan:
    """``AUTO``, ``GPU``, ... for everything, or per component: ``transformer=GPU,text=CPU,vae=GPU``."""

    default: str = "AUTO"
    overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "DevicePlan":
        spec = spec.strip()
        if "=" not in spec:
            return cls(default=spec.upper())
        default, overrides = "AUTO", {}
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            name, _, device = part.partition("=")
            name, device = name.strip(), device.strip().upper()
            if not device:
                raise OvsdError(f"device plan {spec!r}: {part!r} names no device")
            if name in ("default", "*"):
                default = device
            elif name in COMPONENT_GROUPS:
                overrides.update({component: device for component in COMPONENT_GROUPS[name]})
            else:
                raise OvsdError(f"device plan {spec!r}: unknown component {name!r} "
                                f"(use {', '.join(COMPONENT_GROUPS)} or default)")
        return cls(default=default, overrides=overrides)

    def device_for(self, component: str) -> str:
        return self.overrides.get(component, self.default)

    def devices(self) -> set[str]:
        return {self.default, *self.overrides.values()}


def check_available(core, plan: DevicePlan) -> None:
    """Refuse devices this machine does not have, before compiling anything."""
    available = core.available_devices
    families = {re.sub(r"\.\d+$", "", device) for device in available}
    for device in plan.devices():
        base, _, inner = device.partition(":")
        names = [base] if base not in _VIRTUAL_DEVICES else [name.strip() for name in inner.split(",") if name]
        for name in names:
            if name not in available and name not in families:
                raise OvsdError(f"device {name} is not available here (available: {', '.join(available)}; "
                                f"or AUTO)")


def reshape_inputs(model, shapes: dict) -> None:
    """Fix ``model``'s inputs to ``shapes`` (input name -> shape); names the model lacks are left out."""
    names = {name for port in model.inputs for name in port.get_names()}
    model.reshape({name: shape for name, shape in shapes.items() if name in names})


class TrimmedFirstCalls:
    """A compiled model whose first call at each set of input shapes runs with the weight mappings trimmed
    (:mod:`ovsd3.memory`): that is when the CPU plugin repacks the weights it read from the mapped IR, which
    would otherwise stay resident beside the repacked copy. Everything else is the compiled model's own."""

    def __init__(self, compiled, fixed_inputs: dict | None = None):
        self.compiled = compiled
        self._seen: set[tuple] = set()  # (request, input shapes) already run
        # The compiler's inputs that no caller gives (LoRA branch scales): fed from its mapping, read at each call
        names = {name for port in compiled.inputs for name in port.get_names()}
        self._fixed_names = sorted(names & set(fixed_inputs or ()))
        self._fixed_inputs = fixed_inputs

    def __call__(self, inputs):
        return self.run(None, inputs)

    def run(self, request, inputs):
        """One inference on ``request`` (an infer request of this model; None: the model's built-in one)."""
        if self._fixed_names and isinstance(inputs, dict):
            fixed = self._fixed_inputs
            inputs = {**{name: fixed[name] for name in self._fixed_names if name in fixed}, **inputs}
        infer = self.compiled if request is None else lambda feed: request.infer(feed, share_inputs=True)
        shapes = tuple((str(name), tuple(getattr(value, "shape", ()))) for name, value in inputs.items()) \
            if isinstance(inputs, dict) else None
        if (id(request), shapes) in self._seen:
            return infer(inputs)
        with trimmed_mappings():
            result = infer(inputs)
        self._seen.add((id(request), shapes))
        return result

    def __getattr__(self, name):
        return getattr(self.compiled, name)


class InferRequests:
    """One caller's infer requests: one per compiled model it runs, made at its first call.

    ``compiled(inputs)`` runs on the compiled model's single built-in request, which two threads must not use
    at once. Clones of a pipeline (``SD3Pipeline.clone``) share their compiled models, so one copy of the
    weights, and each runs them on requests of its own: OpenVINO runs requests of one compiled model at once."""

    def __init__(self):
        # compiled model -> this caller's request; weak, so that a released model (offload) takes its request
        self._own = weakref.WeakKeyDictionary()

    def request_of(self, compiled):
        """This caller's infer request for ``compiled`` (a model, or the OnUse holding one)."""
        compiled = compiled.get() if isinstance(compiled, OnUse) else compiled
        request = self._own.get(compiled)
        if request is None:
            request = self._own[compiled] = compiled.create_infer_request()
        return request

    def __call__(self, compiled, inputs):
        """``compiled(inputs)`` on this caller's request: the same OVDict of copied outputs."""
        if isinstance(compiled, ShapeSpecialised):  # model offload: compiled for these shapes first
            compiled = compiled.for_shapes(inputs)
        compiled = compiled.get() if isinstance(compiled, OnUse) else compiled
        request = self.request_of(compiled)
        if isinstance(compiled, TrimmedFirstCalls):
            return compiled.run(request, inputs)
        return request.infer(inputs, share_inputs=True)  # as CompiledModel.__call__ does


class OnUse:
    """A component compiled when first used (or at once, ``compile_now``); ``release`` drops it, for model
    offload, and the next use compiles it again. Calls and attributes are the compiled model's."""

    def __init__(self, compile: Callable[[], object], compile_now: bool = True):
        self._compile = compile
        self._compiled = compile() if compile_now else None

    def get(self):
        if self._compiled is None:
            self._compiled = self._compile()
        return self._compiled

    def release(self) -> None:
        self._compiled = None

    def __call__(self, inputs):
        return self.get()(inputs)

    def __getattr__(self, name):
        return getattr(self.get(), name)


class ShapeSpecialised:
    """A model compiled for the exact shapes of the inputs it is called with, again when they are new.
    OpenVINO's CPU plugin plans activation memory ahead only for static shapes: SD3.5 Medium's transformer at
    1024x1024, batch 2, holds 9.2 GiB compiled with dynamic shapes and 4.7 GiB (its weights) compiled for the
    call's own, and its first call is 30% faster; and with dynamic shapes each CPU stream builds its own share
    (SD3 Medium INT8, two streams: 14.4 GiB dynamic, 4.7 GiB static; benchmarks/stream_memory.py). Used by model
    offload (compiled per generation anyway) and by pipelines that serve several calls at once; shared by the
    clones of a pipeline, so it is thread-safe, and it keeps the last ``keep`` shapes' compilations (a server's
    few sizes do not recompile in turn; an older one is released first)."""

    def __init__(self, compiler: "ModelCompiler", component: str, model_of: Callable[[], object], keep: int = 1):
        self._compiler, self._component, self._model_of, self._keep = compiler, component, model_of, keep
        self._by_shapes: dict[str, object] = {}  # oldest first
        self._compiled = None  # the newest
        self._lock = threading.Lock()

    def __call__(self, inputs: dict):
        return self.for_shapes(inputs)(inputs)

    def for_shapes(self, inputs: dict):
        """The model compiled for ``inputs``' shapes (compiled now if they are new)."""
        key = repr(sorted((name, list(value.shape)) for name, value in inputs.items()))
        with self._lock:  # one compilation at a time, and none twice
            compiled = self._by_shapes.pop(key, None)
            if compiled is None:
                while len(self._by_shapes) >= self._keep:  # a caller drawing at an older shape keeps its own
                    self._by_shapes.pop(next(iter(self._by_shapes)))
                self._compiled = None
                release_freed()
                model = self._model_of()
                reshape_inputs(model, {name: list(value.shape) for name, value in inputs.items()})
                compiled = self._compiler.compile_derived(self._component, model)
            self._by_shapes[key] = self._compiled = compiled
            return compiled

    def __getattr__(self, name):
        if self._compiled is None:
            raise AttributeError(f"{name}: {self._component} is compiled at its first call (shape-specialised)")
        return getattr(self._compiled, name)


@dataclass(frozen=True)
class CompileOptions:
    plan: DevicePlan = field(default_factory=DevicePlan)
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: no model cache
    precision: str | None = None  # "f32" forces full precision; None lets the device choose (bf16 on CPUs that have it)
    # Calls that run at once (a pipeline and its clones, one per serving worker). Above 1 the models are compiled
    # with OpenVINO's THROUGHPUT hint for that many requests: the device splits into streams that share the
    # cores (on the CPU at most one per core, each with cores / streams threads) rather than every call taking
    # all of them and the calls oversubscribing the cores.
    concurrency: int = 1


class ModelCompiler:
    """Compiles the folder's models with one OpenVINO Core, its model cache and the device plan."""

    def __init__(self, folder: Path, options: CompileOptions):
        import openvino as ov
        import openvino_tokenizers  # noqa: F401  (registers the tokenizer operations with OpenVINO)

        self.folder = Path(folder)
        self.options = options
        self.core = ov.Core()
        self._edits: dict[str, Callable] = {}
        self._originals: dict[str, object] = {}  # IRs read once for edits
        self.record = layout.FolderRecord.load(self.folder)  # its cpu_target's runtime options apply on the CPU
        # Inputs that edits add to a model (LoRA branch scales: name -> value), fed to every call of a model
        # compiled here that has them; a new value takes effect at the next call, without a compile.
        self.fixed_inputs: dict[str, object] = {}
        check_available(self.core, options.plan)
        if options.cache_dir is not None:
            self._use_cache(options.cache_dir)

    def _use_cache(self, cache_dir: Path) -> None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OvsdError(f"cannot create the model cache {cache_dir}: {error.strerror} (choose another with "
                            "--cache-dir, or pass --no-cache)") from None
        if not os.access(cache_dir, os.W_OK | os.X_OK):
            raise OvsdError(f"the model cache {cache_dir} is not writable (choose another with --cache-dir, or "
                            "pass --no-cache)")
        self.core.set_property({"CACHE_DIR": str(cache_dir)})

    def _config(self, device: str, component: str | None = None) -> dict:
        concurrency = self.options.concurrency
        config = {"PERFORMANCE_HINT": "LATENCY"} if concurrency == 1 else \
            {"PERFORMANCE_HINT": "THROUGHPUT", "PERFORMANCE_HINT_NUM_REQUESTS": concurrency}
        if self.options.precision:
            config["INFERENCE_PRECISION_HINT"] = self.options.precision
        cpu_options = layout.cpu_runtime_options(self.record, component) if component else {}
        if cpu_options and device == "CPU":
            config.update(cpu_options)
        elif cpu_options and device.partition(":")[0] in _VIRTUAL_DEVICES:  # for the CPU among its devices
            config["DEVICE_PROPERTIES"] = {"CPU": cpu_options}
        return config

    def edit(self, component: str, change: Callable | None) -> None:
        """Apply ``change(model)`` to ``component``'s IR whenever it is read or compiled from now on (LoRA
        adapters); None removes it. The folder's IR is then read once and kept, so a new change does not read
        the folder again."""
        if change is None:
            self._edits.pop(component, None)
        else:
            self._edits[component] = change

    def _compiled(self, model, device: str, component: str) -> TrimmedFirstCalls:
        # With static shapes the CPU plugin repacks the weights while compiling, not in the first call.
        with trimmed_mappings():
            return TrimmedFirstCalls(self.core.compile_model(model, device, self._config(device, component)),
                                     self.fixed_inputs)

    def compile(self, component: str, static_shapes: dict | None = None):
        """Compile ``component``; ``static_shapes`` (input name -> shape) fixes every dimension first."""
        xml = layout.model_xml(self.folder, component)
        device = self.options.plan.device_for(component)
        try:
            if static_shapes is None and component not in self._edits:
                return self._compiled(xml, device, component)
            model = self.read(component)
            if static_shapes is not None:
                reshape_inputs(model, static_shapes)
            return self._compiled(model, device, component)
        except RuntimeError as error:
            raise OvsdError(f"cannot compile {component} for {device}: {reason_of(error)}") from None

    def read(self, component: str):
        """The component's IR as an ``ov.Model`` (with its edit applied), to derive variants from."""
        try:
            if component not in self._edits:
                return self.core.read_model(layout.model_xml(self.folder, component))
            if component not in self._originals:
                self._originals[component] = self.core.read_model(layout.model_xml(self.folder, component))
            model = self._originals[component].clone()
        except RuntimeError as error:
            raise OvsdError(f"cannot read {component}: {reason_of(error)}") from None
        self._edits[component](model)
        return model

    def compile_derived(self, component: str, model):
        """Compile a model derived from ``component``'s IR on that component's device."""
        device = self.options.plan.device_for(component)
        try:
            return self._compiled(model, device, component)
        except RuntimeError as error:
            raise OvsdError(f"cannot compile a variant of {component} for {device}: {reason_of(error)}") from None

    def compile_tokenizer(self, tokenizer_folder: str):
        """(compiled tokenizer, its model). Tokenizers are string processing: always on the CPU."""
        try:
            model = self.core.read_model(self.folder / tokenizer_folder / layout.TOKENIZER_XML)
            return self.core.compile_model(model, "CPU"), model
        except RuntimeError as error:
            raise OvsdError(f"cannot read {tokenizer_folder}: {reason_of(error)}") from None
