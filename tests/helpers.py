"""Shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

from ovsd3.cli import main

# The gate's defaults are for real models. These tiny ones have random weights (the Flash one a strong
# random LoRA on top), which INT8 moves further: measured mean image PSNR / SSIM 23.2 dB / 0.86 (q_sd3),
# 20.5 dB / 0.67 (Flash), 31.5 dB / 0.98 (INT4 weights only). A broken quantization, here another model's
# transformer, scores 14-15 dB / 0.06-0.26 and must fail this gate (test_the_tiny_gate_refuses_a_wrong_transformer).
TINY_MIN_PSNR, TINY_MIN_SSIM = 17.0, 0.45
TINY_GATE = ("--min-psnr", str(TINY_MIN_PSNR), "--min-ssim", str(TINY_MIN_SSIM))


def quantize(source: Path, out: Path, *extra) -> int:
    return main(["quantize", str(source), str(out), "--calib", "8", "--calib-size", "64", "--group-size", "8",
                 "--gate-prompts", "2", "--calib-cache", str(out.parent / f"{out.name}-calib"), *TINY_GATE,
                 *map(str, extra)])


def fingerprint(folder: Path) -> str:
    """Every path under ``folder`` with its bytes: equal fingerprints, untouched folder."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def last_line(capsys) -> str:
    """The last line a command wrote on stderr (its one-line error)."""
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def at_a_terminal() -> None:
    """preexec_fn: Ctrl-C's default action, as a foreground job at a terminal has it. A test run started in the
    background of a script (``pytest &``) has SIGINT ignored, which its children would inherit, and a command
    started that way rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll ``condition`` until it holds; fail if ``process`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.02)


def attention_inputs_quantized(folder: Path, component: str = "transformer") -> bool:
    """Whether the folder's ``component`` has a quantized attention input (:func:`attention_quantized`)."""
    import openvino as ov

    from ovsd3 import layout

    return attention_quantized(ov.Core().read_model(layout.model_xml(folder, component)))


def attention_quantized(model) -> bool:
    """Whether any ScaledDotProductAttention of ``model`` reads a FakeQuantize output through the reshapes,
    transposes and concats between them (not through the projections: a MatMul ends the search)."""
    def quantized(node, depth=8):
        producers = [value.get_node() for value in node.input_values()]
        return depth > 0 and any(producer.get_type_name() == "FakeQuantize" or (
            producer.get_type_name() != "MatMul" and quantized(producer, depth - 1)) for producer in producers)

    attentions = [op for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert attentions, "the tiny model has no fused attention to look at"
    return any(quantized(op) for op in attentions)
