"""A reference interpreter for Core ML ML Programs, in numpy: a component of its own, used by the Core ML
runtime shim where Core ML cannot run (Linux) and by the Core ML backend to check what it saved.

It reads a saved `.mlpackage` as Core ML would, its spec and its weight file (coremltools' milproto loader,
`MLModel(path, skip_model_load=True)`; nothing of the converter's in-memory program is used), and evaluates
the main function op by op, with the model's states (`read_state` / `coreml_update_state`).

Precision: every op's result is rounded to the dtype its output declares (fp16 where the program says fp16,
so fp16 overflow to inf and fp16 rounding show as they would on a device); inside one op the arithmetic is
float32 (matmul, linear and conv accumulate in float32, as Core ML's CPU and GPU fp16 kernels do; the Neural
Engine's accumulation is not documented). Compressed weights (`constexpr_blockwise_shift_scale`,
`constexpr_lut_to_dense`) are decoded once, at load, by this module's own code.

Ops: `OPS` lists the ones it knows, each tested against torch or numpy in `tests/test_coreml_interpreter.py`.
A program with any other op is refused at load with `UnsupportedOpError` naming the op.

It is a checking tool, not a fast runtime: about 600 ops per call on `tiny`, each a numpy call (measured in
the README's Core ML section).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError

DTYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


class UnsupportedOpError(UserError):
    """A program uses an op the interpreter does not implement."""


def import_coremltools() -> Any:
    """`coremltools`, imported quietly. On import coremltools 9.0 logs that torch 2.13 "has not been tested with
    coremltools ... Torch 2.7.0 is the most recent version that has been tested" (conversion works, see the
    README), that scikit-learn 1.9 is above its sklearn converter's range (not used here) and, on Linux, that
    `libcoremlpython` is missing (it is macOS-only); it imports torchao when installed, whose import logs a torch
    `_pytree` deprecation. Its converters draw tqdm progress bars (`QUIET_PROGRESS` turns them off)."""
    import functools
    import importlib
    import logging

    for name in ("coremltools", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import coremltools
        from tqdm import tqdm
    except ImportError as e:
        raise UserError(
            f"the Core ML backend needs coremltools ({e}); pip install 'lfm-export[coreml]'"
        ) from None
    quiet = functools.partial(tqdm, disable=True)
    for module, attr in QUIET_PROGRESS:
        try:
            setattr(importlib.import_module(module), attr, quiet)
        except ImportError:
            pass
    return coremltools


QUIET_PROGRESS = (
    ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
    ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
    ("coremltools.optimize.coreml._post_training_quantization", "tqdm"),
)
"""coremltools modules that draw progress bars, and the name they call tqdm by."""


def _f32(x: np.ndarray) -> np.ndarray:
    """float32 working copy of a float array (ints and bools unchanged)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x


def _axes(axes: Any, rank: int) -> tuple[int, ...]:
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


# ---- elementwise ---------------------------------------------------------------------------------------------


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def op(x: Any, y: Any) -> np.ndarray:
        return fn(_f32(x), _f32(y))

    return op


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def op(x: Any) -> np.ndarray:
        return fn(_f32(x))

    return op


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _rsqrt(x: Any, epsilon: Any = 1e-12) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(_f32(x) + np.float32(epsilon))


def _pow(x: Any, y: Any) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.power(_f32(x), _f32(y))


def _real_div(x: Any, y: Any) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(_f32(x), _f32(y))


def _floor_div(x: Any, y: Any) -> np.ndarray:
    return np.floor_divide(x, y)


def _select(cond: Any, a: Any, b: Any) -> np.ndarray:
    return np.where(np.asarray(cond).astype(bool), _f32(a), _f32(b))


def _cast(x: Any, dtype: str) -> np.ndarray:
    return np.asarray(x).astype(DTYPES[str(dtype)])


def _clip(x: Any, alpha: Any, beta: Any) -> np.ndarray:
    return np.clip(_f32(x), np.float32(alpha), np.float32(beta))


# ---- reductions, normalisation -------------------------------------------------------------------------------


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def op(x: Any, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
        x = _f32(x)
        ax = tuple(range(x.ndim)) if axes is None else _axes(axes, x.ndim)
        return fn(x, axis=ax, keepdims=bool(keep_dims))

    return op


def _softmax(x: Any, axis: Any = -1) -> np.ndarray:
    x = _f32(x)
    ax = int(axis)
    m = np.max(x, axis=ax, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return e / np.sum(e, axis=ax, keepdims=True)


# ---- linear algebra ------------------------------------------------------------------------------------------


def _linear(x: Any, weight: Any, bias: Any = None) -> np.ndarray:
    out = np.matmul(_f32(x), _f32(weight).T)
    return out if bias is None else out + _f32(bias)


def _matmul(x: Any, y: Any, transpose_x: Any = False, transpose_y: Any = False) -> np.ndarray:
    a, b = _f32(x), _f32(y)
    if bool(transpose_x):
        a = np.swapaxes(a, -1, -2)
    if bool(transpose_y):
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


def _conv(
    x: Any,
    weight: Any,
    bias: Any = None,
    strides: Any = None,
    pad_type: Any = "valid",
    pad: Any = None,
    dilations: Any = None,
    groups: Any = 1,
) -> np.ndarray:
    """1-D convolution `x [N, C_in, L]`, `weight [C_out, C_in / groups, K]` (the only rank LFM2 uses)."""
    x, w = _f32(x), _f32(weight)
    if x.ndim != 3:
        raise UnsupportedOpError(f"conv: only 1-D convolutions are implemented, got input rank {x.ndim}")
    stride = int(np.atleast_1d(strides if strides is not None else [1])[0])
    dil = int(np.atleast_1d(dilations if dilations is not None else [1])[0])
    k = w.shape[2]
    if str(pad_type) == "custom":
        lo, hi = (int(p) for p in np.atleast_1d(pad)[:2])
    elif str(pad_type) == "valid":
        lo = hi = 0
    elif str(pad_type) == "same":
        total = max((math.ceil(x.shape[2] / stride) - 1) * stride + (k - 1) * dil + 1 - x.shape[2], 0)
        lo, hi = total // 2, total - total // 2
    else:
        raise UnsupportedOpError(f"conv: pad_type {pad_type!r} is not implemented")
    x = np.pad(x, ((0, 0), (0, 0), (lo, hi)))
    g = int(groups)
    n, cin, length = x.shape
    cout = w.shape[0]
    span = (k - 1) * dil + 1
    lout = (length - span) // stride + 1
    # windows [N, C_in, L_out, K]
    idx = np.arange(lout)[:, None] * stride + np.arange(k)[None, :] * dil
    win = x[:, :, idx]
    win = win.reshape(n, g, cin // g, lout, k)
    wg = w.reshape(g, cout // g, cin // g, k)
    out = np.einsum("ngclk,gock->ngol", win, wg, optimize=True).reshape(n, cout, lout)
    if bias is not None:
        out = out + _f32(bias)[None, :, None]
    return out


# ---- shapes and indexing -------------------------------------------------------------------------------------


def _reshape(x: Any, shape: Any) -> np.ndarray:
    return np.reshape(x, tuple(int(s) for s in np.atleast_1d(shape)))


def _transpose(x: Any, perm: Any) -> np.ndarray:
    return np.transpose(x, tuple(int(p) for p in perm))


def _expand_dims(x: Any, axes: Any) -> np.ndarray:
    x = np.asarray(x)
    rank = x.ndim + len(np.atleast_1d(axes))
    for a in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, a)
    return x


def _squeeze(x: Any, axes: Any = None) -> np.ndarray:
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


def _concat(values: list[Any], axis: Any, interleave: Any = False) -> np.ndarray:
    if bool(interleave):
        raise UnsupportedOpError("concat: interleave=True is not implemented")
    arrays = [np.asarray(v) for v in values]
    if any(a.dtype.kind == "f" for a in arrays):
        arrays = [_f32(a) for a in arrays]
    return np.concatenate(arrays, axis=int(axis))


def _split(x: Any, axis: Any, num_splits: Any = None, split_sizes: Any = None) -> tuple[np.ndarray, ...]:
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    if split_sizes is not None:
        cuts = np.cumsum([int(s) for s in np.atleast_1d(split_sizes)])[:-1]
        return tuple(np.split(x, cuts, axis=ax))
    return tuple(np.split(x, int(num_splits), axis=ax))


def _slices(
    shape: tuple[int, ...],
    begin: Any,
    end: Any,
    stride: Any = None,
    begin_mask: Any = None,
    end_mask: Any = None,
    squeeze_mask: Any = None,
) -> tuple[tuple[slice | int, ...], list[int]]:
    rank = len(shape)
    begin = [int(b) for b in np.atleast_1d(begin)]
    end = [int(e) for e in np.atleast_1d(end)]
    stride = [1] * rank if stride is None else [int(s) for s in np.atleast_1d(stride)]
    bmask = [False] * rank if begin_mask is None else [bool(m) for m in np.atleast_1d(begin_mask)]
    emask = [False] * rank if end_mask is None else [bool(m) for m in np.atleast_1d(end_mask)]
    smask = [False] * rank if squeeze_mask is None else [bool(m) for m in np.atleast_1d(squeeze_mask)]
    index: list[slice | int] = []
    squeezed = []
    for d in range(rank):
        if smask[d]:
            index.append(begin[d] % shape[d])
            squeezed.append(d)
            continue
        b = None if bmask[d] else begin[d]
        e = None if emask[d] else end[d]
        index.append(slice(b, e, stride[d]))
    return tuple(index), squeezed


def _slice_by_index(x: Any, begin: Any, end: Any, **masks: Any) -> np.ndarray:
    x = np.asarray(x)
    index, _ = _slices(x.shape, begin, end, **masks)
    return x[index]


def _slice_by_size(x: Any, begin: Any, size: Any) -> np.ndarray:
    x = np.asarray(x)
    index = tuple(
        slice(int(b), None if int(s) == -1 else int(b) + int(s))
        for b, s in zip(np.atleast_1d(begin), np.atleast_1d(size), strict=True)
    )
    return x[index]


def _slice_update(x: Any, update: Any, begin: Any, end: Any, **masks: Any) -> np.ndarray:
    out = np.array(x, copy=True)
    index, squeezed = _slices(out.shape, begin, end, **masks)
    target_shape = out[index].shape
    out[index] = np.asarray(update).reshape(target_shape).astype(out.dtype)
    return out


def _gather(
    x: Any, indices: Any, axis: Any = 0, batch_dims: Any = 0, validate_indices: Any = False
) -> np.ndarray:
    if int(batch_dims) != 0:
        raise UnsupportedOpError("gather: batch_dims != 0 is not implemented")
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take(x, idx, axis=ax)


def _gather_along_axis(x: Any, indices: Any, axis: Any = 0, validate_indices: Any = False) -> np.ndarray:
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take_along_axis(x, idx, axis=ax)


def _scatter_along_axis(
    data: Any, indices: Any, updates: Any, axis: Any = 0, mode: Any = "update", validate_indices: Any = False
) -> np.ndarray:
    out = np.array(_f32(data), copy=True)
    ax = int(axis) % out.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + out.shape[ax], idx)
    upd = _f32(updates)
    if str(mode) == "update":
        np.put_along_axis(out, idx, upd, axis=ax)
    elif str(mode) == "add":
        grid = list(np.indices(idx.shape, sparse=True))
        grid[ax] = idx
        np.add.at(out, tuple(grid), upd)
    else:
        raise UnsupportedOpError(f"scatter_along_axis: mode {mode!r} is not implemented")
    return out


def _topk(
    x: Any,
    k: Any = 1,
    axis: Any = -1,
    ascending: Any = False,
    sort: Any = True,
    return_indices: Any = True,
    output_indices_dtype: Any = "int32",
) -> tuple[np.ndarray, np.ndarray]:
    x = _f32(x)
    ax = int(axis) % x.ndim
    order = np.argsort(x if bool(ascending) else -x, axis=ax, kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=ax)
    return np.take_along_axis(x, idx, axis=ax), idx.astype(DTYPES[str(output_indices_dtype)])


def _tile(x: Any, reps: Any) -> np.ndarray:
    return np.tile(x, tuple(int(r) for r in np.atleast_1d(reps)))


def _range_1d(start: Any, end: Any, step: Any) -> np.ndarray:
    dtype = np.result_type(np.asarray(start), np.asarray(end), np.asarray(step))
    return np.arange(np.asarray(start).item(), np.asarray(end).item(), np.asarray(step).item()).astype(dtype)


def _shape(x: Any) -> np.ndarray:
    return np.asarray(np.shape(x), dtype=np.int32)


def _fill(shape: Any, value: Any = 0.0) -> np.ndarray:
    return np.full(tuple(int(s) for s in np.atleast_1d(shape)), value)


def _identity(x: Any) -> np.ndarray:
    return np.asarray(x)


# ---- compressed weights (decoded at load) --------------------------------------------------------------------


def _expand_blocks(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block tensor (`small.shape[i]` divides `shape[i]`) to `shape`."""
    out = np.asarray(small)
    for axis, (s, n) in enumerate(zip(out.shape, shape, strict=True)):
        if n % s:
            raise UnsupportedOpError(f"block shape {out.shape} does not divide {shape}")
        if s != n:
            out = np.repeat(out, n // s, axis=axis)
    return out


def constexpr_blockwise_shift_scale(data: Any, scale: Any, offset: Any = None) -> np.ndarray:
    """iOS 18: `(data - offset) * scale`, `scale` / `offset` of the same rank as `data`, one value per block."""
    data = np.asarray(data)
    q = data.astype(np.float32)
    if offset is not None:
        q = q - _expand_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return q * _expand_blocks(_f32(scale), data.shape)


def constexpr_lut_to_dense(indices: Any, lut: Any, vector_axis: Any = None) -> np.ndarray:
    """iOS 18: `lut [*blocks, 2^bits, vector_size]`; each block of `indices` (one LUT per block) looks up its
    entries. Scalar palettes (vector_size 1) only."""
    idx = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    if lut.shape[-1] != 1:
        raise UnsupportedOpError("constexpr_lut_to_dense: vector palettization is not implemented")
    table = lut[..., 0]  # [*blocks, 2^bits]
    blocks = table.shape[:-1]
    grid = [np.arange(n) // (n // b) for n, b in zip(idx.shape, blocks, strict=True)]
    mesh = np.ix_(*grid)
    return table[(*mesh, idx)]


CONSTEXPR: dict[str, Callable[..., np.ndarray]] = {
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": constexpr_lut_to_dense,
}

OPS: dict[str, Callable[..., Any]] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _real_div,
    "floor_div": _floor_div,
    "pow": _pow,
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_not": lambda x: np.logical_not(x),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "select": _select,
    "cast": _cast,
    "clip": _clip,
    "rsqrt": _rsqrt,
    "sqrt": _unary(np.sqrt),
    "exp": _unary(np.exp),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tanh": _unary(np.tanh),
    "abs": _unary(np.abs),
    "sigmoid": _unary(_sigmoid),
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "softmax": _softmax,
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": _reshape,
    "transpose": _transpose,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "concat": _concat,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "gather": _gather,
    "gather_along_axis": _gather_along_axis,
    "scatter_along_axis": _scatter_along_axis,
    "topk": _topk,
    "tile": _tile,
    "range_1d": _range_1d,
    "shape": _shape,
    "fill": _fill,
    "identity": _identity,
}
"""Every op the interpreter evaluates (besides `const`, the constexpr ops and the state ops)."""
STATE_OPS = ("read_state", "coreml_update_state")


# ---- the program ---------------------------------------------------------------------------------------------


@dataclass
class _Step:
    kind: str
    fn: Callable[..., Any] | None
    consts: dict[str, Any]
    refs: dict[str, str | list[str | None]]
    outputs: list[tuple[str, Any]]  # (name, numpy dtype or None)
    const_list: dict[str, list[Any]] = field(default_factory=dict)


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    try:
        return types.nptype_from_builtin(var.dtype)
    except Exception:  # noqa: BLE001 - non-tensor vars (strings, tuples) have no numpy dtype
        return None


class Program:
    """The main function of a saved ML Program, ready to run: `make_state()`, then `predict(inputs, state)`."""

    def __init__(self, path: Path, spec: Any, function: Any, opset: str, decode: bool = True) -> None:
        self.path = path
        self.decode = decode
        self.spec_version = int(spec.specificationVersion)
        self.opset = opset
        self.inputs = [i.name for i in spec.description.input]
        self.outputs = [o.name for o in spec.description.output]
        self.states = [s.name for s in spec.description.state]
        self.function_inputs = list(function.inputs)
        self.state_shapes: dict[str, tuple[int, ...]] = {}
        self.state_dtypes: dict[str, Any] = {}
        for name in self.states:
            if name not in function.inputs:
                raise UserError(f"{path}: state {name!r} is declared but the program does not take it")
            var = function.inputs[name]
            self.state_shapes[name] = tuple(int(d) for d in var.shape)
            self.state_dtypes[name] = _np_dtype(var)
        self.input_dtypes = {n: _np_dtype(function.inputs[n]) for n in self.inputs if n in function.inputs}
        self._op_types = Counter(op.op_type for op in function.operations)
        unknown = sorted(
            t
            for t in self._op_types
            if t not in OPS and t not in CONSTEXPR and t not in STATE_OPS and t != "const"
        )
        if unknown:
            raise UnsupportedOpError(
                f"{path}: the Core ML interpreter does not implement op(s) {', '.join(unknown)}"
            )
        self._values: dict[str, Any] = {}
        self._steps: list[_Step] = []
        self._state_vars: dict[str, str] = {}  # program var name -> state name
        self._reads: Counter[str] = Counter()
        self._writes: Counter[str] = Counter()
        for name in self.states:
            self._state_vars[function.inputs[name].name] = name
        self._compile(function)
        self._output_vars = [v.name for v in function.outputs]

    # -- building --
    def _const_value(self, var: Any) -> Any:
        if var.name in self._values:
            return self._values[var.name]
        val = var.val
        if val is None:
            return None
        return np.asarray(val) if isinstance(val, np.ndarray | np.generic) else val

    def _compile(self, function: Any) -> None:
        for op in function.operations:
            kind = op.op_type
            if not self.decode and (kind == "const" or kind in CONSTEXPR):
                self._values[op.outputs[0].name] = None  # structure only: never run
                continue
            if kind == "const":
                value = self._const_value(op.outputs[0])
                if isinstance(value, np.ndarray) and value.dtype == np.float16 and value.size > 64:
                    value = value.astype(np.float32)  # exact; spares a conversion per use
                self._values[op.outputs[0].name] = value
                continue
            if kind in CONSTEXPR:
                args = {k: self._const_value(v) for k, v in op.inputs.items()}
                out = CONSTEXPR[kind](**args).astype(_np_dtype(op.outputs[0]) or np.float32)
                self._values[op.outputs[0].name] = out.astype(np.float32) if out.dtype == np.float16 else out
                continue
            consts: dict[str, Any] = {}
            refs: dict[str, Any] = {}
            for key, var in op.inputs.items():
                if isinstance(var, list | tuple):
                    refs[key] = [None if self._is_const(v) else v.name for v in var]
                    consts[key] = [self._const_value(v) if self._is_const(v) else None for v in var]
                elif self._is_const(var):
                    consts[key] = self._const_value(var)
                else:
                    refs[key] = var.name
            if kind == "read_state":
                self._reads[self._state_vars.get(op.inputs["input"].name, op.inputs["input"].name)] += 1
            if kind == "coreml_update_state":
                self._writes[self._state_vars.get(op.inputs["state"].name, op.inputs["state"].name)] += 1
            outputs = [(o.name, _np_dtype(o)) for o in op.outputs]
            self._steps.append(_Step(kind, OPS.get(kind), consts, refs, outputs))

    def _is_const(self, var: Any) -> bool:
        if var.name in self._values:
            return True
        producer = var.op
        if producer is None:
            return False
        return producer.op_type == "const" or producer.op_type in CONSTEXPR

    # -- facts --
    def op_counts(self) -> dict[str, int]:
        return dict(sorted(self._op_types.items()))

    def state_access(self, name: str) -> tuple[int, int]:
        """How many `read_state` and `coreml_update_state` ops read / write state `name`."""
        return self._reads[name], self._writes[name]

    # -- running --
    def make_state(self) -> dict[str, np.ndarray]:
        """Fresh states, zero-filled (what `MLModel.make_state()` gives)."""
        return {n: np.zeros(self.state_shapes[n], dtype=self.state_dtypes[n]) for n in self.states}

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the main function on `inputs`; `state` is read and updated in place."""
        if not self.decode:
            raise RuntimeError(f"{self.path}: loaded with decode=False (structure only), cannot run")
        env: dict[str, Any] = {}
        for name in self.inputs:
            if name not in inputs:
                raise UserError(f"{self.path}: missing input {name!r}")
            env[name] = np.asarray(inputs[name]).astype(self.input_dtypes.get(name) or np.float32)
        for var_name, state_name in self._state_vars.items():
            env[var_name] = state_name
        for step in self._steps:
            args = dict(step.consts)
            for key, ref in step.refs.items():
                if isinstance(ref, list):
                    args[key] = [
                        env[r] if r is not None else c for r, c in zip(ref, step.consts[key], strict=True)
                    ]
                else:
                    args[key] = env[ref]
            if step.kind == "read_state":
                name = args["input"]
                result: Any = state[name].copy()
            elif step.kind == "coreml_update_state":
                name = args["state"]
                state[name][...] = np.asarray(args["value"]).astype(state[name].dtype)
                result = state[name].copy()
            else:
                assert step.fn is not None
                result = step.fn(**args)
            results = result if isinstance(result, tuple) else (result,)
            for (out_name, dtype), value in zip(step.outputs, results, strict=True):
                value = np.asarray(value)
                if dtype is not None and value.dtype != dtype:
                    with np.errstate(over="ignore", invalid="ignore"):
                        value = value.astype(dtype)
                env[out_name] = value
        return {name: env[var] for name, var in zip(self.outputs, self._output_vars, strict=True)}


def load_program(path: str | Path, decode: bool = True) -> Program:
    """Read a saved `.mlpackage` (its spec and weight file) into a runnable `Program`. `decode=False` reads
    the structure only (states, inputs, op counts, state access): the compressed weights are not decoded to
    float32, which for `random:lfm2-1.2b` int4 would hold 4.7 GB (the export's read-back check uses this)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such Core ML package")
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    try:
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise UserError(f"{path}: not an ML Program (model type {spec.WhichOneof('Type')})")
        prog = load(
            spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf / weight-file errors of a corrupt package
        raise UserError(
            f"{path}: cannot read the Core ML package ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if "main" not in prog.functions:
        raise UserError(f"{path}: the program has no main function")
    function = prog.functions["main"]
    opset = str(getattr(function, "opset_version", ""))
    return Program(path, spec, function, opset, decode)
