"""Which INT8 form of each component runs fastest on a CPU of a given instruction-set level (``--target-cpu``).

What decides it is the kernel OpenVINO's CPU plugin has for an INT8 layer on that level
(benchmarks/results/int8_avx2/README.md has the measurements):

- With VNNI (AVX512-VNNI, AVX-VNNI) or AMX, int8 dot products run at about twice bf16's rate and four times
  f32's: ovsd3's full INT8 (every fully connected layer and the attention's query and key) measured 1.61-1.71x
  over FP16 at bf16 and 2.95x over f32 end to end (benchmarks/results/int8-ceiling).
- Without VNNI (AVX2 only, and AVX-512 without VNNI, which has the same u8 x s8 multiply-adds in wider
  registers), the plugin runs INT8 fully connected layers on oneDNN's ``jit_gemm`` (about 1.2x f32), and
  quantized query and key make it give up its fused attention kernel for an int8 MatMul and a separate
  Softmax, which is slower than the fused f32 one. So there only the fully connected layers are INT8, the
  attention stays in float (fused): 1.13-1.28x per transformer call against 0.99-1.20x for the all-INT8 form
  (busy AVX2 EPYC). INT8 convolutions have a fast AVX2 kernel, so the decoder is INT8 everywhere (1.76x).

``this`` (the default) does not trust the table: it times the candidates on the CPU ``ovsd3 quantize`` runs on
(:mod:`ovsd3.quantize.probe`: one block of the folder's own transformer, one decoder convolution) and keeps INT8
attention inputs, and an INT8 VAE decoder, only where they are faster there; the CPU's ISA level (from its
feature flags) is recorded beside the measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovsd3.errors import OvsdError
from ovsd3.layout import CPU_ISA_LEVELS

TARGETS = ("this", *CPU_ISA_LEVELS)
# What a transformer choice means for NNCF: operation types whose inputs stay float
TRANSFORMER_FORMS = {"int8": (), "int8-fc": ("ScaledDotProductAttention",)}


@dataclass(frozen=True)
class CpuChoice:
    """The formats chosen for one ISA level, and the CPU plugin options they need when compiled."""

    transformer: str  # a TRANSFORMER_FORMS key
    vae_decoder: str  # an ovsd3.quantize.vae mode
    why: str
    runtime: dict = field(default_factory=dict)  # component -> {CPU plugin option: value}


_NO_VNNI = CpuChoice(
    transformer="int8-fc", vae_decoder="int8",
    why="no VNNI: OpenVINO runs INT8 fully connected layers on jit_gemm, barely faster than f32, and drops its fused "
        "attention kernel when the attention's inputs are quantized, so only the fully connected layers are INT8 "
        "(half the weights' memory) and the attention stays fused in float")
_VNNI = CpuChoice(
    transformer="int8", vae_decoder="int8",
    why="VNNI/AMX int8 dot products run at about twice bf16's rate: the whole transformer (fully connected "
        "layers and the attention's query and key) and the VAE decoder in INT8, measured 1.6-1.7x over bf16")
# Quantized attention inputs must win by this much to be chosen: on a busy 2-core machine one block's timing
# moves by a few percent, and the float attention is also the more accurate one
ATTENTION_MARGIN = 1.05
TABLE = {"avx2": _NO_VNNI, "avx512": _NO_VNNI, "vnni": _VNNI, "amx": _VNNI}


def isa_of_flags(flags: set[str]) -> str:
    """The ISA level of a CPU with these /proc/cpuinfo flags."""
    if {"amx_int8", "amx_tile"} <= flags:
        return "amx"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    return "avx2"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return None


def detect_isa() -> str:
    """This CPU's level: from its flags, else from OpenVINO's capabilities (which tell bf16 and not VNNI)."""
    flags = cpu_flags()
    if flags is not None:
        return isa_of_flags(flags)
    import openvino as ov

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return "vnni" if "BF16" in capabilities else "avx2"  # every CPU with bf16 has VNNI


def cpu_name() -> str:
    try:
        import openvino as ov

        return str(ov.Core().get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # a name for the record only; the choice does not depend on it
        return ""


def measured_choice(speedups: dict[str, float]) -> CpuChoice:
    """The formats that are fastest by ``speedups`` (ovsd3.quantize.probe.measure). The fully connected layers
    are INT8 whatever they measure: the weights' memory halves (on this AVX2 EPYC they measured 0.83-1.28x
    float depending on the load; with VNNI about 2x)."""
    attention = speedups["attention"] >= ATTENTION_MARGIN
    decoder = speedups["convolution"] >= 1.0
    attention_verdict = "so INT8" if attention else "so kept in float"
    decoder_verdict = "VAE decoder INT8" if decoder else "VAE decoder weights only"
    return CpuChoice(
        transformer="int8" if attention else "int8-fc", vae_decoder="int8" if decoder else "weights",
        why=f"measured on this CPU: one transformer block with INT8 fully connected layers "
            f"{speedups['fully_connected']:.2f}x float, with its attention's inputs quantized too "
            f"{speedups['attention']:.2f}x that ({attention_verdict}); an INT8 convolution "
            f"{speedups['convolution']:.2f}x float ({decoder_verdict})")


def choose(target: str, isa: str | None = None, speedups: dict[str, float] | None = None) -> dict:
    """The record (FolderRecord.cpu_target) of what ``--target-cpu target`` picks. A named level: the table's
    formats. ``this`` with ``speedups`` (this CPU's, ovsd3.quantize.probe): the formats they favour; without:
    the table's for this CPU's level (what a check before any measurement goes by). ``isa``: detected when None."""
    if target not in TARGETS:
        raise OvsdError(f"--target-cpu must be one of {', '.join(TARGETS)} (got {target!r})")
    if target != "this":
        return {"target": target, "isa": target, **asdict(TABLE[target])}
    level = isa or detect_isa()
    if speedups is None:
        return {"target": target, "isa": level, **asdict(TABLE[level]), "cpu": cpu_name()}
    return {"target": target, "isa": level, **asdict(measured_choice(speedups)), "cpu": cpu_name(),
            "measured": dict(speedups)}
