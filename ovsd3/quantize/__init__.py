"""INT8 transformer and INT4 weight compression of an ovsd3 / optimum-intel folder (see issue: ovsd3 quantize)."""
