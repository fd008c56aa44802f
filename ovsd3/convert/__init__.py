"""PyTorch SD3 pipelines to OpenVINO IR (needs the `convert` extras: torch, diffusers, optimum-intel)."""

from ovsd3.convert.pipeline import ConvertReport, ConvertRequest, convert_model

__all__ = ["ConvertReport", "ConvertRequest", "convert_model"]
