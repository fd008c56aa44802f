"""The transformer IR taking ControlNet residuals: diffusers' ``SD3Transformer2DModel(...,
block_controlnet_hidden_states=...)``, which adds a residual to the image tokens after every block but the last
(whose ``context_pre_only`` hands on no text stream).

Derived from the folder's transformer IR at run time, as ``ovsd3/ir/skip_blocks.py`` derives the skip-layer
variant, so it works unchanged on FP16, INT8 (FakeQuantize) and weight-compressed folders: block k's image
output is what block k+1's first layer norm reads (``transformer_blocks.{k+1}.norm1.norm``); every reader of it
reads ``output + controlnet_residual.{k}`` instead, a new input of shape (batch, image tokens, width). Which
ControlNet residual goes to which block, summed over ControlNets and scaled, is the runtime's business
(:mod:`ovsd3.runtime.controlnet`): this IR takes one ready residual per block.
"""

from __future__ import annotations

from ovsd3.ir.skip_blocks import _IMAGE_NORM, _read_by

RESIDUAL = "controlnet_residual.{}"


def residual_name(block: int) -> str:
    return RESIDUAL.format(block)


def add_controlnet_residuals(model, block_count: int):
    """``model`` (an ov.Model of the SD3 transformer, ``block_count`` blocks) with a residual input added to the
    image stream after each of blocks 0 .. block_count-2, in place."""
    import openvino as ov
    import openvino.opset13 as ops

    parameters = []
    for block in range(block_count - 1):
        output = _read_by(model, _IMAGE_NORM.format(block + 1))
        if output is None:
            raise ValueError(f"cannot find block {block}'s image stream in this IR (no layer norm named "
                             f"{_IMAGE_NORM.format(block + 1)})")
        readers = list(output.get_target_inputs())
        parameter = ops.parameter(ov.PartialShape([-1, -1, output.get_partial_shape()[-1]]),
                                  output.get_element_type(), name=residual_name(block))
        parameter.output(0).get_tensor().set_names({residual_name(block)})
        total = ops.add(output, parameter, name=f"controlnet_residual_add.{block}")
        for reader in readers:
            reader.replace_source_output(total.output(0))
        parameters.append(parameter)
    model.add_parameters(parameters)
    model.validate_nodes_and_infer_types()
    return model
