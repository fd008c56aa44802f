"""The one export core every component goes through.

optimum-intel's exporter does the tracing (its export configs name the inputs and outputs exactly as
openvino.genai and OpenVINO Model Server expect them). Around it, ovsd3 adds what it lacks: the IR is
run against the PyTorch module on the same inputs and the export fails loudly if they disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ovsd3.convert import DEFAULT_MIN_PSNR
from ovsd3.errors import ParityError
from ovsd3.layout import MODEL_XML
from ovsd3.memory import meminfo_bytes, release_freed, trimmed_mappings
from ovsd3.metrics import Agreement, worst


ReferenceFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
SaveConfigFn = Callable[[torch.nn.Module, Path], None]
TraceFn = Callable[[torch.nn.Module, Path, str], None]  # (module, xml path, weight format)

@dataclass
class ExportOptions:
    weight_format: str = "fp16"  # "fp16" or "fp32"
    min_psnr: float = DEFAULT_MIN_PSNR
    seed: int = 0


@dataclass
class ComponentResult:
    name: str
    seconds: float
    agreement: Agreement
    size_bytes: int
    precision: str = "f32"  # OpenVINO execution precision of the parity check

    def as_dict(self) -> dict:
        return {"max_abs_error": self.agreement.max_abs_error, "psnr": self.agreement.psnr,
                "worst_output": self.agreement.output, "seconds": round(self.seconds, 2),
                "size_bytes": self.size_bytes, "checked_at": self.precision}


def export_config_for(module, model_type: str, task: str):
    """optimum-intel's OpenVINO export config for ``module`` (the same ones its SD3 export uses)."""
    import optimum.exporters.openvino.model_configs  # noqa: F401  (registers the OpenVINO configs)
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        model=module, exporter="openvino", library_name="diffusers", task=task, model_type=model_type)
    return constructor(module.config, int_dtype="int64", float_dtype="fp32")


def _trace(module, export_config, xml_path: Path, weight_format: str) -> None:
    from optimum.exporters.openvino.convert import export
    from optimum.intel.openvino.configuration import OVConfig

    is_16bit = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
    export(model=module, config=export_config, output=xml_path, ov_config=OVConfig(dtype=weight_format),
           stateful=False, patch_16bit_model=is_16bit, library_name="diffusers")


def _run_reference(module, reference: ReferenceFn, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    dtype = next(module.parameters()).dtype
    torch_inputs = {
        name: torch.from_numpy(value).to(dtype) if value.dtype.kind == "f" else torch.from_numpy(value)
        for name, value in inputs.items()
    }
    with torch.no_grad():
        outputs = reference(module, torch_inputs)
    return {name: value.detach().float().numpy() for name, value in outputs.items()}


def parity_precision(xml_path: Path) -> str:
    """f32 execution measures the export itself, but expands fp16 weights to twice their size: T5-XXL
    would need 19 GB of anonymous memory. Where that does not fit in half the available memory, the
    check runs at the device's default precision (bf16 on CPUs that have it: 9.5 GB, and T5-XXL still
    agrees at 55 dB there, far above the gate)."""
    weights = xml_path.with_suffix(".bin").stat().st_size
    available = meminfo_bytes("MemAvailable")
    return "f32" if not available or 2 * weights <= available // 2 else "default"


def _run_ir(xml_path: Path, inputs: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    compiled = ov.Core().compile_model(xml_path, "CPU", config)
    with trimmed_mappings():  # the first call repacks the mapped weights, which would stay resident beside them
        result = compiled(inputs)
    outputs = {}
    for port in compiled.outputs:
        for name in port.get_names():
            outputs[name] = result[port]
    return outputs


def compare(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], xml_path: Path) -> Agreement:
    """Worst agreement over every output the reference and the IR both have."""
    agreements = [Agreement.of(name, expected[name], actual[name]) for name in expected if name in actual]
    if not agreements:
        raise ParityError(f"{xml_path}: none of the outputs {sorted(expected)} are in the IR ({sorted(actual)})")
    return worst(agreements)


@dataclass
class ComponentExport:
    """Everything the core needs to export one component. The core owns ``module`` from here on and drops
    it before running the IR, so PyTorch and OpenVINO copies of a big model are never alive together."""

    name: str
    module: torch.nn.Module
    export_config: object
    inputs: dict[str, np.ndarray]  # parity-check inputs, by IR input name
    reference: ReferenceFn  # PyTorch outputs, by IR output name
    save_config: SaveConfigFn
    trace: TraceFn | None = None  # for a model optimum-intel has no export config for (ControlNets)


def export_component(job: ComponentExport, out_dir: Path, options: ExportOptions) -> ComponentResult:
    """Export ``job.module`` to ``out_dir/openvino_model.xml`` and check it against PyTorch."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    xml_path = out_dir / MODEL_XML
    module, job.module = job.module, None
    # The reference runs first: tracing a 16-bit model leaves parts of it patched to fp32.
    expected = _run_reference(module, job.reference, job.inputs)
    job.save_config(module, out_dir)
    if job.trace is not None:
        job.trace(module, xml_path, options.weight_format)
    else:
        _trace(module, job.export_config, xml_path, options.weight_format)
    del module
    release_freed()
    precision = parity_precision(xml_path)
    agreement = compare(expected, _run_ir(xml_path, job.inputs, precision), xml_path)
    release_freed()
    if not agreement.psnr >= options.min_psnr:
        raise ParityError(f"{job.name}: the OpenVINO model disagrees with PyTorch on output {agreement.output!r} "
                          f"({agreement}; needs PSNR >= {options.min_psnr:.0f} dB)")
    size = sum(path.stat().st_size for path in out_dir.iterdir() if path.suffix in (".xml", ".bin"))
    return ComponentResult(job.name, time.perf_counter() - start, agreement, size, precision)
