"""What a ControlNet costs at full size: one 512x512 sampling step of SD3 Medium (batch 2: both halves of
classifier-free guidance) with a full-size InstantX-shaped ControlNet, FP16 and INT8, against a step without.

    python benchmarks/controlnet_cost.py --source /tmp/ovsd3-cluster-bench/sd3-medium-random-fp16 \\
        --fp16 /tmp/ovsd3-cluster-bench/sd3-medium-fp16-ov --int8 /tmp/ovsd3-cluster-bench/sd3-medium-int8-ov \\
        --workdir /tmp/ovsd3-controlnet-cost

The ControlNet is ``SD3ControlNetModel`` with SD3 Medium's width (24 heads x 64) and InstantX's
SD3-Controlnet-Canny/Pose/Tile depth, 6 blocks (their 1.19 GB fp16 weight file is six SD3 Medium blocks and the
embedders), random weights: values do not change speed. It is exported as ``ovsd3 convert --controlnet`` does
(``ovsd3.convert.controlnet``, checked against PyTorch) and quantized as ``ovsd3 quantize`` does
(``ovsd3.quantize.controlnet``; here on a few random inputs, which set ranges but not speed). A step with
control is what the runtime runs: the ControlNet, then the transformer variant taking per-block residuals
(``ovsd3/ir/controlnet.py``), on the same inputs; a step without is the plain transformer. Each model is
compiled alone (the machine has 24 GB), warmed up once, and timed ``--runs`` times (median).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

INSTANTX_LAYERS = 6
TEXT_TOKENS = 77 + 256  # CLIP + T5 lengths, as the pipeline hands the transformer


def build_controlnet(source: Path, out: Path, layers: int) -> Path:
    """An InstantX-shaped SD3ControlNetModel of ``source``'s transformer, random weights, saved in fp16."""
    import torch
    from diffusers import SD3ControlNetModel

    from ovsd3 import layout

    if (out / "config.json").is_file():
        return out
    config = {key: value for key, value in layout.read_json(source / "transformer" / "config.json").items()
              if not key.startswith("_")}
    config.pop("dual_attention_layers", None)
    config.pop("qk_norm", None)
    torch.manual_seed(0)
    controlnet = SD3ControlNetModel.from_config({**config, "num_layers": layers, "extra_conditioning_channels": 0})
    with torch.no_grad():  # zero-initialised in training: random here, so its outputs are not all zeros
        for parameter in [*controlnet.controlnet_blocks.parameters(), *controlnet.pos_embed_input.parameters()]:
            parameter.normal_(0.0, 0.02)
    controlnet.to(torch.float16).save_pretrained(out)
    return out


def export(source: Path, controlnet: Path, out: Path) -> Path:
    from ovsd3 import layout
    from ovsd3.convert.controlnet import convert_controlnet
    from ovsd3.convert.export import ExportOptions
    from ovsd3.convert.source import ModelSource

    xml = layout.model_xml(out, layout.CONTROLNET)
    if not xml.exists():
        result = convert_controlnet(ModelSource.open(str(source)), controlnet, 0, out, ExportOptions("fp16"))
        print(f"exported the ControlNet in {result.seconds:.0f} s, against PyTorch: {result.agreement.psnr:.1f} dB")
    return xml


def step_inputs(side: int, pooled_dim: int, text_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = side // 8
    return {"hidden_states": rng.standard_normal((2, 16, latent, latent), dtype=np.float32),
            "controlnet_cond": rng.standard_normal((2, 16, latent, latent), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, TEXT_TOKENS, text_dim), dtype=np.float32),
            "pooled_projections": np.zeros((2, pooled_dim), dtype=np.float32)}


def quantize(xml: Path, out: Path, inputs: dict[str, np.ndarray], samples: int) -> Path:
    import openvino as ov

    from ovsd3.quantize.controlnet import quantize_controlnet
    from ovsd3.quantize.target import TRANSFORMER_FORMS, choose
    from ovsd3.quantize.transformer import TransformerQuantization

    if out.exists():
        return out
    model = ov.Core().read_model(xml)
    names = {name for parameter in model.get_parameters() for name in parameter.output(0).get_names()}
    rng = np.random.default_rng(1)
    data = [{name: (value + 0.1 * rng.standard_normal(value.shape)).astype(np.float32) if value.ndim > 1 else value
             for name, value in inputs.items() if name in names} for _ in range(samples)]
    started = time.perf_counter()
    form = choose("this")["transformer"]  # the form `ovsd3 quantize` picks on this CPU
    options = TransformerQuantization(subset_size=samples, ignore_types=TRANSFORMER_FORMS[form])
    ov.save_model(quantize_controlnet(model, data, options), out)
    print(f"quantized the ControlNet to INT8 ({form}) in {time.perf_counter() - started:.0f} s")
    return out


def timed(model, inputs: dict[str, np.ndarray], runs: int) -> tuple[float, list]:
    """(median seconds of a call, the outputs) for ``model`` (a path or an ov.Model) compiled alone."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(model, "CPU")
    names = {name for port in compiled.inputs for name in port.get_names()}
    feed = {name: value for name, value in inputs.items() if name in names}
    request = compiled.create_infer_request()
    request.infer(feed)  # warm-up
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        request.infer(feed)
        seconds.append(time.perf_counter() - started)
    outputs = [np.array(request.get_output_tensor(index).data) for index in range(len(compiled.outputs))]
    del request, compiled
    gc.collect()
    return statistics.median(seconds), outputs


def measure(folder: Path, controlnet_xml: Path, inputs: dict, runs: int) -> dict[str, float]:
    import openvino as ov

    from ovsd3 import layout
    from ovsd3.ir.controlnet import add_controlnet_residuals
    from ovsd3.runtime.controlnet import block_residuals

    blocks = layout.ModelFolder.open(folder).block_count
    controlnet, samples = timed(controlnet_xml, inputs, runs)
    residuals = block_residuals([samples], [1.0], blocks)
    plain, _ = timed(layout.model_xml(folder, layout.TRANSFORMER), inputs, runs)
    model = add_controlnet_residuals(ov.Core().read_model(layout.model_xml(folder, layout.TRANSFORMER)), blocks)
    controlled, _ = timed(model, {**inputs, **residuals}, runs)
    row = {"plain": plain, "controlnet": controlnet, "transformer_with_residuals": controlled,
           "step_with_control": controlnet + controlled}
    print(f"{folder.name}: " + ", ".join(f"{name} {value:.2f} s" for name, value in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="SD3 Medium in diffusers' layout (its config)")
    parser.add_argument("--fp16", type=Path, required=True, help="its FP16 ovsd3 folder")
    parser.add_argument("--int8", type=Path, required=True, help="its INT8 ovsd3 folder")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-controlnet-cost"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calib", type=int, default=4, help="random inputs NNCF calibrates the ControlNet on")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from ovsd3 import layout

    config = layout.read_json(args.source / "transformer" / "config.json")
    inputs = step_inputs(args.size, config["pooled_projection_dim"], config["joint_attention_dim"])
    fp16_xml = export(args.source, build_controlnet(args.source, args.workdir / "controlnet-source",
                                                    INSTANTX_LAYERS), args.workdir / "ir")
    int8_xml = quantize(fp16_xml, args.workdir / "ir-int8-this-cpu" / "openvino_model.xml", inputs, args.calib)
    rows = {"FP16": measure(args.fp16, fp16_xml, inputs, args.runs),
            "INT8": measure(args.int8, int8_xml, inputs, args.runs)}
    print(f"\none {args.size}x{args.size} step (batch 2), median of {args.runs} calls, seconds:")
    print(f"{'':6s}{'no control':>12s}{'ControlNet':>12s}{'transformer+res':>17s}{'with control':>14s}{'cost':>8s}")
    for name, row in rows.items():
        print(f"{name:6s}{row['plain']:12.2f}{row['controlnet']:12.2f}{row['transformer_with_residuals']:17.2f}"
              f"{row['step_with_control']:14.2f}{row['step_with_control'] / row['plain']:7.2f}x")


if __name__ == "__main__":
    main()
