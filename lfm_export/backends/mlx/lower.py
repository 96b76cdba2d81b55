"""Lowering of a traced program (`torch.export`, the canonical model's static-KV form) to MLX operations.

`MlxProgram.run` walks the program's graph node by node and calls, for each aten op, the MLX function of
`OPS`: one table, written for the op set the canonical model traces to (no decomposition: `torch.export`'s
training IR of `lfm_export.model` uses 40 aten ops, `linear`, `conv1d`, `embedding`, `index_copy`, `topk` among
them). An op not in the table is an error naming it, before anything runs. Run on MLX arrays under
`mx.export_function`, the calls are what the `.mlxfn` file records: the program is lowered, not rewritten.

Weights are bound by the program's parameter names. A weight held quantized (`QuantizedWeight`, MLX's affine
format) turns `aten.linear` into `mx.quantized_matmul` and `aten.embedding` into a row gather plus
`mx.dequantize`; a float weight goes through `mx.matmul` / `mx.take`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from lfm_export.contract.errors import UnsupportedError

DTYPES = {
    "torch.float32": mx.float32,
    "torch.float16": mx.float16,
    "torch.bfloat16": mx.bfloat16,
    "torch.int64": mx.int64,
    "torch.int32": mx.int32,
    "torch.bool": mx.bool_,
}


@dataclass(frozen=True)
class QuantizedWeight:
    """A `[N, K]` weight in MLX's affine format: `w = scales * q + biases` per group of `group_size` along K,
    `q` unsigned `bits`-bit codes packed low bits first into uint32 `[N, K * bits / 32]`."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    def dequantize(self) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)


@dataclass(frozen=True)
class ExpertWeight:
    """Expert `index` of a stacked `[E, ...]` MoE tensor (float `mx.array` or `QuantizedWeight` of stacks)."""

    stack: Any
    index: int

    def value(self) -> Any:
        s = self.stack
        if isinstance(s, QuantizedWeight):
            i = self.index
            return QuantizedWeight(s.weight[i], s.scales[i], s.biases[i], s.group_size, s.bits)
        return s[self.index]


def _stack(weights: Sequence[Any]) -> Any:
    """The stacked tensor behind experts 0..E-1 of one layer (`ExpertWeight`s of one stack, in order)."""
    first = weights[0]
    if not (
        all(isinstance(w, ExpertWeight) and w.stack is first.stack for w in weights)
        and [w.index for w in weights] == list(range(len(weights)))
    ):
        raise UnsupportedError("MLX lowering: switch_glu needs the experts of one stacked tensor, in order")
    return first.stack


def _gather_linear(x: mx.array, w: Any, idx: mx.array) -> mx.array:
    if isinstance(w, QuantizedWeight):
        return mx.gather_qmm(
            x,
            w.weight,
            w.scales,
            w.biases,
            rhs_indices=idx,
            transpose=True,
            group_size=w.group_size,
            bits=w.bits,
        )
    if w.dtype != mx.float32:
        # MLX 0.32's CPU GatherMM takes float32 only; a float32 product of half inputs rounded once is what a
        # half matmul with float32 accumulation gives (torch's and MLX's bf16 matmul: equal to it, measured).
        # It casts the layer's whole expert stack per call: fp16 / bf16 MoE decode pays that on the CPU.
        f32 = mx.float32
        y = mx.gather_mm(x.astype(f32), mx.swapaxes(w, -1, -2).astype(f32), rhs_indices=idx)
        return y.astype(x.dtype)
    return mx.gather_mm(x, mx.swapaxes(w, -1, -2), rhs_indices=idx)


def _switch_glu(x: mx.array, idx: mx.array, w: mx.array, w1s: Any, w3s: Any, w2s: Any) -> mx.array:
    """`backends/mlx/moe.py`'s op: each token through its k experts only (`gather_qmm` / `gather_mm`)."""
    xe = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H]
    idx = idx.astype(mx.uint32)
    g = _gather_linear(xe, _stack(w1s), idx)  # [N, k, 1, F]
    u = _gather_linear(xe, _stack(w3s), idx)
    y = _gather_linear(_silu(g) * u, _stack(w2s), idx)  # [N, k, 1, H]
    return (y.squeeze(-2) * w[..., None]).sum(axis=-2)


def _sigmoid(x: mx.array) -> mx.array:
    """In float32, rounded once to `x`'s type: torch's CPU sigmoid on fp16 / bf16 does that; MLX's own bf16
    sigmoid is up to 1 ulp off it (0.0039 near 1, measured)."""
    return mx.sigmoid(x.astype(mx.float32)).astype(x.dtype)


def _silu(x: mx.array) -> mx.array:
    """`x * sigmoid(x)` in float32, rounded once (as torch's silu; two bf16 roundings would differ by 1/2 ulp)."""
    xf = x.astype(mx.float32)
    return (xf * mx.sigmoid(xf)).astype(x.dtype)


def _dtype(value: Any) -> Any:
    if value is None:
        return None
    key = str(value)
    if key not in DTYPES:
        raise UnsupportedError(f"MLX lowering: dtype {key} has no MLX counterpart")
    return DTYPES[key]


def _axis(x: mx.array, dim: int) -> int:
    return dim % x.ndim


# ---- one function per aten op ----------------------------------------------------------------------------------


def _linear(x: mx.array, w: Any, b: mx.array | None = None) -> mx.array:
    if isinstance(w, ExpertWeight):
        w = w.value()
    if isinstance(w, QuantizedWeight):
        y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, True, w.group_size, w.bits)
    else:
        y = mx.matmul(x, mx.swapaxes(w, 0, 1))
    return y if b is None else y + b


def _embedding(w: Any, ids: mx.array, *_: Any) -> mx.array:
    flat = ids.reshape(-1)
    if isinstance(w, QuantizedWeight):
        rows = mx.dequantize(
            mx.take(w.weight, flat, axis=0),
            mx.take(w.scales, flat, axis=0),
            mx.take(w.biases, flat, axis=0),
            w.group_size,
            w.bits,
        )
    else:
        rows = mx.take(w, flat, axis=0)
    return rows.reshape(*ids.shape, rows.shape[-1])


def _conv1d(
    x: mx.array,
    w: mx.array,
    b: mx.array | None = None,
    stride: Sequence[int] = (1,),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    groups: int = 1,
) -> mx.array:
    """torch layout in and out (`x [B, C, L]`, `w [C_out, C_in / groups, K]`); MLX convolves channels-last."""
    y = mx.conv1d(
        mx.swapaxes(x, 1, 2),
        mx.swapaxes(w, 1, 2),
        stride=stride[0],
        padding=padding[0],
        dilation=dilation[0],
        groups=groups,
    )
    y = mx.swapaxes(y, 1, 2)
    return y if b is None else y + b[None, :, None]


def _slice(
    x: mx.array, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1
) -> mx.array:
    axis = _axis(x, dim)
    size = x.shape[axis]
    lo, hi, st = slice(start, end, step).indices(size)
    index = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi, st)
    return x[tuple(index)]


def _select(x: mx.array, dim: int, idx: int) -> mx.array:
    index: list[Any] = [slice(None)] * x.ndim
    index[_axis(x, dim)] = idx
    return x[tuple(index)]


def _chunk(x: mx.array, chunks: int, dim: int = 0) -> list[mx.array]:
    axis = _axis(x, dim)
    size = math.ceil(x.shape[axis] / chunks)
    return mx.split(x, list(range(size, x.shape[axis], size)), axis=axis)


def _index_copy(x: mx.array, dim: int, index: mx.array, source: mx.array) -> mx.array:
    """`x` with `source`'s slices along `dim` written at positions `index` (a put along the axis)."""
    axis = _axis(x, dim)
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    idx = mx.broadcast_to(index.reshape(shape), source.shape)
    return mx.put_along_axis(x, idx, source, axis=axis)


def _topk(x: mx.array, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> tuple:
    """Values and indices of the `k` largest along `dim`, largest first (torch's order; ties may pick
    other indices than torch: with float routing scores they do not occur in practice)."""
    axis = _axis(x, dim)
    key = -x if largest else x
    idx = mx.argsort(key, axis=axis)
    idx = _slice(idx, axis, 0, k)
    return mx.take_along_axis(x, idx, axis=axis), idx


def _arange(*args: Any, dtype: Any = None, **_: Any) -> mx.array:
    return mx.arange(*args, dtype=_dtype(dtype) or mx.int64)


def _to(x: mx.array, dtype: Any = None, *_: Any, **__: Any) -> mx.array:
    return x if dtype is None else x.astype(_dtype(dtype))


def _softmax(x: mx.array, dim: int, half_to_float: bool = False) -> mx.array:
    return mx.softmax(x, axis=dim, precise=True)


def _mean(x: mx.array, dims: Sequence[int] | None, keepdim: bool = False, **_: Any) -> mx.array:
    return mx.mean(x, axis=None if dims is None else list(dims), keepdims=keepdim)


def _sum(x: mx.array, dims: Sequence[int] | None, keepdim: bool = False, **_: Any) -> mx.array:
    return mx.sum(x, axis=None if dims is None else list(dims), keepdims=keepdim)


def _pow(x: Any, e: Any) -> mx.array:
    if not isinstance(x, mx.array):  # pow.Scalar: a number to a tensor power
        return mx.power(mx.array(x, dtype=e.dtype), e)
    return mx.square(x) if e == 2 else mx.power(x, e)


def _add(a: Any, b: Any, alpha: float = 1) -> Any:
    return a + (b if alpha == 1 else b * alpha)


OPS: dict[str, Callable[..., Any]] = {
    "aten.sym_size.int": lambda x, d: x.shape[d],
    "aten._assert_tensor_metadata.default": lambda *a, **k: None,
    "aten.arange.default": _arange,
    "aten.arange.start_step": _arange,
    "aten.reshape.default": lambda x, s: mx.reshape(x, list(s)),
    "aten.view.default": lambda x, s: mx.reshape(x, list(s)),
    "aten.select.int": _select,
    "aten.slice.Tensor": _slice,
    "aten.unsqueeze.default": lambda x, d: mx.expand_dims(x, d if d >= 0 else d + x.ndim + 1),
    "aten.transpose.int": lambda x, a, b: mx.swapaxes(x, a, b),
    "aten.cat.default": lambda xs, dim=0: mx.concatenate(list(xs), axis=dim),
    "aten.chunk.default": _chunk,
    "aten.to.dtype": _to,
    "aten.add.Tensor": _add,
    "aten.mul.Tensor": lambda a, b: a * b,
    "aten.div.Tensor": lambda a, b: a / b,
    "aten.neg.default": lambda x: -x,
    "aten.pow.Scalar": _pow,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.reciprocal.default": mx.reciprocal,
    "aten.rsqrt.default": mx.rsqrt,
    "aten.cos.default": mx.cos,
    "aten.sin.default": mx.sin,
    "aten.sigmoid.default": _sigmoid,
    "aten.silu.default": _silu,
    "aten.mean.dim": _mean,
    "aten.sum.dim_IntList": _sum,
    "aten.softmax.int": _softmax,
    "aten.le.Tensor": lambda a, b: a <= b,
    "aten.bitwise_not.default": mx.logical_not,
    "aten.masked_fill.Scalar": lambda x, m, v: mx.where(m, mx.array(v, dtype=x.dtype), x),
    "aten.repeat_interleave.self_int": lambda x, r, dim=None, output_size=None: mx.repeat(x, r, axis=dim),
    "aten.matmul.default": mx.matmul,
    "aten.linear.default": _linear,
    "aten.embedding.default": _embedding,
    "aten.conv1d.default": _conv1d,
    "aten.index_copy.default": _index_copy,
    "aten.lift_fresh_copy.default": lambda x: x,  # a program constant's copy: MLX arrays are immutable
    "aten.topk.default": _topk,
    "aten.gather.default": lambda x, dim, idx, sparse_grad=False: mx.take_along_axis(x, idx, axis=dim),
    "aten.scatter.src": lambda x, dim, idx, src: mx.put_along_axis(x, idx, src, axis=dim),
    "aten.zeros_like.default": lambda x, **k: (
        mx.zeros_like(x) if k.get("dtype") is None else mx.zeros(x.shape, dtype=_dtype(k["dtype"]))
    ),
    "lfm_mlx.switch_glu.default": _switch_glu,
    "getitem": operator.getitem,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
}
"""aten op (`str(node.target)`; Python's `operator` functions by name) -> the MLX function computing it."""


def _constant(t: Any) -> mx.array:
    """A torch tensor constant as an MLX array of the same type (through float32 for the half types, exact)."""
    dtype = _dtype(t.dtype)
    return mx.array(t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()).astype(dtype)


def op_name(target: Any) -> str:
    if getattr(target, "__module__", None) == "_operator":
        return target.__name__
    return str(target)


class MlxProgram:
    """An exported program ready to run on MLX arrays: its parameters by name (`param_names`), its user
    inputs in order, its outputs in order. Construction checks every op against `OPS`.

    The program's tensor constants (`rope_inv_freq`, computed in float64 and held as a float32 constant) are
    MLX arrays of the same values and type, held here: an exported function records them as constants."""

    def __init__(self, program: Any) -> None:
        self.graph = program.graph_module.graph
        self.params: dict[str, str] = {}  # placeholder -> state-dict name
        self.constants: dict[str, mx.array] = {}  # placeholder -> value
        self.user_inputs: list[str] = []
        for spec in program.graph_signature.input_specs:
            if spec.kind.name == "USER_INPUT":
                self.user_inputs.append(spec.arg.name)
            elif spec.kind.name == "CONSTANT_TENSOR":
                self.constants[spec.arg.name] = _constant(program.constants[spec.target])
            else:
                self.params[spec.arg.name] = spec.target
        unknown = sorted({op_name(n.target) for n in self.graph.nodes if n.op == "call_function"} - set(OPS))
        if unknown:
            raise UnsupportedError(f"MLX lowering: no MLX function for {', '.join(unknown)}")

    @property
    def param_names(self) -> list[str]:
        return list(self.params.values())

    def run(self, inputs: Sequence[mx.array], params: Mapping[str, Any]) -> list[mx.array]:
        """The program's outputs for user `inputs` (in order) and `params` (state-dict name -> mx array or
        `QuantizedWeight`)."""
        env: dict[str, Any] = dict(zip(self.user_inputs, inputs))
        env.update(self.constants)
        for placeholder, name in self.params.items():
            env[placeholder] = params[name]

        def value(a: Any) -> Any:
            if hasattr(a, "name") and hasattr(a, "op"):
                return env[a.name]
            if isinstance(a, (list, tuple)):
                return type(a)(value(v) for v in a)
            return a

        for node in self.graph.nodes:
            if node.op == "call_function":
                fn = OPS[op_name(node.target)]
                env[node.name] = fn(*value(node.args), **{k: value(v) for k, v in node.kwargs.items()})
            elif node.op == "output":
                return list(value(node.args[0]))
        raise RuntimeError("graph without an output node")
