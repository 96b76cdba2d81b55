"""Weight precision for the traced graph: block-wise int4/int8, float16, and float weight layout.

Linear layers reach this pass as `MatMul(x, Transpose(W))` (or `Gemm(x, W, transB=1)` where the input is 2-D,
as in the MoE experts) with `W` the checkpoint's `[out, in]` tensor (a view of the torch weight). That layout is exactly what block-wise quantization along the input dimension wants, so
no transposed float copy is ever made for int4/int8; for float recipes the transposed weight is an
`ir.LazyTensor` computed while saving, one tensor at a time.

Quantization: `lfm_export.quant.quantize_weight` (every rounding choice is documented there), one weight at a
time; this module only packs its codes into the op forms below.

Op forms:
- `ort`: `com.microsoft.MatMulNBits` (B `[N, blocks, block_size * bits / 8]`, first code in the lowest bits:
  `pack_codes`; 2, 4 or 8 bits, what onnxruntime 1.32's CPU kernel takes; 2 only in a `--budget` mix); the embedding is
  `com.microsoft.GatherBlockQuantized` over the same packed table as a tied lm_head (only its scales are stored
  twice, `[V, blocks, 1]`), or over its own table when untied. A fused `com.microsoft.MoE` becomes `QMoE`
  with the same per-expert packing. Linears that read the same activation (q/k/v; w1/w3) become one
  MatMulNBits over their weights concatenated along N, followed by a Split (`_shared_input_groups`).
- `portable`: `DequantizeLinear(block_size=...)` (opset 21) of a `[in, out]` int4/int8 tensor into `MatMul`;
  the embedding is `Gather` of int8 rows and their scales + `DequantizeLinear` (ONNX `Gather` takes no int4).
  onnxruntime rewrites `DequantizeLinear + MatMul` into MatMulNBits itself, at the accuracy level of its
  session option `session.qdq_matmulnbits_accuracy_level` (default 4).
- Each weight's bits are `lfm_export.precision.held_as` of its initializer's name (the checkpoint's), the
  lm_head's of `lm_head.weight` (its weight may be the tied embedding table): the lm_head and the embedding
  table at the recipe's `head_bits` / `embedding_bits` (None keeps them float), the MoE router float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lfm_export.precision import block_as, held_as
from lfm_export.quant import Quantized, pack_nibbles, quantize_weight
from lfm_export.recipes import Recipe

from .fusion import MOE_EXPERTS_META
from .graph import MS_DOMAIN, Emitter, add_initializer, producer, replace_value, use_opset
from .recipes import ORT, OnnxRecipe

FUSED_COUNT = "MatMulNBits sharing an input, fused along N"
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
"""The embedding table's checkpoint name, which `lfm_export.precision` answers for the table `find_embedding`
finds (the graph input's `Gather`)."""


# ---- packing -------------------------------------------------------------------------------------------------


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes packed along the last axis, first code in the lowest bits of each byte
    (MatMulNBits' and GatherBlockQuantized's layout: 4 bits two a byte, 2 bits four a byte; 8 bits as they are),
    a short last byte padded with 0."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 4:
        return pack_nibbles(codes)
    if bits != 2:
        raise ValueError(f"MatMulNBits packs 2, 4 or 8 bits, not {bits}")
    per = 8 // bits
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], -1)
    groups = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(groups.shape[:-1], np.uint8)
    for i in range(per):
        out |= groups[..., i] << (bits * i)
    return out


def matmulnbits_tensors(q: Quantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B `[N, blocks, blob]`, scales `[N, blocks]`, packed zero points or None) for `MatMulNBits`."""
    n, k = q.codes.shape
    nb = k // q.block_size
    b = pack_codes(q.codes.reshape(n, nb, q.block_size), q.bits)
    zp = None if q.zero_points is None else pack_codes(q.zero_points, q.bits)
    return b, q.scales, zp


# ---- graph -----------------------------------------------------------------------------------------------------


@dataclass
class Linear:
    """`MatMul(x, Transpose(W))` (`transpose` set) or `Gemm(x, W, transB=1)` (2-D `x`, as the MoE experts trace)."""

    matmul: ir.Node
    transpose: ir.Node | None
    weight: ir.Value

    @property
    def name(self) -> str:
        return (self.weight.name or "weight").removesuffix(".weight")


@dataclass
class Handling:
    embedding: str = "float32 Gather"
    lm_head: str = "float32 MatMul"
    counts: dict[str, int] = field(default_factory=dict)


def find_linears(graph: ir.Graph) -> list[Linear]:
    """`MatMul(x, Transpose(W, perm=[1, 0]))` or bias-free `Gemm(x, W, transB=1)`, `W` a 2-D float initializer."""
    out = []
    for node in graph:
        if node.domain != "":
            continue
        t = None
        if node.op_type == "MatMul":
            t = producer(node.inputs[1], "Transpose")
            perm = t.attributes.get("perm") if t is not None else None
            if t is None or (perm is not None and list(perm.as_ints()) != [1, 0]):
                continue
            w = t.inputs[0]
        elif node.op_type == "Gemm" and _plain_gemm(node):
            w = node.inputs[1]
        else:
            continue
        if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        if w.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        out.append(Linear(node, t, w))
    return out


def _plain_gemm(node: ir.Node) -> bool:
    attrs = node.attributes
    get = lambda k, d: attrs[k].value if k in attrs else d  # noqa: E731
    no_bias = len(node.inputs) < 3 or node.inputs[2] is None
    return no_bias and get("transA", 0) == 0 and get("transB", 0) == 1 and get("alpha", 1.0) == 1.0


def find_embedding(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and node.inputs[1] is not None:
            table = node.inputs[0]
            if table is not None and table.is_initializer() and node.inputs[1].name == "input_ids":
                return node
    return None


def apply_precision(model: ir.Model, recipe: OnnxRecipe) -> Handling:
    """Rewrite linears and the embedding for `recipe`; returns how embedding and lm_head were handled."""
    graph = model.graph
    linears = find_linears(graph)
    gather = find_embedding(graph)
    lm_head = next((lin for lin in linears if lin.matmul.outputs[0].is_graph_output()), None)
    extra: dict[str, int] = {}
    if recipe.quant == "fp16":
        extra = to_float16(model)
    if recipe.quantized:
        handling = _quantize(model, recipe, linears, gather, lm_head)
    else:
        handling = _float_layout(model, linears, gather, lm_head)
    handling.counts.update(extra)
    return handling


def _float_layout(
    model: ir.Model, linears: list[Linear], gather: ir.Node | None, lm_head: Linear | None
) -> Handling:
    graph = model.graph
    handling = Handling()
    dtype = "float16" if any(lin.weight.dtype == ir.DataType.FLOAT16 for lin in linears) else "float32"
    handling.embedding = f"{dtype} Gather"
    handling.lm_head = f"{dtype} MatMul"
    gemms = 0
    for lin in linears:
        if lin.transpose is None:
            continue  # Gemm(transB=1) reads W as stored
        shared = any(u.node is not lin.transpose for u in lin.weight.uses())
        if shared:
            _tied_gemm(graph, lin)
            gemms += 1
            if lin is lm_head:
                handling.lm_head = f"{dtype} Gemm(transB=1) on the embedding table (tied, stored once)"
        else:
            value = add_initializer(graph, lazy_transposed(lin.weight.const_value), f"{lin.weight.name}.T")
            lin.matmul.replace_input_with(1, value)
    _drop_unused_initializers(graph)
    if gemms:
        handling.counts["Gemm(transB) for tied weights"] = gemms
    return handling


def _tied_gemm(graph: ir.Graph, lin: Linear) -> None:
    """`x [..., K] @ W^T` as `Reshape -> Gemm(transB=1) -> Reshape`: W stays `[N, K]`, shared with the Gather."""
    em = Emitter(graph)
    x = lin.matmul.inputs[0]
    n, k = lin.weight.const_value.shape
    lead = em.op1("Shape", [x], {"start": 0, "end": -1})
    flat = em.op1("Reshape", [x, em.const(np.array([-1, k], np.int64), "gemm.flat_shape")])
    y = em.op1("Gemm", [flat, lin.weight], {"transB": 1})
    shape = em.op1("Concat", [lead, em.const(np.array([n], np.int64), "gemm.out_dim")], {"axis": 0})
    out = em.op1("Reshape", [y, shape])
    em.insert_before(lin.matmul)
    replace_value(lin.matmul.outputs[0], out)


def lazy_transposed(src: ir.TensorProtocol) -> ir.LazyTensor:
    """`src.T` materialised only when the tensor is written."""
    rows, cols = src.shape

    def make() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(src.numpy().T))

    return ir.LazyTensor(make, dtype=src.dtype, shape=ir.Shape([cols, rows]))


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)


# ---- float16 ---------------------------------------------------------------------------------------------------

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def to_float16(model: ir.Model) -> dict[str, int]:
    """Weights, state and activations to float16; logits cast back to float32 at the output.

    Activations are the float values computed from a weight or a state input. Float values computed from
    integers or constants only (rotary angles, masks) stay float32 and are cast where they meet an
    activation, as the canonical model's `.to(x.dtype)` does. Nodes the canonical model runs in float32
    stay float32: the RMSNorm statistics (`x^2` overflows float16 beyond |x| = 256; fused
    SimplifiedLayerNormalization already computes in float32), the attention softmax and the MoE router.
    """
    graph = model.graph
    fp32_nodes = _float32_islands(graph)
    act: set[int] = set()
    for value in graph.inputs:
        if value.dtype == ir.DataType.FLOAT:
            act.add(id(value))
    params = 0
    for value in graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT and is_weight(value):
            value.const_value = lazy_cast(value.const_value, np.float16)
            value.type = ir.TensorType(ir.DataType.FLOAT16)
            act.add(id(value))
            params += 1
    for node in graph:
        if node in fp32_nodes:
            continue
        if any(v is not None and id(v) in act for v in node.inputs):
            for out in node.outputs:
                if out.dtype in (ir.DataType.FLOAT, None) and _float_output(node, out):
                    act.add(id(out))
    casts: dict[tuple[int, ir.DataType], ir.Value] = {}
    for node in list(graph):
        if node in fp32_nodes:
            want, convert = (
                ir.DataType.FLOAT,
                [i for i, v in enumerate(node.inputs) if v is not None and id(v) in act],
            )
        elif any(v is not None and id(v) in act for v in node.inputs):
            want = ir.DataType.FLOAT16
            convert = [
                i
                for i, v in enumerate(node.inputs)
                if v is not None and id(v) not in act and v.dtype == ir.DataType.FLOAT
            ]
            if node.op_type == "Cast" and node.attributes["to"].as_int() == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
        else:
            continue
        for i in convert:
            node.replace_input_with(i, _cast(graph, node.inputs[i], want, casts))
    for node in graph:
        for out in node.outputs:
            if id(out) in act:
                out.type = ir.TensorType(ir.DataType.FLOAT16)
            elif out.dtype == ir.DataType.FLOAT and not out.is_graph_output():
                out.type = None
    for value in graph.inputs:
        if id(value) in act:
            value.type = ir.TensorType(ir.DataType.FLOAT16)
    logits = graph.outputs[0]
    em = Emitter(graph)
    as_f32 = em.op1("Cast", [logits], {"to": ir.DataType.FLOAT})
    em.insert_after(logits.producer())
    name, shape = logits.name, logits.shape
    graph.outputs[0] = as_f32
    logits.name = f"{name}_float16"
    as_f32.name, as_f32.shape, as_f32.type = name, shape, ir.TensorType(ir.DataType.FLOAT)
    return {"float16 weights": params, "float32 islands (nodes)": len(fp32_nodes)}


def lazy_cast(src: ir.TensorProtocol, dtype: type) -> ir.LazyTensor:
    def make() -> ir.TensorProtocol:
        return ir.tensor(src.numpy().astype(dtype))

    return ir.LazyTensor(make, dtype=ir.DataType.from_numpy(np.dtype(dtype)), shape=ir.Shape(src.shape.dims))


def is_weight(value: ir.Value) -> bool:
    """A model parameter (checkpoint name) as opposed to a constant the trace computed. The MoE expert bias
    is a float32 buffer that only feeds the float32 router."""
    name = value.name or ""
    return name.startswith(("model.", "lm_head.")) and not name.endswith("expert_bias")


_FLOAT32_SIDE_OUTPUTS = {
    ("", "SimplifiedLayerNormalization"): (1,),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (1, 2),
}


def _float_output(node: ir.Node, out: ir.Value) -> bool:
    if node.op_type in (
        "Shape",
        "Size",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "IsInf",
        "IsNaN",
    ):
        return False
    if node.op_type == "Cast":
        return node.attributes["to"].as_int() in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    if node.op_type == "TopK" and out is node.outputs[1]:
        return False
    side = _FLOAT32_SIDE_OUTPUTS.get((node.domain, node.op_type), ())
    return out.index() not in side


def _float32_islands(graph: ir.Graph) -> set[ir.Node]:
    """Nodes kept in float32: unfused RMSNorm statistics, softmax, MoE router scores."""
    from .fusion import _match_rms

    keep: set[ir.Node] = set()
    for node in graph:
        found = _match_rms(node)
        if found is not None:
            x = found[0]
            todo = [
                v.producer()
                for v in node.inputs
                if v is not None and v.producer() is not None and v.producer().op_type == "Mul"
            ]
            while todo:
                n = todo.pop()
                keep.add(n)
                todo.extend(
                    v.producer()
                    for v in n.inputs
                    if v is not None and v is not x and v.producer() is not None and v.producer() not in keep
                )
        elif node.op_type == "Softmax":
            keep.add(node)
        elif node.op_type == "Sigmoid" and any(
            u.node.op_type in ("TopK", "Add", "GatherElements") for u in node.outputs[0].uses()
        ):
            keep.add(node)
    return keep


def _cast(
    graph: ir.Graph, value: ir.Value, dtype: ir.DataType, cache: dict[tuple[int, ir.DataType], ir.Value]
) -> ir.Value:
    key = (id(value), dtype)
    if key in cache:
        return cache[key]
    np_dtype = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
    if value.const_value is not None and not value.is_graph_input():
        new = add_initializer(
            graph,
            lazy_cast(value.const_value, np_dtype),
            f"{value.name or 'const'}_{np.dtype(np_dtype).name}",
        )
    else:
        em = Emitter(graph)
        new = em.op1("Cast", [value], {"to": dtype})
        new.type = ir.TensorType(dtype)
        anchor = value.producer()
        if anchor is None:
            em.insert_before(graph[0])
        else:
            em.insert_after(anchor)
    cache[key] = new
    return new


# ---- int4 / int8 -----------------------------------------------------------------------------------------------


def _checkpoint_name(lin: Linear, lm_head: Linear | None) -> str:
    """The checkpoint name `lfm_export.precision` is asked about for `lin`: its initializer's, or
    `lm_head.weight` for the lm_head (whose weight is the embedding table's when they are tied)."""
    return "lm_head.weight" if lin is lm_head else lin.weight.name or ""


def _quantize(
    model: ir.Model, recipe: OnnxRecipe, linears: list[Linear], gather: ir.Node | None, lm_head: Linear | None
) -> Handling:
    graph = model.graph
    bits = recipe.bits
    assert bits is not None
    handling = Handling()
    counts = handling.counts
    kind = f"int{bits} b{recipe.block_size} {'symmetric' if recipe.symmetric else 'asymmetric'}"
    ort = recipe.ops == ORT
    linear_op = "MatMulNBits" if ort else "DequantizeLinear+MatMul"
    embedding_bits = held_as(EMBEDDING_WEIGHT, recipe.recipe)  # the table `find_embedding` found by its place
    for node in list(graph):
        if node.op_type == "MoE" and node.domain == MS_DOMAIN and MOE_EXPERTS_META in node.meta:
            _qmoe(graph, node, recipe)
            counts["QMoE"] = counts.get("QMoE", 0) + 1
    tied_table: tuple[ir.Value, Quantized] | None = None
    shared = _shared_input_groups(linears, lm_head, recipe.recipe) if ort else {}
    pending: dict[int, list[tuple[Linear, Quantized]]] = {}
    for lin in linears:
        lin_bits = held_as(_checkpoint_name(lin, lm_head), recipe.recipe)
        if lin_bits is None and lin is not lm_head:
            _float_layout_one(graph, lin)
            counts["MoE router kept float"] = counts.get("MoE router kept float", 0) + 1
            continue
        if lin_bits is None:
            _float_layout_one(graph, lin)
            handling.lm_head = "float32 MatMul (the recipe keeps the lm_head float)"
            continue
        w = lin.weight.const_value.numpy()
        block = block_as(_checkpoint_name(lin, lm_head), recipe.recipe, w.shape[-1])
        q = quantize_weight(w, recipe.recipe, lin_bits, block=block)
        group = shared.get(id(lin))
        if group is not None:
            members = pending.setdefault(id(group[0]), [])
            members.append((lin, q))
            if len(members) == len(group):
                _matmulnbits_fused(graph, members, recipe)
                counts[linear_op] = counts.get(linear_op, 0) + 1
                counts[FUSED_COUNT] = counts.get(FUSED_COUNT, 0) + len(members)
                del pending[id(group[0])]
            continue
        if ort:
            b_value = _matmulnbits(graph, lin, q, recipe)
            if (
                gather is not None
                and gather.inputs[0] is lin.weight
                and lin_bits == embedding_bits
                and q.block_size == block_as(EMBEDDING_WEIGHT, recipe.recipe, q.codes.shape[1])
            ):
                tied_table = (b_value, q)
        else:
            _dq_matmul(graph, lin, q)
        counts[linear_op] = counts.get(linear_op, 0) + 1
        if lin is lm_head:
            handling.lm_head = f"{'MatMulNBits' if ort else 'DequantizeLinear + MatMul'} {kind.replace(f'int{bits}', f'int{lin_bits}')}"
    if gather is not None and embedding_bits is not None:
        tied = lm_head is not None and lm_head.weight is gather.inputs[0]
        if ort:
            handling.embedding = _gather_block_quantized(model, gather, recipe, tied_table)
            counts["GatherBlockQuantized"] = 1
            if tied_table is not None:
                handling.lm_head += " (tied: its packed table also feeds GatherBlockQuantized)"
        else:
            handling.embedding = _gather_dequantize(graph, gather, recipe)
            counts["Gather+DequantizeLinear"] = 1
            if tied:
                handling.lm_head += " (tied: stored transposed beside the int8 embedding table)"
    if ort:
        use_opset(model, MS_DOMAIN, 1)
    _drop_unused_initializers(graph)
    return handling


def _qmoe(graph: ir.Graph, node: ir.Node, recipe: OnnxRecipe) -> None:
    """`MoE` -> `QMoE`: every expert's interleaved fc1 `[2F, H]` and fc2 `[H, F]` quantized like MatMulNBits."""
    prefix = (node.inputs[2].name or "moe").removesuffix(".fc1")
    first = f"{prefix}.0.w1.weight"
    bits = held_as(first, recipe.recipe)  # every expert's, as the first's (QMoE takes one bits and block)
    assert bits is not None
    hidden = node.meta[MOE_EXPERTS_META][0][0].shape[1]
    block = block_as(first, recipe.recipe, hidden)
    packed: dict[str, list[np.ndarray]] = {k: [] for k in ("b1", "s1", "z1", "b2", "s2", "z2")}
    for w1, w3, w2 in node.meta[MOE_EXPERTS_META]:
        f, h = w1.shape
        fc1 = np.empty((2 * f, h), np.float32)
        fc1[0::2], fc1[1::2] = w1.numpy(), w3.numpy()
        for tag, w in (("1", fc1), ("2", w2.numpy())):
            b, sc, zp = matmulnbits_tensors(quantize_weight(w, recipe.recipe, bits, block=block))
            packed["b" + tag].append(b.reshape(b.shape[0], -1))
            packed["s" + tag].append(sc)
            if zp is not None:
                packed["z" + tag].append(zp)
    em = Emitter(graph)
    v = {k: em.const(np.stack(a), f"{prefix}.{k}") for k, a in packed.items() if a}
    inputs = [
        node.inputs[0],
        node.inputs[1],
        v["b1"],
        v["s1"],
        None,
        v["b2"],
        v["s2"],
        None,
        None,
        None,
        None,
        v.get("z1"),
        v.get("z2"),
    ]
    while inputs[-1] is None:
        inputs.pop()
    attrs = {a.name: a.value for a in node.attributes.values()}
    attrs.update(expert_weight_bits=bits, block_size=block, accuracy_level=recipe.accuracy_level)
    y = em.op1("QMoE", inputs, attrs, domain=MS_DOMAIN)
    em.insert_before(node)
    replace_value(node.outputs[0], y)
    graph.remove(node, safe=True)


def _float_layout_one(graph: ir.Graph, lin: Linear) -> None:
    if lin.transpose is None:
        return
    value = add_initializer(graph, lazy_transposed(lin.weight.const_value), f"{lin.weight.name}.T")
    lin.matmul.replace_input_with(1, value)


def _matmulnbits(graph: ir.Graph, lin: Linear, q: Quantized, recipe: OnnxRecipe) -> ir.Value:
    em = Emitter(graph)
    y, b_v = _emit_matmulnbits(em, lin.matmul.inputs[0], q, lin.name, recipe)
    em.insert_before(lin.matmul)
    replace_value(lin.matmul.outputs[0], y)
    return b_v


def _emit_matmulnbits(
    em: Emitter, x: ir.Value | None, q: Quantized, name: str, recipe: OnnxRecipe
) -> tuple[ir.Value, ir.Value]:
    """`MatMulNBits(x, q)` with initializers named after `name`; returns (output, packed-weight value)."""
    n, k = q.codes.shape
    b, scales, zp = matmulnbits_tensors(q)
    b_v = em.const(b, f"{name}.qweight")
    inputs = [x, b_v, em.const(scales, f"{name}.scales")]
    if zp is not None:
        inputs.append(em.const(zp, f"{name}.qzeros"))
    y = em.op1(
        "MatMulNBits",
        inputs,
        {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": recipe.accuracy_level},
        domain=MS_DOMAIN,
    )
    return y, b_v


def _shared_input_groups(
    linears: list[Linear], lm_head: Linear | None, recipe: Recipe
) -> dict[int, list[Linear]]:
    """Linears that read the same activation (q/k/v after the operator norm, w1/w3 after the FFN norm),
    keyed by `id(linear)`: each group becomes one MatMulNBits over the weights concatenated along N and a
    Split, so a decode step makes one kernel call per group instead of one per weight.

    onnxruntime 1.32 also has `MatMulNBitsQkv` / `MatMulNBitsMlp`, but only the WebGPU provider runs them."""
    by_input: dict[tuple[int, int | None, int], list[Linear]] = {}
    for lin in linears:
        name = _checkpoint_name(lin, lm_head)
        bits = held_as(name, recipe)
        if lin is lm_head or bits is None:
            continue
        block = block_as(name, recipe, lin.weight.const_value.shape[1])  # one op holds one precision
        by_input.setdefault((id(lin.matmul.inputs[0]), bits, block), []).append(lin)
    out: dict[int, list[Linear]] = {}
    for group in by_input.values():
        if len(group) > 1 and len({lin.weight.const_value.shape[1] for lin in group}) == 1:
            out.update({id(lin): group for lin in group})
    return out


def _matmulnbits_fused(graph: ir.Graph, members: list[tuple[Linear, Quantized]], recipe: OnnxRecipe) -> None:
    qs = [q for _, q in members]
    zps = None if qs[0].zero_points is None else np.concatenate([q.zero_points for q in qs])  # type: ignore[misc]
    q = Quantized(
        np.concatenate([q.codes for q in qs]),
        np.concatenate([q.scales for q in qs]),
        zps,
        qs[0].bits,
        qs[0].block_size,
    )
    names = [lin.name for lin, _ in members]
    name = names[0].rsplit(".", 1)[0] + "." + "+".join(x.rsplit(".", 1)[-1] for x in names)
    em = Emitter(graph)
    y, _ = _emit_matmulnbits(em, members[0][0].matmul.inputs[0], q, name, recipe)
    sizes = em.const(np.array([mq.codes.shape[0] for mq in qs], np.int64), f"{name}.split")
    parts = em.op("Split", [y, sizes], {"axis": -1}, num_outputs=len(members))
    position = {id(node): i for i, node in enumerate(graph)}
    first = min((lin.matmul for lin, _ in members), key=lambda node: position[id(node)])
    em.insert_before(first)
    for (lin, _), part in zip(members, parts):
        replace_value(lin.matmul.outputs[0], part)


def _dq_matmul(graph: ir.Graph, lin: Linear, q: Quantized) -> None:
    """`DequantizeLinear(W^T [K, N] int, scales [K/bs, N], axis=0, block_size)` -> `MatMul`."""
    codes_t = np.ascontiguousarray(q.codes.T)
    scales_t = np.ascontiguousarray(q.scales.T)
    zp_t = None if q.zero_points is None else np.ascontiguousarray(q.zero_points.T)
    em = Emitter(graph)
    inputs = [
        em.const(_int_tensor(codes_t, q.bits, zp_t is None), f"{lin.name}.qweight"),
        em.const(scales_t, f"{lin.name}.scales"),
    ]
    if zp_t is not None:
        inputs.append(em.const(_int_tensor(zp_t, q.bits, False), f"{lin.name}.qzeros"))
    w = em.op1("DequantizeLinear", inputs, {"axis": 0, "block_size": q.block_size})
    y = em.op1("MatMul", [lin.matmul.inputs[0], w])
    em.insert_before(lin.matmul)
    replace_value(lin.matmul.outputs[0], y)


def _int_tensor(codes: np.ndarray, bits: int, signed: bool) -> ir.TensorProtocol:
    """Unsigned codes as an ONNX int4/uint4/int8/uint8 tensor; `signed` shifts by the implicit zero point."""
    half = 2 ** (bits - 1)
    if bits == 8:
        return ir.tensor((codes.astype(np.int16) - half).astype(np.int8) if signed else codes)
    nibbles = (codes ^ half) if signed else codes
    packed = pack_nibbles(nibbles.reshape(-1))
    dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
    return ir.PackedTensor(packed, dtype, shape=ir.Shape(list(codes.shape)))


def _gather_block_quantized(
    model: ir.Model, gather: ir.Node, recipe: OnnxRecipe, shared: tuple[ir.Value, Quantized] | None
) -> str:
    """`GatherBlockQuantized(B [V, blocks, blob], ids, scales [V, blocks, 1])` -> Reshape `[..., H]`."""
    graph = model.graph
    table = gather.inputs[0]
    v, h = table.const_value.shape
    em = Emitter(graph)
    if shared is not None:
        b_v, q = shared
        how = "shares the tied lm_head's packed MatMulNBits table"
    else:
        w = table.const_value.numpy()
        q = quantize_weight(
            w,
            recipe.recipe,
            held_as(EMBEDDING_WEIGHT, recipe.recipe),
            block=block_as(EMBEDDING_WEIGHT, recipe.recipe, w.shape[1]),
        )
        b, _, _ = matmulnbits_tensors(q)
        b_v = em.const(b, "model.embed_tokens.qweight")
        how = "own table"
    inputs = [b_v, gather.inputs[1], em.const(q.scales[..., None], "model.embed_tokens.scales")]
    if q.zero_points is not None:
        inputs.append(em.const(q.zero_points[..., None], "model.embed_tokens.qzeros"))
    rows = em.op1(
        "GatherBlockQuantized",
        inputs,
        {"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 2},
        domain=MS_DOMAIN,
    )
    lead = em.op1("Shape", [gather.inputs[1]])
    shape = em.op1("Concat", [lead, em.const(np.array([h], np.int64), "embed.hidden")], {"axis": 0})
    out = em.op1("Reshape", [rows, shape])
    em.insert_before(gather)
    replace_value(gather.outputs[0], out)
    sym = "symmetric" if recipe.symmetric else "asymmetric"
    return f"GatherBlockQuantized int{q.bits} b{q.block_size} {sym} ({how})"


def _gather_dequantize(graph: ir.Graph, gather: ir.Node, recipe: OnnxRecipe) -> str:
    """Portable: int8 rows and their scales gathered, then `DequantizeLinear(axis=-1, block_size)`."""
    table = gather.inputs[0]
    w = table.const_value.numpy()
    q = quantize_weight(w, recipe.recipe, 8, block=block_as(EMBEDDING_WEIGHT, recipe.recipe, w.shape[1]))
    em = Emitter(graph)
    ids = gather.inputs[1]
    rows = em.op1(
        "Gather",
        [em.const(_int_tensor(q.codes, 8, q.zero_points is None), "model.embed_tokens.qweight"), ids],
        {"axis": 0},
    )
    scales = em.op1("Gather", [em.const(q.scales, "model.embed_tokens.scales"), ids], {"axis": 0})
    inputs = [rows, scales]
    if q.zero_points is not None:
        inputs.append(
            em.op1("Gather", [em.const(q.zero_points, "model.embed_tokens.qzeros"), ids], {"axis": 0})
        )
    out = em.op1("DequantizeLinear", inputs, {"axis": -1, "block_size": q.block_size})
    em.insert_before(gather)
    replace_value(gather.outputs[0], out)
    sym = "symmetric" if recipe.symmetric else "asymmetric"
    return f"Gather + DequantizeLinear int8 b{q.block_size} {sym} (ONNX Gather takes no int4)"
