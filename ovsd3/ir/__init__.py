"""Graph surgery on OpenVINO IR shared by the quantizer and the runtime (no torch)."""
