"""The numpy-only SD3 runtime: openvino, openvino-tokenizers, numpy and Pillow; never torch."""
