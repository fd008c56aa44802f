"""The files OpenVINO Model Server needs to serve an ovsd3 folder through its image generation graph.

    DIR/config.json            {"model_config_list": [{"config": {"name": NAME, "base_path": NAME}}]}
    DIR/NAME/graph.pbtxt       one ImageGenCalculator node reading MODEL_DIR

as OVMS documents them (docs/image_generation/reference.md, docs/mediapipe.md) and its export_model.py writes
them; the options are mediapipe.ImageGenCalculatorOptions fields (src/image_gen/image_gen_calculator.proto),
set so that OVMS draws with the folder's own defaults (steps, resolution) and ovsd3 serve's limits. Start it with

    ovms --rest_port 8000 --config_path DIR/config.json
"""

from __future__ import annotations

import json
import math
from glob import escape
from pathlib import Path

from ovsd3.atomic import AtomicOutput
from ovsd3.errors import OvsdError
from ovsd3.layout import OVMS_CONFIG, OVMS_GRAPH, ModelFolder

OVMS_DEVICES = ("CPU", "GPU", "NPU")

GRAPH = """# Written by `ovsd3 serve --write-ovms-config` for {models_path}
input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"

node: {{
  name: "ImageGenExecutor"
  calculator: "ImageGenCalculator"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "IMAGE_GEN_NODE_RESOURCES:pipes"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  node_options: {{
      [type.googleapis.com / mediapipe.ImageGenCalculatorOptions]: {{
{options}
      }}
  }}
}}
"""


def graph_options(model: ModelFolder, device: str, max_images: int, max_steps: int) -> dict:
    """ImageGenCalculatorOptions for ``model``: OVMS's own defaults (50 steps, 4096x4096) replaced by the
    folder's, so a request that names neither gets the same picture size and step count as from ovsd3."""
    if device not in OVMS_DEVICES:
        raise OvsdError(f"OVMS takes one of {', '.join(OVMS_DEVICES)} as its device (got {device!r}); "
                        f"pass --device CPU, GPU or NPU with --write-ovms-config")
    model.check_defaults_within(max_steps, math.inf, "the OVMS graph")  # its default above its own maximum
    max_side = model.max_size or 4096  # OVMS's own default where the config says nothing
    native = model.native_size
    return {"models_path": str(model.path.resolve()), "device": device,
            "max_resolution": f"{max_side}x{max_side}", "default_resolution": f"{native}x{native}",
            "max_num_images_per_prompt": max_images,
            "default_num_inference_steps": model.record.defaults.num_inference_steps,
            "max_num_inference_steps": max_steps}


def graph_text(options: dict) -> str:
    lines = [f"          {name}: {json.dumps(value)}" for name, value in options.items()]
    return GRAPH.format(models_path=options["models_path"], options="\n".join(lines))


def write_ovms_config(model_dir: Path, out: Path, *, name: str | None = None, device: str = "CPU",
                      max_images: int = 8, max_steps: int = 100, overwrite: bool = False) -> Path:
    """Write ``out/config.json`` and ``out/NAME/graph.pbtxt``; returns the config's path."""
    model = ModelFolder.open(model_dir)
    name = name or model.name
    options = graph_options(model, device, max_images, max_steps)
    # --overwrite replaces only the config of this very model: another model's graph would be lost
    output = AtomicOutput(out, command="ovms-config", overwrite=overwrite, inputs=(model.path,),
                          writes=(OVMS_CONFIG, f"{escape(name)}/{OVMS_GRAPH}"))
    output.check()
    with output as staging:
        (staging / name).mkdir(parents=True)
        (staging / name / OVMS_GRAPH).write_text(graph_text(options))
        config = {"model_config_list": [{"config": {"name": name, "base_path": name}}]}
        (staging / OVMS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out / OVMS_CONFIG
