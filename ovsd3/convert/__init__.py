"""PyTorch SD3 pipelines to OpenVINO IR (needs the `convert` extras: torch, diffusers, optimum-intel).

This package's own namespace stays free of torch, so the command line can build its options on a
runtime-only install; the converter itself loads on first use.
"""

# Below this the IR is not a faithful copy of the PyTorch module. fp16 weights on tiny and real models
# land far above it (70-140 dB); a wrong graph lands far below (0-20 dB).
DEFAULT_MIN_PSNR = 30.0

__all__ = ["ConvertReport", "ConvertRequest", "DEFAULT_MIN_PSNR", "convert_model"]


def __getattr__(name):
    if name in ("ConvertReport", "ConvertRequest", "convert_model"):
        from ovsd3.convert import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
