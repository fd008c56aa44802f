"""The compiled SD3 transformer behind a small wrapper, the one place every transformer call goes through.

It checks the inputs, times the calls, lets observers watch each call (calibration, the quality gate), and
derives from the folder's IR the variants that save work:

- Exact: where the T5 part of the text is all zeros (a folder without T5; the demo model's silenced T5), the
  transformer runs on 77 + 1 text tokens with an attention bias instead of 77 + 256
  (``ovsd3/runtime/text_collapse.py``): the same output for about a quarter less work at 512x512. A folder
  without T5 compiles only that variant; a folder with T5 compiles it the first time a call qualifies.
- Step caching: the first block alone and the rest of the blocks (first-block cache), compiled only when a
  call first asks for them.
- Skip-layer guidance: the transformer with some blocks skipped (``ovsd3/ir/skip_blocks.py``), compiled the
  first time a request names those blocks.

Observers always see the inputs as the pipeline made them (the full text sequence).
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable

import numpy as np

from ovsd3 import layout
from ovsd3.errors import OvsdError
from ovsd3.ir.attention_bias import ATTENTION_BIAS, add_attention_bias
from ovsd3.runtime.devices import InferRequests, ShapeSpecialised
from ovsd3.runtime.text_collapse import collapse_text

INPUT_NAMES = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
Observer = Callable[[dict, np.ndarray], None]


class SplitTransformer:
    """The transformer as two compiled slices: everything up to and including the first block, and the rest."""

    def __init__(self, compiler, model):
        from ovsd3.ir.slicing import CUT_PREFIX, crossing, cut_name, extract, stages

        stage, self.block_count = stages(model)
        if self.block_count < 2:
            raise OvsdError("first-block-cache needs a transformer with at least 2 blocks")
        tensors = crossing(model, stage, 1)
        # The first block's own outputs (image and text token streams): what the cache compares step to step.
        self.first_block_outputs = [cut_name(1, tensor) for tensor in tensors if stage[tensor[0]] == 0]
        self.head = compiler.compile_derived(layout.TRANSFORMER, extract(model, stage, None, 1))
        self.rest = compiler.compile_derived(layout.TRANSFORMER, extract(model, stage, 1, None))
        # One name per input: a transformer that ovsd3 quantize stitched from slices keeps older cut names
        # on the same tensors, which the head does not produce.
        self.rest_inputs = [next(name for name in sorted(port.get_names()) if name.startswith(f"{CUT_PREFIX}1:")
                                 or name in (*INPUT_NAMES, ATTENTION_BIAS)) for port in self.rest.inputs]

    def run_head(self, inputs: dict, requests: InferRequests) -> dict:
        result = requests(self.head, inputs)
        return {name: result[port] for port in self.head.outputs for name in port.get_names()}

    def signal(self, head_outputs: dict) -> np.ndarray:
        return np.concatenate([head_outputs[name].ravel() for name in self.first_block_outputs])

    def run_rest(self, inputs: dict, head_outputs: dict, requests: InferRequests) -> np.ndarray:
        feed = {name: head_outputs[name] if name in head_outputs else inputs[name] for name in self.rest_inputs}
        return requests(self.rest, feed)[0]


class Variants:
    """The transformer's compiled variants, shared by a pipeline and its clones: each is compiled once, by the
    first clone that needs it, under ``lock`` (the others wait for it rather than compile it again)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.compiled = self.biased = None
        self.split: SplitTransformer | None = None
        self.skipping: dict[tuple[int, ...], object] = {}  # skip-layer guidance variants, by skipped blocks
        self.controlled = None  # the variant taking ControlNet residuals (ovsd3/ir/controlnet.py)


class Transformer:
    def __init__(self, compiler, patch_size: int, has_t5: bool, static_shapes: dict | None = None,
                 compile_now: bool = True, shape_specialised: int = 0, requests: InferRequests | None = None):
        self.compiler = compiler
        self.requests = requests or InferRequests()  # this pipeline's own; the compiled variants are shared
        # Each variant compiled for each call's own shapes (ovsd3.runtime.devices.ShapeSpecialised), keeping
        # the last ``shape_specialised`` shapes' (0: dynamic shapes): about half the memory at 1024x1024, and
        # far less per stream, for a compilation at each new shape. Model offload compiles every generation
        # anyway, and uses it; so do pipelines compiled for several calls at once (serving).
        self.shape_specialised = shape_specialised
        self.patch_size = patch_size
        self.static_shapes = static_shapes
        self.has_t5 = has_t5
        # Static shapes fix the text length, so they keep the full sequence.
        self.collapses = static_shapes is None
        self.observers: list[Observer] = []
        self.seconds = 0.0
        self.calls = 0
        self.release()
        if compile_now:
            self._compile()

    def clone(self, requests: InferRequests) -> "Transformer":
        """The same compiled variants (those compiled later too), run on ``requests``, with counts, timings
        and observers of its own."""
        twin = copy.copy(self)
        twin.requests, twin.observers, twin.seconds, twin.calls = requests, [], 0.0, 0
        return twin

    def _compile(self) -> None:
        variants = self._variants
        with variants.lock:
            if variants.compiled is not None:  # another clone compiled it meanwhile
                return
            if self.collapses and not self.has_t5:  # every call qualifies unless given its own T5 embeddings
                variants.biased = variants.biased or self._variant(self._biased_model)
            if variants.biased is not None:
                variants.compiled = variants.biased
            elif self.shape_specialised:
                variants.compiled = self._variant(lambda: self.compiler.read(layout.TRANSFORMER))
            else:
                variants.compiled = self.compiler.compile(layout.TRANSFORMER, self.static_shapes)

    def _variant(self, model_of: Callable[[], object]):
        """A compiled variant of the transformer (``model_of()`` makes its IR)."""
        if self.shape_specialised:
            return ShapeSpecialised(self.compiler, layout.TRANSFORMER, model_of, keep=self.shape_specialised)
        return self.compiler.compile_derived(layout.TRANSFORMER, model_of())

    def release(self) -> None:
        """Drop every compiled variant (model offload: the next call compiles again); observers and counts stay."""
        self._variants = Variants()

    @property
    def _compiled(self):
        """The main variant if it is compiled, else None (nothing compiles here)."""
        return self._variants.compiled

    @property
    def compiled(self):
        if self._variants.compiled is None:
            self._compile()
        return self._variants.compiled

    def _biased_model(self):
        try:
            return add_attention_bias(self.compiler.read(layout.TRANSFORMER))
        except ValueError as error:
            raise OvsdError(f"cannot use this folder's transformer: {error}") from None

    @property
    def biased(self):
        """The variant with an ``attention_bias`` input, compiled on first use."""
        variants = self._variants
        if variants.biased is None:  # checked again under the lock: a clone may be compiling it
            with variants.lock:
                if variants.biased is None:
                    variants.biased = self._variant(self._biased_model)
        return variants.biased

    def _feed(self, inputs: dict) -> tuple[object, dict]:
        """The compiled model to run and its inputs: the collapsed text where that is exact."""
        if not self.collapses:
            return self.compiled, inputs
        collapse = collapse_text(inputs, self.patch_size)
        if collapse.collapsed or self.compiled is self._variants.biased:
            return self.biased, collapse.biased_inputs()
        return self.compiled, inputs

    def _check(self, inputs: dict) -> None:
        missing = [name for name in INPUT_NAMES if name not in inputs]
        if missing:
            raise OvsdError(f"transformer inputs lack {', '.join(missing)}")
        batch = inputs["hidden_states"].shape[0]
        if any(inputs[name].shape[0] != batch for name in INPUT_NAMES):
            raise OvsdError("transformer inputs disagree on the batch size: "
                            + ", ".join(f"{name} {inputs[name].shape}" for name in INPUT_NAMES))

    def _timed(self, run: Callable, *args):
        started = time.perf_counter()
        out = run(*args)
        self.seconds += time.perf_counter() - started
        return out

    def __call__(self, inputs: dict) -> np.ndarray:
        """One whole call: (hidden_states, timestep, encoder_hidden_states, pooled_projections) -> velocity."""
        self._check(inputs)
        compiled, feed = self._feed(inputs)
        out = self._timed(lambda: self.requests(compiled, feed)[0])
        self._observe(inputs, out)
        return out

    def _observe(self, inputs: dict, out: np.ndarray) -> None:
        self.calls += 1
        for observer in self.observers:
            observer(inputs, out)

    @property
    def split(self) -> SplitTransformer:
        variants = self._variants
        if variants.split is None:  # checked again under the lock: a clone may be compiling it
            with variants.lock:
                if variants.split is None:
                    if self.static_shapes is not None:
                        raise OvsdError("first-block-cache is not available with static shapes (--static)")
                    variants.split = SplitTransformer(self.compiler, self._biased_model())
        return variants.split

    def probe(self, inputs: dict) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        """Run up to the first block; returns its output and a function that finishes this call."""
        self._check(inputs)
        split = self.split
        feed = collapse_text(inputs, self.patch_size).biased_inputs()  # zero bias where it cannot collapse
        head_outputs = self._timed(split.run_head, feed, self.requests)

        def finish() -> np.ndarray:
            out = self._timed(split.run_rest, feed, head_outputs, self.requests)
            self._observe(inputs, out)
            return out

        return split.signal(head_outputs), finish

    def skipping(self, layers: tuple[int, ...], inputs: dict) -> np.ndarray:
        """One call with the blocks ``layers`` skipped (skip-layer guidance); the variant is compiled on first use."""
        self._check(inputs)
        if self.static_shapes is not None:
            raise OvsdError("skip-layer guidance is not available with static shapes (--static)")
        variants = self._variants
        if layers not in variants.skipping:  # checked again under the lock: a clone may be compiling it
            with variants.lock:
                if layers not in variants.skipping:
                    variants.skipping[layers] = self._variant(lambda: self._skipping_model(layers))
        feed = collapse_text(inputs, self.patch_size).biased_inputs()  # zero bias where it cannot collapse
        return self._timed(lambda: self.requests(variants.skipping[layers], feed)[0])

    def _skipping_model(self, layers: tuple[int, ...]):
        """The biased transformer's IR with the blocks ``layers`` skipped."""
        from ovsd3.ir.skip_blocks import skip_blocks
        from ovsd3.ir.slicing import stages

        model = self._biased_model()
        try:
            skip_blocks(model, list(layers), stages(model)[1])
        except ValueError as error:
            raise OvsdError(f"cannot skip blocks {list(layers)} in this folder's transformer: {error}") from None
        return model

    def controlled(self, inputs: dict, residuals: dict) -> np.ndarray:
        """One call adding ControlNet ``residuals`` (input name -> array) after the blocks; the variant is
        compiled on first use."""
        self._check(inputs)
        if self.static_shapes is not None:
            raise OvsdError("ControlNet is not available with static shapes (--static)")
        variants = self._variants
        if variants.controlled is None:  # checked again under the lock: a clone may be compiling it
            with variants.lock:
                if variants.controlled is None:
                    variants.controlled = self._variant(self._controlled_model)
        feed = {**collapse_text(inputs, self.patch_size).biased_inputs(), **residuals}
        out = self._timed(lambda: self.requests(variants.controlled, feed)[0])
        self._observe(inputs, out)
        return out

    def _controlled_model(self):
        """The biased transformer's IR taking one ControlNet residual per block."""
        from ovsd3.ir.controlnet import add_controlnet_residuals
        from ovsd3.ir.slicing import stages

        model = self._biased_model()
        try:
            add_controlnet_residuals(model, stages(model)[1])
        except ValueError as error:
            raise OvsdError(f"cannot feed ControlNet residuals to this folder's transformer: {error}") from None
        return model

    @property
    def block_count(self) -> int:
        return self.split.block_count if self._variants.split is not None else 0
