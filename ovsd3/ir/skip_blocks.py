"""The transformer IR with some blocks skipped: each skipped block becomes the identity for both token streams,
as diffusers' ``SD3Transformer2DModel(..., skip_layers=[...])`` makes it (skip-layer guidance, SD3.5).

A block's streams are found by the layer norms that read them (optimum-intel's export names every op after
its module): block k reads the image stream in ``transformer_blocks.k.norm1.norm`` and the text stream in
``transformer_blocks.k.norm1_context.norm``; what block k hands on is what block k+1 (or ``norm_out``) reads
there. Skipping k rewires those readers to block k's own inputs; the block's ops then have no user and drop out.
"""

from __future__ import annotations

_IMAGE_NORM = "__module.transformer_blocks.{}.norm1.norm/"
_TEXT_NORM = "__module.transformer_blocks.{}.norm1_context.norm/"
_FINAL_NORM = "__module.norm_out.norm/"


def _read_by(model, prefix: str):
    """The tensor the layer norm named ``prefix...`` reads, or None when there is no such norm."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "MVN" and op.get_friendly_name().startswith(prefix):
            return op.input_value(0)
    return None


def skip_blocks(model, layers: list[int], block_count: int):
    """``model`` (an ov.Model of the SD3 transformer) with ``layers`` (0-based block indices) skipped, in place."""
    for block in sorted(set(layers)):
        last = block == block_count - 1
        streams = [(_IMAGE_NORM.format(block), _FINAL_NORM if last else _IMAGE_NORM.format(block + 1))]
        if not last:  # the last block hands on no text stream (context_pre_only)
            streams.append((_TEXT_NORM.format(block), _TEXT_NORM.format(block + 1)))
        for reads_input, reads_output in streams:
            block_input, block_output = _read_by(model, reads_input), _read_by(model, reads_output)
            if block_input is None or block_output is None:
                raise ValueError(f"cannot find block {block}'s token streams in this IR "
                                 f"(no layer norm named {reads_input if block_input is None else reads_output})")
            block_output.replace(block_input)
    model.validate_nodes_and_infer_types()
    return model
