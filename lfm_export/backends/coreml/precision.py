"""Which ops of the converted program compute in fp32 (the rest in fp16): `keep_fp32` is the op selector given
to `coremltools.transform.FP16ComputePrecision`.

The canonical model computes RMSNorm statistics and the attention softmax in fp32 and the MoE router in fp32
(it casts there); a plain fp16 conversion would compute them in fp16, where `x ** 2` of a hidden value above
256 overflows to inf. Kept in fp32: the mean of squares, its epsilon add, rsqrt and the product with it;
the attention scores from the scaling after `q @ k^T` through the mask and the softmax; the router's linear,
sigmoid, the expert-bias add, top-k, gathers / scatters and the normalising sum and division; and the RoPE
angles (the position cast, `positions * inv_freq`, the concat and cos / sin): in fp16 a position above 2048
is not representable and an angle of a few hundred radians carries half an ulp of error (0.06 rad at 200,
1 rad at 2048), which turned every key of a 2k context wrong by up to 1.0 (the cos / sin values, in
[-1, 1], are cast to fp16 afterwards, as the canonical `apply_rope` casts them). Tracing the model in fp16 instead
(`model.half()` with fp32 casts inside) was tried: coremltools then computed the short convolutions and
their out_proj in fp32 as well (it promotes the fp16 state reads), so the program was neither the fp16
model nor the fp32 one.
"""

from __future__ import annotations

from typing import Any

from lfm_export.precision import ROUTER, rule_for

ALWAYS_FP32 = frozenset(
    {
        "pow",
        "reduce_mean",
        "rsqrt",
        "softmax",
        "sigmoid",
        "topk",
        "gather_along_axis",
        "scatter_along_axis",
        "reduce_sum",
        "real_div",
        "cos",
        "sin",
    }
)
ANGLE_OPS = frozenset({"cast", "expand_dims", "mul", "concat", "reshape"})
"""Ops between the integer positions and cos / sin that must stay fp32 with them."""


def _producer(var: Any) -> str | None:
    op = getattr(var, "op", None)
    return None if op is None else op.op_type


def _feeds_softmax(op: Any, depth: int = 3) -> bool:
    if depth == 0:
        return False
    for out in op.outputs:
        for child in out.child_ops:
            if child.op_type == "softmax" or (
                child.op_type in ("mul", "select", "add") and _feeds_softmax(child, depth - 1)
            ):
                return True
    return False


def _feeds_rope_angle(op: Any, depth: int = 4) -> bool:
    """True for an op of the chain `positions -> cast -> expand_dims -> mul -> concat -> cos / sin`."""
    if depth == 0 or op.op_type not in ANGLE_OPS:
        return False
    for out in op.outputs:
        for child in out.child_ops:
            if child.op_type in ("cos", "sin") or _feeds_rope_angle(child, depth - 1):
                return True
    return False


def keep_fp32(op: Any) -> bool:
    """True for an op that must compute in fp32 (module docstring)."""
    kind = op.op_type
    if kind in ALWAYS_FP32 or _feeds_rope_angle(op):
        return True
    inputs = [v for v in op.inputs.values() if not isinstance(v, (list, tuple))]
    producers = {_producer(v) for v in inputs}
    if kind == "add" and producers & {"reduce_mean", "reduce_sum", "sigmoid"}:
        # the last: the router's expert-bias add, whose sum top-k ranks; in fp16 it tied experts whose fp32
        # choices differed by 3e-5..7e-4 (tiny-moe palettize6: 3 of 4 parity prompts chose other experts)
        return True
    if kind == "mul" and "rsqrt" in producers:
        return True
    if kind in ("mul", "select") and _feeds_softmax(op):
        return True
    if kind == "linear":
        weight = op.inputs.get("weight")
        if weight is not None and rule_for(weight.name or "") is ROUTER:
            return True
    return False


def fp16_selector(op: Any) -> bool:
    """`FP16ComputePrecision`'s `op_selector`: True casts the op to fp16."""
    return not keep_fp32(op)
