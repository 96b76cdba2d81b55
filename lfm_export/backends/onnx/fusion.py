"""Passes that rewrite the traced graph into onnxruntime contrib ops (`--ops ort`).

Every pass matches a subgraph the canonical model's trace produces, checks what it relies on (constants,
single use of intermediates, attribute values) and otherwise leaves the subgraph untouched, so a pass that
cannot match never changes the output. Each returns how many times it fired.

- `fuse_rms_norm`: `w * x * rsqrt(mean(x^2) + eps)` -> `SimplifiedLayerNormalization` (onnxruntime registers it
  in the ONNX domain; it computes in float32 internally).
- `fuse_skip_rms_norm`: `Add` feeding a SimplifiedLayerNormalization -> `com.microsoft.SkipSimplifiedLayerNormalization`,
  which also returns the sum for the residual stream.
- `fuse_causal_conv`: `Concat(past, Bx) -> Conv(depthwise) ; Slice(last L-1)` -> `com.microsoft.CausalConvWithState`.
- `fuse_gqa`: per-head-normed q/k, rotate-half RoPE, `Concat(past)`, repeat-kv, masked softmax attention ->
  `com.microsoft.GroupQueryAttention` with `do_rotary=1` and cos/sin caches of `max_seq_len` rows, computed in
  the graph from the inverse frequencies (`rope_tables`: onnxruntime folds them when it loads the file).
  onnxruntime's CPU kernel rejects its fused q/k-norm inputs, so the q/k RMSNorms stay in front of it.
  `seqlens_k` / `total_sequence_length` come from `attention_mask` as in onnxruntime-genai, so the mask is
  read as genai writes it: ones, with any padding on the right (and on CPU, batch > 1 only with an empty
  past or one new token).
- `fuse_moe` (MoE models): the dense expert sum -> `com.microsoft.MoE` (interleaved SwiGLU, top-k experts only);
  the router (sigmoid, bias-selected top-k, normalization, scaling) stays in the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from .graph import (
    MS_DOMAIN,
    Emitter,
    const_array,
    int_attr,
    ints_attr,
    only_used_by,
    producer,
    remove_dead_nodes,
    replace_value,
    scalar,
    use_opset,
)

# ---- RMSNorm ------------------------------------------------------------------------------------------------


def _match_rms(mul: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
    """`Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))` -> (x, w, eps)."""
    if mul.op_type != "Mul" or mul.domain != "":
        return None
    for w, normed in (mul.inputs, reversed(mul.inputs)):
        if w is None or w.const_value is None or w.shape is None or w.shape.rank() != 1:
            continue
        inner = producer(normed, "Mul")
        if inner is None or not only_used_by(normed, mul):
            continue
        for x, r in (inner.inputs, reversed(inner.inputs)):
            rec = producer(r, "Reciprocal")
            sqrt = rec and producer(rec.inputs[0], "Sqrt")
            add = sqrt and producer(sqrt.inputs[0], "Add")
            if add is None or not only_used_by(r, inner):
                continue
            for m, e in (add.inputs, reversed(add.inputs)):
                mean = producer(m, "ReduceMean")
                eps = scalar(e)
                if mean is None or eps is None:
                    continue
                pow_ = producer(mean.inputs[0], "Pow")
                if pow_ is None or pow_.inputs[0] is not x or scalar(pow_.inputs[1]) != 2.0:
                    continue
                axes = const_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
                axes = [
                    int(a)
                    for a in np.asarray(axes if axes is not None else ints_attr(mean, "axes") or ()).reshape(
                        -1
                    )
                ]
                last = [x.shape.rank() - 1] if x.shape is not None else [-1]
                if axes not in ([-1], last) or int_attr(mean, "keepdims", 1) != 1:
                    continue
                if x.shape is not None and x.shape[-1] != w.shape[0]:
                    continue
                chain = [
                    (rec.outputs[0], inner),
                    (sqrt.outputs[0], rec),
                    (add.outputs[0], sqrt),
                    (mean.outputs[0], add),
                    (pow_.outputs[0], mean),
                ]
                if all(only_used_by(v, n) for v, n in chain):
                    return x, w, eps
    return None


def fuse_rms_norm(model: ir.Model) -> int:
    graph = model.graph
    count = 0
    for node in list(graph):
        found = _match_rms(node)
        if found is None:
            continue
        x, w, eps = found
        em = Emitter(graph)
        y = em.op1("SimplifiedLayerNormalization", [x, w], {"axis": -1, "epsilon": eps, "stash_type": 1})
        em.insert_before(node)
        replace_value(node.outputs[0], y)
        count += 1
    if count:
        remove_dead_nodes(model)
    return count


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """`s = Add(a, b); SimplifiedLayerNormalization(s)` with `a`, `b` both `[batch, seq, hidden]`."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "SimplifiedLayerNormalization" or node.domain != "":
            continue
        add = producer(node.inputs[0], "Add")
        if add is None or len(node.outputs) > 1 and node.outputs[1].uses():
            continue
        a, b = add.inputs
        if not _same_activation_shape(a, b):
            continue
        eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        em = Emitter(graph)
        y, _, _, total = em.op(
            "SkipSimplifiedLayerNormalization",
            [a, b, node.inputs[1]],
            {"epsilon": eps},
            domain=MS_DOMAIN,
            num_outputs=4,
        )
        em.insert_after(add)
        replace_value(node.outputs[0], y)
        replace_value(add.outputs[0], total)
        count += 1
    if count:
        use_opset(model, MS_DOMAIN, 1)
        remove_dead_nodes(model)
    return count


def _same_activation_shape(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None or a.shape is None or b.shape is None:
        return False
    if a.shape.rank() != 3 or b.shape.rank() != 3:
        return False
    return all(
        isinstance(x, int) and x == y or not isinstance(x, int) and x.value is not None and x == y
        for x, y in zip(a.shape, b.shape)
    )


# ---- short convolution ----------------------------------------------------------------------------------------


def fuse_causal_conv(model: ir.Model) -> int:
    """`z = Concat(past, Bx, axis=time); y = Conv(z, W, group=C); present = Slice(z, -(k-1):)`."""
    graph = model.graph
    count = 0
    for conv in list(graph):
        if conv.op_type != "Conv" or conv.domain != "":
            continue
        cat = producer(conv.inputs[0], "Concat")
        weight = conv.inputs[1]
        w = weight.const_value if weight is not None else None
        if cat is None or w is None or len(w.shape) != 3 or w.shape[1] != 1:
            continue
        channels, _, k = w.shape
        if int_attr(cat, "axis") not in (2, -1) or len(cat.inputs) != 2:
            continue
        past, bx = cat.inputs
        if past is None or not past.is_graph_input() or int_attr(conv, "group", 1) != channels:
            continue
        if any(v != 0 for v in (ints_attr(conv, "pads") or ())) or any(
            v != 1 for v in (ints_attr(conv, "strides") or ()) + (ints_attr(conv, "dilations") or ())
        ):
            continue
        if conv.attributes.get("auto_pad") is not None and conv.attributes["auto_pad"].as_string() not in (
            "NOTSET",
            "",
        ):
            continue
        slices = [u.node for u in cat.outputs[0].uses() if u.node is not conv]
        if len(slices) != 1 or not _is_tail_slice(slices[0], k - 1):
            continue
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if bias is not None:
            b = const_array(bias)
            if b is not None and not b.any():
                bias = None
        em = Emitter(graph)
        y, present = em.op(
            "CausalConvWithState",
            [bx, weight, bias, past],
            {"activation": "none"},
            domain=MS_DOMAIN,
            num_outputs=2,
        )
        em.insert_before(conv)
        replace_value(conv.outputs[0], y)
        replace_value(slices[0].outputs[0], present)
        count += 1
    if count:
        use_opset(model, MS_DOMAIN, 1)
        remove_dead_nodes(model)
    return count


def _is_tail_slice(node: ir.Node, length: int) -> bool:
    """`Slice(z, starts=[-length], ends=[>= big], axes=[2 | -1], steps=[1])`."""
    if node.op_type != "Slice" or node.domain != "":
        return False
    vals = [const_array(v) if v is not None else None for v in node.inputs[1:]]
    while len(vals) < 4:
        vals.append(None)
    starts, ends, axes, steps = vals
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return False
    if axes is not None and int(axes.reshape(-1)[0]) not in (2, -1):
        return False
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return False
    return int(starts.reshape(-1)[0]) == -length and int(ends.reshape(-1)[0]) >= 2**31 - 1


# ---- attention ----------------------------------------------------------------------------------------------


def _transpose_input(value: ir.Value | None, perm: tuple[int, ...]) -> ir.Value | None:
    node = producer(value, "Transpose")
    if node is None or ints_attr(node, "perm") != perm:
        return None
    return node.inputs[0]


def _rope_input(value: ir.Value | None) -> ir.Value | None:
    """`x * cos + cat(-x[..., h:], x[..., :h]) * sin` (cos/sin from Cos/Sin nodes) -> x."""
    add = producer(value, "Add")
    if add is None:
        return None
    m1, m2 = (producer(v, "Mul") for v in add.inputs)
    if m1 is None or m2 is None:
        return None
    for ma, mb in ((m1, m2), (m2, m1)):
        for x, cos in (ma.inputs, reversed(ma.inputs)):
            if producer(cos, "Cos") is None:
                continue
            for rot, sin in (mb.inputs, reversed(mb.inputs)):
                cat = producer(rot, "Concat")
                if cat is None or producer(sin, "Sin") is None or len(cat.inputs) != 2:
                    continue
                neg = producer(cat.inputs[0], "Neg")
                hi = neg and producer(neg.inputs[0], "Slice")
                lo = producer(cat.inputs[1], "Slice")
                if hi is None or lo is None or hi.inputs[0] is not x or lo.inputs[0] is not x:
                    continue
                return x
    return None


def _through_repeat_kv(value: ir.Value | None) -> ir.Value | None:
    """`repeat_interleave(kv, groups, dim=1)` as traced (`Unsqueeze -> Expand -> Reshape`) -> kv."""
    reshape = producer(value, "Reshape")
    expand = reshape and producer(reshape.inputs[0], "Expand")
    unsq = expand and producer(expand.inputs[0], "Unsqueeze")
    return unsq.inputs[0] if unsq is not None else value


def _kv_concat(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    """`Concat(past, new, axis=2)` with `past` a graph input -> (past, new)."""
    cat = producer(value, "Concat")
    if cat is None or int_attr(cat, "axis") not in (2, -2) or len(cat.inputs) != 2:
        return None
    past, new = cat.inputs
    if past is None or not past.is_graph_input():
        return None
    return past, new


class _Attention:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _match_attention(softmax: ir.Node, head_dim: int) -> _Attention | None:
    if softmax.op_type != "Softmax" or softmax.domain != "" or int_attr(softmax, "axis", -1) not in (-1, 3):
        return None
    where = producer(softmax.inputs[0], "Where")
    if where is None:
        return None
    fill = scalar(where.inputs[1])
    if fill is None or not np.isneginf(fill):
        return None
    scaled = producer(where.inputs[2], "Mul")
    if scaled is None:
        return None
    qk = s = None
    for a, b in (scaled.inputs, reversed(scaled.inputs)):
        if producer(a, "MatMul") is not None and scalar(b) is not None:
            qk, s = producer(a, "MatMul"), scalar(b)
    if qk is None or s is None or abs(s - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
        return None
    q_rope, kt = qk.inputs
    present_k = _through_repeat_kv(_transpose_input(kt, (0, 1, 3, 2)))
    k_parts = _kv_concat(present_k)
    if k_parts is None:
        return None
    past_k, k_rope = k_parts
    q_pre = _transpose_input(_rope_input(q_rope), (0, 2, 1, 3))
    k_pre = _transpose_input(_rope_input(k_rope), (0, 2, 1, 3))
    if q_pre is None or k_pre is None:
        return None
    pv = [u.node for u in softmax.outputs[0].uses()]
    if len(pv) != 1 or pv[0].op_type != "MatMul" or pv[0].inputs[0] is not softmax.outputs[0]:
        return None
    present_v = _through_repeat_kv(pv[0].inputs[1])
    v_parts = _kv_concat(present_v)
    if v_parts is None:
        return None
    past_v, v_new = v_parts
    v_heads = _transpose_input(v_new, (0, 2, 1, 3))
    v_reshape = producer(v_heads, "Reshape")
    if v_reshape is None:
        return None
    v_flat = v_reshape.inputs[0]
    out_users = [u.node for u in pv[0].outputs[0].uses()]
    if (
        len(out_users) != 1
        or out_users[0].op_type != "Transpose"
        or ints_attr(out_users[0], "perm") != (0, 2, 1, 3)
    ):
        return None
    reshape_users = [u.node for u in out_users[0].outputs[0].uses()]
    if len(reshape_users) != 1 or reshape_users[0].op_type != "Reshape":
        return None
    return _Attention(
        q=q_pre,
        k=k_pre,
        v=v_flat,
        past_k=past_k,
        past_v=past_v,
        present_k=present_k,
        present_v=present_v,
        out=reshape_users[0].outputs[0],
        anchor=reshape_users[0],
    )


def rope_tables(em: Emitter, head_dim: int, theta: float, max_seq_len: int) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's cos / sin caches `[max_seq_len, head_dim / 2]`, computed in the graph as the
    canonical model computes them (float32 angles `position * inv_freq`, then `Cos` / `Sin`) from the
    `head_dim / 2` inverse frequencies: onnxruntime folds this constant subgraph into the two tables when a
    session is created (any graph optimisation level from basic), so the file holds `head_dim / 2` floats
    instead of `max_seq_len * head_dim` (524,288 bytes at head_dim 64 and 4096 positions; 8.4 MB at 32768).
    onnxruntime's float32 `Cos` / `Sin` differ from torch's by at most one unit in the last place."""
    from lfm_export.model import rope_inv_freq

    i64, f32 = ir.DataType.INT64, ir.DataType.FLOAT
    positions = em.op1(
        "Range",
        [
            em.const(np.array(0, np.int64), "rotary.start"),
            em.const(np.array(max_seq_len, np.int64), "rotary.limit"),
            em.const(np.array(1, np.int64), "rotary.delta"),
        ],
        dtype=i64,
    )
    column = em.op1(
        "Unsqueeze",
        [
            em.op1("Cast", [positions], {"to": f32}, dtype=f32),
            em.const(np.array([1], np.int64), "rotary.axis"),
        ],
        dtype=f32,
    )
    inv_freq = rope_inv_freq(head_dim, theta).numpy()[None, :]
    angles = em.op1("Mul", [column, em.const(inv_freq, "rotary.inv_freq")], dtype=f32)
    cos, sin = em.op1("Cos", [angles], dtype=f32), em.op1("Sin", [angles], dtype=f32)
    cos.name, sin.name = "rotary.cos_cache", "rotary.sin_cache"
    return cos, sin


def fuse_gqa(
    model: ir.Model,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    rope_theta: float,
    max_seq_len: int,
    mask_name: str = "attention_mask",
) -> int:
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == mask_name), None)
    if mask is None:
        return 0
    matches = [m for node in list(graph) if (m := _match_attention(node, head_dim)) is not None]
    if not matches:
        return 0
    em = Emitter(graph)
    one = em.const(np.array([1], np.int64), "gqa.one")
    i64, i32 = ir.DataType.INT64, ir.DataType.INT32
    summed = em.op1("ReduceSum", [mask, one], {"keepdims": 0}, dtype=i64)
    less_one = em.op1("Sub", [summed, em.const(np.array(1, np.int64), "gqa.one_scalar")], dtype=i64)
    seqlens_k = em.op1("Cast", [less_one], {"to": i32}, dtype=i32)
    total = em.op1("Shape", [mask], {"start": 1, "end": 2}, dtype=i64)
    total = em.op1("Cast", [em.op1("Squeeze", [total], dtype=i64)], {"to": i32}, dtype=i32)
    seqlens_k.name, total.name = "gqa.seqlens_k", "gqa.total_sequence_length"
    em.insert_before(graph[0])
    cos_v, sin_v = rope_tables(em, head_dim, rope_theta, max_seq_len)
    flat_shape = em.const(np.array([0, 0, -1], np.int64), "gqa.flat_shape")
    for m in matches:
        q = em.op1("Reshape", [m.q, flat_shape], dtype=m.q.dtype)
        k = em.op1("Reshape", [m.k, flat_shape], dtype=m.k.dtype)
        out, pk, pv = em.op(
            "GroupQueryAttention",
            [q, k, m.v, m.past_k, m.past_v, seqlens_k, total, cos_v, sin_v],
            {
                "num_heads": num_heads,
                "kv_num_heads": kv_heads,
                "do_rotary": 1,
                "rotary_interleaved": 0,
                "scale": float(head_dim**-0.5),
            },
            domain=MS_DOMAIN,
            num_outputs=3,
        )
        em.insert_before(m.anchor)
        replace_value(m.out, out)
        replace_value(m.present_k, pk)
        replace_value(m.present_v, pv)
    use_opset(model, MS_DOMAIN, 1)
    remove_dead_nodes(model)
    return len(matches)


# ---- mixture of experts --------------------------------------------------------------------------------------

MOE_EXPERTS_META = "lfm_export.moe_experts"
"""Node meta key: per-expert `(w1, w3, w2)` weight tensors of a fused MoE node (read by the quantizer)."""
ROUTER_SENTINEL = -1.0e4


def _gemm_weight(value: ir.Value | None) -> tuple[ir.Value, ir.TensorProtocol] | None:
    """`Gemm(x, W, transB=1)` without bias -> (x, W)."""
    node = producer(value, "Gemm")
    if node is None or len(node.inputs) > 2 and node.inputs[2] is not None:
        return None
    attrs = {a.name: a.value for a in node.attributes.values()}
    if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    return node.inputs[0], w.const_value


def _match_expert(value: ir.Value) -> tuple[ir.Value, tuple[ir.TensorProtocol, ...]] | None:
    """`Gemm(silu(Gemm(x, w1)) * Gemm(x, w3), w2)` -> (x, (w1, w3, w2))."""
    down = _gemm_weight(value)
    if down is None:
        return None
    h, w2 = down
    mul = producer(h, "Mul")
    if mul is None:
        return None
    for silu_v, up_v in (mul.inputs, reversed(mul.inputs)):
        silu = producer(silu_v, "Mul")
        up = _gemm_weight(up_v)
        if silu is None or up is None:
            continue
        for g, s in (silu.inputs, reversed(silu.inputs)):
            sig = producer(s, "Sigmoid")
            gate = _gemm_weight(g)
            if sig is None or sig.inputs[0] is not g or gate is None or gate[0] is not up[0]:
                continue
            return gate[0], (gate[1], up[1], w2)
    return None


def _expert_index(node: ir.Node) -> int | None:
    """`Slice(weights, [e], [e + 1], axes=[1 | -1])` -> e."""
    if node.op_type != "Slice" or node.domain != "":
        return None
    vals = [const_array(v) for v in node.inputs[1:]]
    if any(v is None or v.size != 1 for v in vals[:2]):
        return None
    start, end = int(vals[0].reshape(-1)[0]), int(vals[1].reshape(-1)[0])
    axes = int(vals[2].reshape(-1)[0]) if len(vals) > 2 and vals[2] is not None else 0
    steps = int(vals[3].reshape(-1)[0]) if len(vals) > 3 and vals[3] is not None else 1
    if axes not in (1, -1) or steps != 1 or end != start + 1:
        return None
    return start


def _match_moe(scatter: ir.Node, num_experts: int):
    """The dense expert sum over routing weights `w = ScatterElements(zeros, topk_idx, weights)`:
    `acc = 0; acc += w[:, e:e+1] * expert_e(x)` for every e -> (x, k, w, experts, final Add node)."""
    if scatter.op_type != "ScatterElements" or scatter.domain != "":
        return None
    topk = scatter.inputs[1].producer() if scatter.inputs[1] is not None else None
    if topk is None or topk.op_type != "TopK" or scatter.inputs[1] is not topk.outputs[1]:
        return None
    k = const_array(topk.inputs[1])
    if k is None or k.size != 1:
        return None
    weights = scatter.outputs[0]
    terms: dict[int, tuple[ir.Node, ir.Value, tuple[ir.TensorProtocol, ...]]] = {}
    for use in weights.uses():
        e = _expert_index(use.node)
        if e is None:
            continue
        muls = [u.node for u in use.node.outputs[0].uses()]
        if len(muls) != 1 or muls[0].op_type != "Mul":
            return None
        other = next(v for v in muls[0].inputs if v is not use.node.outputs[0])
        expert = _match_expert(other)
        if expert is None or e in terms:
            return None
        terms[e] = (muls[0], expert[0], expert[1])
    if sorted(terms) != list(range(num_experts)):
        return None
    x = terms[0][1]
    if any(t[1] is not x for t in terms.values()):
        return None
    # the accumulation: a chain of Adds, one term each, starting from a zero tensor
    term_values = {id(t[0].outputs[0]) for t in terms.values()}
    acc = last = None
    seen = 0
    adds = [u.node for t in terms.values() for u in t[0].outputs[0].uses()]
    if len(adds) != num_experts or any(a.op_type != "Add" for a in adds):
        return None
    start = [a for a in adds if not any(v is not None and v.producer() in adds for v in a.inputs)]
    if len(start) != 1:
        return None
    acc = start[0]
    zero = next(v for v in acc.inputs if id(v) not in term_values)
    zero_src = producer(zero, "Expand")
    z = const_array(zero_src.inputs[0]) if zero_src is not None else const_array(zero)
    if z is None or z.any():
        return None
    while acc is not None:
        seen += 1
        last = acc
        users = [u.node for u in acc.outputs[0].uses()]
        nxt = [u for u in users if u in adds]
        if len(nxt) > 1 or (nxt and len(users) != 1):
            return None
        acc = nxt[0] if nxt else None
    if seen != num_experts:
        return None
    experts = [terms[e][2] for e in range(num_experts)]
    return x, int(k.reshape(-1)[0]), weights, experts, last


def lazy_stack(
    tensors: list[ir.TensorProtocol],
    interleave: list[ir.TensorProtocol] | None = None,
) -> ir.LazyTensor:
    """`stack(tensors)` `[E, N, K]`, or with `interleave`, rows alternating `tensors[e][i]`, `interleave[e][i]`
    (`[E, 2N, K]`, MoE's interleaved SwiGLU layout); built only when written."""
    n, k = tensors[0].shape
    rows = 2 * n if interleave is not None else n

    def make() -> ir.TensorProtocol:
        out = np.empty((len(tensors), rows, k), tensors[0].dtype.numpy())
        for e, t in enumerate(tensors):
            if interleave is None:
                out[e] = t.numpy()
            else:
                out[e, 0::2] = t.numpy()
                out[e, 1::2] = interleave[e].numpy()
        return ir.tensor(out)

    return ir.LazyTensor(make, dtype=tensors[0].dtype, shape=ir.Shape([len(tensors), rows, k]))


def fuse_moe(model: ir.Model, num_experts: int) -> int:
    """Dense expert form -> `com.microsoft.MoE` (SwiGLU, interleaved fc1 `[E, 2F, H]`, fc2 `[E, H, F]`).

    The op only knows softmax-over-top-k routing, so it is fed `log(w)` at the selected experts and a large
    negative value elsewhere (`w` = the traced routing weights, already normalized and scaled): the softmax of
    the k selected entries is `w / sum(w)`, and the output is multiplied by `sum(w)` to give back `w`.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        found = _match_moe(node, num_experts)
        if found is None:
            continue
        x, k, weights, experts, last = found
        layer = _layer_prefix(experts[0])
        em = Emitter(graph)
        tiny = em.const(np.array(1e-30, np.float32), "moe.tiny")
        f32 = ir.DataType.FLOAT
        log_w = em.op1("Log", [em.op1("Max", [weights, tiny], dtype=f32)], dtype=f32)
        picked = em.op1(
            "Greater", [weights, em.const(np.array(0.0, np.float32), "moe.zero")], dtype=ir.DataType.BOOL
        )
        sentinel = em.const(np.array(ROUTER_SENTINEL, np.float32), "moe.sentinel")
        router = em.op1("Where", [picked, log_w, sentinel], dtype=f32)
        scale = em.op1(
            "ReduceSum",
            [weights, em.const(np.array([-1], np.int64), "moe.last_axis")],
            {"keepdims": 1},
            dtype=f32,
        )
        fc1 = em.const(lazy_stack([w[0] for w in experts], [w[1] for w in experts]), f"{layer}.experts.fc1")
        fc2 = em.const(lazy_stack([w[2] for w in experts]), f"{layer}.experts.fc2")
        moe_node_out = em.op(
            "MoE",
            [x, router, fc1, None, fc2],
            {
                "k": k,
                "activation_type": "swiglu",
                "swiglu_fusion": 1,
                "activation_alpha": 1.0,
                "activation_beta": 0.0,
                "normalize_routing_weights": 1,
            },
            domain=MS_DOMAIN,
            dtype=x.dtype,
        )[0]
        em.nodes[-1].meta[MOE_EXPERTS_META] = experts
        out = em.op1("Mul", [moe_node_out, scale], dtype=x.dtype)
        em.insert_before(last)
        replace_value(last.outputs[0], out)
        count += 1
    if count:
        use_opset(model, MS_DOMAIN, 1)
        remove_dead_nodes(model)
    return count


def _layer_prefix(weights: tuple[ir.TensorProtocol, ...]) -> str:
    name = weights[0].name or ""
    return name.split(".experts.")[0] if ".experts." in name else "moe"


# ---- all of them ----------------------------------------------------------------------------------------------


def apply_ort_fusions(model: ir.Model, cfg: Any, max_seq_len: int) -> dict[str, int]:
    """Run every fusion in order; returns how often each fired (`cfg` is an `Lfm2Config`)."""
    fired = {"SimplifiedLayerNormalization": fuse_rms_norm(model)}
    fired["SkipSimplifiedLayerNormalization"] = fuse_skip_rms_norm(model)
    fired["CausalConvWithState"] = fuse_causal_conv(model)
    fired["GroupQueryAttention"] = fuse_gqa(
        model,
        num_heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        max_seq_len=max_seq_len,
    )
    if cfg.is_moe:
        fired["MoE"] = fuse_moe(model, cfg.num_experts)
    return fired
