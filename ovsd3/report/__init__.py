"""Measurements users choose by: `ovsd3 report` compares folders (size, speed, quality) and `ovsd3 benchmark`
times one folder across batch sizes and against its peers (openvino.genai, diffusers).

Every timed run happens in a child process of its own (see :mod:`ovsd3.report.children`), so each one's peak
memory is its own and a first start is really a first start.
"""
