"""ovsd3: Stable Diffusion 3 on OpenVINO (convert, quantize, run)."""

__version__ = "0.2.0"
