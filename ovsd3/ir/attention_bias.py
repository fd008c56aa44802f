"""An ``attention_bias`` input on the transformer IR: one additive logit per key of the joint attention.

Without T5, the text is 77 CLIP tokens followed by T5-length zeros. The zero tokens enter the transformer as
identical vectors and stay identical through every block (per-token ops, and the same attention for each), and
in joint attention n identical keys and values act exactly as ONE of them whose logit is raised by log(n). With
this input the runtime feeds 77 + 1 text tokens and a bias of log(n) on that one key, and gets the image output
of the full sequence for about a quarter less work at 512x512 (``ovsd3/runtime/text_collapse.py`` builds the
inputs).

The bias goes to every joint attention (``transformer_blocks.N.attn``: keys are image tokens, then text tokens,
as diffusers' JointAttnProcessor2_0 concatenates them) as the opset13 ScaledDotProductAttention mask, broadcast
to [1, 1, 1, keys]. SD3.5 Medium's second, image-only attention (``attn2``, MMDiT-X) has no text keys and is
left alone. NNCF's INT8 IR keeps the same SDPA ops (its FakeQuantize ops sit on the q/k/v projections, before
the concatenation), so FP16 and INT8 folders take the same surgery.
"""

from __future__ import annotations

import re

ATTENTION_BIAS = "attention_bias"
# The SDPA op the PyTorch frontend makes for `transformer_blocks.N.attn`; `attn2/` (image-only) does not match.
_JOINT_SDPA = re.compile(r"__module\.transformer_blocks\.\d+\.attn/.*ScaledDotProductAttention")


def joint_attention_ops(model) -> list:
    """The ScaledDotProductAttention ops of the transformer blocks' joint (image + text) attention."""
    return [op for op in model.get_ordered_ops()
            if op.get_type_name() == "ScaledDotProductAttention" and _JOINT_SDPA.match(op.get_friendly_name())]


def add_attention_bias(model):
    """A copy of the transformer ``model`` with an ``attention_bias`` input (f32, [keys]: image tokens, then
    text tokens) added to the logits of every joint attention. A zero bias gives the original model's output.

    Raises ValueError when the IR has no joint attention op or already has the input, or an op cannot take
    the bias (causal, or already masked)."""
    import openvino as ov
    from openvino import opset13 as ops

    if ATTENTION_BIAS in {name for port in model.inputs for name in port.get_names()}:
        raise ValueError(f"the transformer IR already has an {ATTENTION_BIAS!r} input")
    clone = model.clone()
    targets = joint_attention_ops(clone)
    if not targets:
        raise ValueError("no joint attention found in the transformer IR (no ScaledDotProductAttention op named "
                         "__module.transformer_blocks.N.attn/...): it is not an SD3 transformer exported by ovsd3 "
                         "or optimum-intel")
    bias = ops.parameter(ov.PartialShape([-1]), ov.Type.f32, name=ATTENTION_BIAS)
    bias.output(0).get_tensor().set_names({ATTENTION_BIAS})
    # One [1, 1, 1, keys] mask shared by every op: it broadcasts over batch, heads and queries.
    mask = ops.reshape(bias, ops.constant([1, 1, 1, -1], ov.Type.i64), special_zero=False)
    for op in targets:
        _rebuild_with_mask(op, mask)
    clone.add_parameters([bias])  # on the clone, not a new Model: keeps its rt_info (optimum's, conversion's)
    clone.validate_nodes_and_infer_types()
    return clone


def _rebuild_with_mask(op, mask) -> None:
    """Replace one SDPA op by the same op with ``mask`` as its attention mask (scale and causal kept)."""
    from openvino import opset13 as ops

    name = op.get_friendly_name()
    if op.get_attributes().get("causal"):  # a causal SDPA ignores its mask input: the bias would do nothing
        raise ValueError(f"{name} is causal and would ignore an attention bias")
    if op.get_input_size() > 3:
        raise ValueError(f"{name} already has an attention mask; this IR is not the plain SD3 transformer")
    query, key, value = (op.input_value(index) for index in range(3))
    if query.get_element_type() != mask.get_output_element_type(0):  # the mask must match the logits' type
        mask = ops.convert(mask, query.get_element_type())
    replacement = ops.scaled_dot_product_attention(query, key, value, mask, causal=False)
    replacement.set_friendly_name(name)
    op.output(0).replace(replacement.output(0))
