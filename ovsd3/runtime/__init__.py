"""The numpy-only SD3 runtime: openvino, openvino-tokenizers, numpy and Pillow; never torch."""

from ovsd3.runtime.pipeline import GenerationResult, SD3Pipeline, StaticShape, Step

__all__ = ["GenerationResult", "SD3Pipeline", "StaticShape", "Step"]
