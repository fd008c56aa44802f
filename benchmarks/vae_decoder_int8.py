"""SD3's full-size VAE decoder (random weights): FP16 IR against ovsd3's INT8 decoder, decode time per image.

    python benchmarks/vae_decoder_int8.py [--workdir /tmp/ovsd3-vae-decoder] [--repeats 5]

The decoder is built from the preset's AutoencoderKL config (SD3 Medium's by default: block_out_channels
128, 256, 512, 512; the same decoder in every SD3 and SD3.5 model), exported as `ovsd3 convert` exports it
(fp16 weights, checked against PyTorch), and quantized with ovsd3.quantize.vae on a few random latents
(values change neither the speed nor the size). Then FP16 and INT8 decodes at 512x512 and 1024x1024
(latents 64x64 and 128x128) alternate, after a warm-up each, and the medians are printed. Both IRs run at
the CPU plugin's defaults (bf16 for the float parts where the CPU has it). Random weights say nothing
about quality; the INT8 output's PSNR against FP16 is printed only as a sanity check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LATENT_CHANNELS = 16


def export_decoder(preset: str, workdir: Path, seed: int) -> Path:
    """The preset's VAE decoder as FP16 IR in ``workdir/vae_decoder`` (reused when already there)."""
    from ovsd3 import layout

    xml = layout.model_xml(workdir, layout.VAE_DECODER)
    if xml.exists():
        return xml
    import torch
    from diffusers import AutoencoderKL

    from ovsd3.convert.components import convert_vae_decoder
    from ovsd3.convert.export import ExportOptions
    from ovsd3.convert.source import ModelSource
    from ovsd3.presets import get_preset

    torch.manual_seed(seed)
    source_root = workdir / "source"
    AutoencoderKL(**get_preset(preset).vae.diffusers_config()).save_pretrained(source_root / "vae")
    result = convert_vae_decoder(ModelSource(preset, source_root, {}), workdir, ExportOptions(seed=seed))
    print(f"exported {xml}: {result.size_bytes / 1e6:.0f} MB in {result.seconds:.0f} s, agreement with PyTorch "
          f"{result.agreement.psnr:.1f} dB", flush=True)
    return xml


def random_latents(side: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"latent_sample": rng.standard_normal((1, LATENT_CHANNELS, side, side), dtype=np.float32)}


def quantize_decoder(fp16_xml: Path, out_xml: Path, samples: int, side: int) -> float:
    """ovsd3's INT8 decoder, calibrated on ``samples`` random latents; returns the seconds NNCF took."""
    import logging

    import openvino as ov
    from nncf.common.logging import nncf_logger

    from ovsd3.quantize.vae import VaeDecoderQuantization, quantize_vae_decoder

    nncf_logger.setLevel(logging.ERROR)  # it logs every node it leaves in float
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    quantized = quantize_vae_decoder(ov.Core().read_model(fp16_xml), [random_latents(side, rng) for _ in range(samples)],
                                     VaeDecoderQuantization())
    seconds = time.perf_counter() - started
    ov.save_model(quantized, out_xml)
    return seconds


def time_interleaved(xmls: dict[str, Path], side: int, repeats: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per decode for each IR, calls alternating so load on the machine hits both alike; and the
    last IR's output PSNR against the first's (output range [-1, 1])."""
    import openvino as ov

    core = ov.Core()
    compiled = {name: core.compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY"}) for name, xml in xmls.items()}
    latents = random_latents(side, np.random.default_rng(1))
    outputs = {name: model(latents)[0] for name, model in compiled.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, model in compiled.items():
            started = time.perf_counter()
            model(latents)
            times[name].append(time.perf_counter() - started)
    first, last = (outputs[name].astype(np.float64) for name in (next(iter(xmls)), list(xmls)[-1]))
    psnr = 10 * np.log10(4.0 / max(float(np.mean((first - last) ** 2)), 1e-20))
    return times, psnr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovsd3-vae-decoder"))
    parser.add_argument("--samples", type=int, default=4, help="random latents to calibrate on")
    parser.add_argument("--calib-side", type=int, default=64, help="their side (64: 512x512 images)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fp16_xml = export_decoder(args.preset, args.workdir, args.seed)
    int8_xml = args.workdir / "vae_decoder_int8" / "openvino_model.xml"
    int8_xml.parent.mkdir(parents=True, exist_ok=True)
    seconds = quantize_decoder(fp16_xml, int8_xml, args.samples, args.calib_side)
    megabytes = {name: xml.with_suffix(".bin").stat().st_size / 1e6 for name, xml in (("fp16", fp16_xml),
                                                                                        ("int8", int8_xml))}
    print(f"{args.preset} VAE decoder, random weights; INT8 by ovsd3.quantize.vae on {args.samples} random "
          f"latents of {args.calib_side}x{args.calib_side} in {seconds:.0f} s; CPU, median of {args.repeats} "
          f"decodes, FP16 and INT8 alternating", flush=True)
    print(f"{'':18s}{'FP16 IR':>10s}{'INT8 IR':>10s}{'ratio':>9s}{'INT8 vs FP16 PSNR':>20s}")
    print(f"{'weights (MB)':18s}{megabytes['fp16']:10.1f}{megabytes['int8']:10.1f}"
          f"{megabytes['fp16'] / megabytes['int8']:8.2f}x", flush=True)
    for size in args.sizes:
        times, psnr = time_interleaved({"fp16": fp16_xml, "int8": int8_xml}, size // 8, args.repeats)
        fp16, int8 = statistics.median(times["fp16"]), statistics.median(times["int8"])
        print(f"{f'decode {size}x{size} (s)':18s}{fp16:10.2f}{int8:10.2f}{fp16 / int8:8.2f}x{psnr:17.1f} dB"
              f"   (FP16 {', '.join(f'{t:.1f}' for t in times['fp16'])}; INT8 "
              f"{', '.join(f'{t:.1f}' for t in times['int8'])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
