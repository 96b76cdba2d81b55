"""The numpy ML Program interpreter (`lfm_export.runtime.coreml_interpreter`): every op it implements against an
independent reference (torch or plain numpy), with the edge cases that matter (fp16 overflow, broadcasting,
negative axes, masks), the compressed-weight decoders against the formulas written out, and whole saved
programs read back from disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("coremltools")

from lfm_export.runtime import coreml_interpreter as ci  # noqa: E402
from lfm_export.runtime.coreml_interpreter import OPS, UnsupportedOpError  # noqa: E402

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(0)


def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def close(a: np.ndarray, b: np.ndarray | torch.Tensor, tol: float = 1e-5) -> None:
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert np.asarray(a).shape == b.shape
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b.astype(np.float64), rtol=tol, atol=tol)


TESTED: set[str] = set()


def tested(*names: str) -> None:
    TESTED.update(names)


# ---- elementwise ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "ref"),
    [
        ("add", torch.add),
        ("sub", torch.sub),
        ("mul", torch.mul),
        ("real_div", torch.div),
        ("maximum", torch.maximum),
        ("minimum", torch.minimum),
        ("pow", torch.pow),
    ],
)
def test_binary_ops_broadcast_like_torch(op: str, ref) -> None:
    tested(op)
    x, y = rand(2, 1, 5), rand(3, 1)
    if op == "pow":
        x = np.abs(x) + 0.5
    close(OPS[op](x=x, y=y), ref(torch.from_numpy(x), torch.from_numpy(y)))
    close(OPS[op](x=x, y=np.float32(2.0)), ref(torch.from_numpy(x), torch.tensor(2.0)))


@pytest.mark.parametrize(
    ("op", "ref"),
    [
        ("equal", torch.eq),
        ("not_equal", torch.ne),
        ("greater", torch.gt),
        ("greater_equal", torch.ge),
        ("less", torch.lt),
        ("less_equal", torch.le),
    ],
)
def test_comparisons(op: str, ref) -> None:
    tested(op)
    x, y = np.array([[1, 2, 3]], np.int32), np.array([[2], [1]], np.int32)
    assert (OPS[op](x=x, y=y) == ref(torch.from_numpy(x), torch.from_numpy(y)).numpy()).all()


def test_logical_select_cast_clip() -> None:
    tested("logical_not", "logical_and", "logical_or", "select", "cast", "clip", "floor_div")
    a, b = np.array([True, False, True]), np.array([True, True, False])
    assert (OPS["logical_not"](x=a) == ~a).all()
    assert (OPS["logical_and"](x=a, y=b) == (a & b)).all()
    assert (OPS["logical_or"](x=a, y=b) == (a | b)).all()
    x, y = rand(2, 3), rand(2, 3)
    cond = np.array([[True], [False]])  # broadcast over the last axis
    close(
        OPS["select"](cond=cond, a=x, b=y),
        torch.where(torch.from_numpy(cond), torch.from_numpy(x), torch.from_numpy(y)),
    )
    big = np.array([70000.0, -1.5, 2.5], np.float32)
    out = OPS["cast"](x=big, dtype="fp16")
    assert out.dtype == np.float16 and np.isinf(out[0]) and out[1] == -1.5
    assert OPS["cast"](x=np.array([2.7, -2.7], np.float32), dtype="int32").tolist() == [2, -2]  # truncation
    close(OPS["clip"](x=x, alpha=-0.5, beta=0.5), torch.clamp(torch.from_numpy(x), -0.5, 0.5))
    assert OPS["floor_div"](x=np.array([7, -7], np.int32), y=np.int32(2)).tolist() == [3, -4]


@pytest.mark.parametrize(
    ("op", "ref"),
    [
        ("sqrt", torch.sqrt),
        ("exp", torch.exp),
        ("sin", torch.sin),
        ("cos", torch.cos),
        ("tanh", torch.tanh),
        ("abs", torch.abs),
        ("sigmoid", torch.sigmoid),
        ("silu", F.silu),
    ],
)
def test_unary_ops(op: str, ref) -> None:
    tested(op)
    x = rand(4, 7)
    if op == "sqrt":
        x = np.abs(x)
    close(OPS[op](x=x), ref(torch.from_numpy(x)))


def test_sigmoid_and_silu_saturate_without_nan() -> None:
    x = np.array([-1000.0, 0.0, 1000.0], np.float32)
    close(OPS["sigmoid"](x=x), torch.sigmoid(torch.from_numpy(x)))
    close(OPS["silu"](x=x), F.silu(torch.from_numpy(x)))


def test_rsqrt_adds_epsilon() -> None:
    tested("rsqrt")
    x = np.array([4.0, 0.0, 1e-3], np.float32)
    close(OPS["rsqrt"](x=x, epsilon=np.float32(1e-5)), torch.rsqrt(torch.from_numpy(x) + 1e-5))


# ---- reductions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "ref"), [("reduce_mean", torch.mean), ("reduce_sum", torch.sum), ("reduce_max", torch.amax)]
)
@pytest.mark.parametrize(("axes", "keep"), [([-1], True), ([0, 2], False), (None, False)])
def test_reductions(op: str, ref, axes, keep: bool) -> None:
    tested(op)
    x = rand(3, 4, 5)
    dims = tuple(range(3)) if axes is None else tuple(axes)
    close(OPS[op](x=x, axes=axes, keep_dims=keep), ref(torch.from_numpy(x), dim=dims, keepdim=keep), tol=1e-5)


def test_reduce_mean_of_fp16_squares_accumulates_in_fp32() -> None:
    """Mean of 4096 fp16 values: summed in fp16 it would lose low bits; the op accumulates in fp32."""
    x = np.full((1, 4096), 0.1, np.float16)
    assert (
        abs(float(OPS["reduce_mean"](x=x, axes=[-1], keep_dims=True)[0, 0]) - float(np.float16(0.1))) < 1e-7
    )


def test_softmax_negative_axis_and_masked_rows() -> None:
    tested("softmax")
    x = rand(2, 3, 6)
    close(OPS["softmax"](x=x, axis=-1), torch.softmax(torch.from_numpy(x), dim=-1))
    close(OPS["softmax"](x=x, axis=1), torch.softmax(torch.from_numpy(x), dim=1))
    masked = x.copy()
    masked[..., 3:] = -np.inf  # what the attention mask does to future positions
    close(OPS["softmax"](x=masked, axis=-1), torch.softmax(torch.from_numpy(masked), dim=-1))


# ---- linear algebra ----------------------------------------------------------------------------------------


def test_linear_and_matmul() -> None:
    tested("linear", "matmul")
    x, w, b = rand(2, 5, 8), rand(6, 8), rand(6)
    close(
        OPS["linear"](x=x, weight=w, bias=b),
        F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)),
        1e-5,
    )
    a, c = rand(2, 3, 4, 8), rand(1, 3, 5, 8)  # broadcast batch, transpose_y (q @ k^T)
    ref = torch.from_numpy(a) @ torch.from_numpy(c).transpose(-1, -2)
    close(OPS["matmul"](x=a, y=c, transpose_x=False, transpose_y=True), ref, 1e-5)
    close(OPS["matmul"](x=np.swapaxes(a, -1, -2), y=c, transpose_x=True, transpose_y=True), ref, 1e-5)


def test_fp16_linear_overflow_shows_as_inf_in_a_program_step() -> None:
    """Inside the op the product is fp32 (300 * 300 = 9e4); rounding the result to the fp16 the output
    declares gives inf, as on a device."""
    x = np.full((1, 1), 300.0, np.float16)
    w = np.full((1, 1), 300.0, np.float16)
    out = OPS["linear"](x=x, weight=w)
    assert np.isfinite(out).all() and np.isinf(out.astype(np.float16)).all()


@pytest.mark.parametrize(
    ("groups", "pad_type", "pad"), [(4, "valid", None), (1, "valid", None), (2, "custom", [2, 0])]
)
def test_conv1d_grouped(groups: int, pad_type: str, pad) -> None:
    tested("conv")
    x, w = rand(1, 4, 7), rand(4, 4 // groups, 3)
    xt = torch.from_numpy(x)
    if pad is not None:
        xt = F.pad(xt, tuple(pad))
    ref = F.conv1d(xt, torch.from_numpy(w), groups=groups)
    close(
        OPS["conv"](x=x, weight=w, strides=[1], pad_type=pad_type, pad=pad, dilations=[1], groups=groups),
        ref,
        1e-5,
    )


def test_conv2d_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedOpError, match="1-D"):
        OPS["conv"](x=rand(1, 1, 3, 3), weight=rand(1, 1, 2, 2))


# ---- shapes and indexing -----------------------------------------------------------------------------------


def test_shape_ops() -> None:
    tested(
        "reshape",
        "transpose",
        "expand_dims",
        "squeeze",
        "concat",
        "split",
        "tile",
        "shape",
        "fill",
        "identity",
    )
    x = rand(2, 3, 4)
    assert OPS["reshape"](x=x, shape=np.array([4, -1], np.int32)).shape == (4, 6)
    close(OPS["transpose"](x=x, perm=[2, 0, 1]), torch.from_numpy(x).permute(2, 0, 1))
    assert OPS["expand_dims"](x=x, axes=[0, -1]).shape == (1, 2, 3, 4, 1)
    assert OPS["squeeze"](x=rand(1, 3, 1), axes=[-1]).shape == (1, 3)
    close(
        OPS["concat"](values=[x, x[:, :1]], axis=-2),
        torch.cat([torch.from_numpy(x), torch.from_numpy(x[:, :1])], -2),
    )
    mixed = OPS["concat"](values=[np.zeros((1, 2), np.float16), np.ones((1, 1), np.float32)], axis=1)
    assert mixed.tolist() == [[0.0, 0.0, 1.0]]
    parts = OPS["split"](x=x, axis=-1, split_sizes=[1, 3])
    assert [p.shape for p in parts] == [(2, 3, 1), (2, 3, 3)]
    assert [p.shape for p in OPS["split"](x=x, axis=1, num_splits=3)] == [(2, 1, 4)] * 3
    close(OPS["tile"](x=x, reps=[1, 2, 1]), torch.from_numpy(x).repeat(1, 2, 1))
    assert OPS["shape"](x=x).tolist() == [2, 3, 4]
    assert OPS["fill"](shape=[2, 2], value=3.0).tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert OPS["identity"](x=x) is not None


def test_slice_by_index_masks_and_squeeze() -> None:
    tested("slice_by_index", "slice_by_size")
    x = rand(2, 5, 6)
    out = OPS["slice_by_index"](
        x=x,
        begin=[0, 1, -2],
        end=[0, 4, 0],
        stride=[1, 2, 1],
        begin_mask=[True, False, False],
        end_mask=[True, False, True],
        squeeze_mask=[False, False, False],
    )
    close(out, x[:, 1:4:2, -2:])
    out = OPS["slice_by_index"](x=x, begin=[1, 0, 0], end=[2, 5, 6], squeeze_mask=[True, False, False])
    close(out, x[1])
    close(OPS["slice_by_size"](x=x, begin=[0, 2, 1], size=[-1, 2, 3]), x[:, 2:4, 1:4])


def test_slice_update_writes_a_window_like_torch_slice_assignment() -> None:
    tested("slice_update")
    cache = np.zeros((1, 2, 8, 4), np.float16)
    new = rand(1, 2, 3, 4).astype(np.float16)
    out = OPS["slice_update"](
        x=cache,
        update=new,
        begin=[0, 0, 5, 0],
        end=[1, 2, 8, 4],
        begin_mask=[True, True, False, True],
        end_mask=[True, True, False, True],
    )
    ref = torch.zeros(1, 2, 8, 4, dtype=torch.float16)
    ref[:, :, 5:8] = torch.from_numpy(new)
    assert (out == ref.numpy()).all() and (cache == 0).all()  # the input is not modified


def test_gathers_scatter_topk_range() -> None:
    tested("gather", "gather_along_axis", "scatter_along_axis", "topk", "range_1d")
    table = rand(10, 4)
    ids = np.array([[3, -1, 0]], np.int32)  # a negative index counts from the end
    close(OPS["gather"](x=table, indices=ids, axis=0), table[[[3, 9, 0]]])
    scores = rand(3, 6)
    idx = np.array([[0, 5], [2, 2], [1, 4]], np.int32)
    close(
        OPS["gather_along_axis"](x=scores, indices=idx, axis=-1),
        torch.gather(torch.from_numpy(scores), -1, torch.from_numpy(idx).long()),
    )
    upd = rand(3, 2)
    ref = torch.zeros(3, 6).scatter(
        -1, torch.from_numpy(np.array([[0, 5], [2, 3], [1, 4]])), torch.from_numpy(upd)
    )
    close(
        OPS["scatter_along_axis"](
            data=np.zeros((3, 6), np.float32),
            indices=np.array([[0, 5], [2, 3], [1, 4]]),
            updates=upd,
            axis=-1,
            mode="update",
        ),
        ref,
    )
    vals, ind = OPS["topk"](x=scores, k=2, axis=-1, output_indices_dtype="uint16")
    assert ind.dtype == np.uint16
    tv, ti = torch.topk(torch.from_numpy(scores), 2, dim=-1)
    close(vals, tv)
    assert (ind == ti.numpy()).all()
    assert OPS["range_1d"](start=np.int32(2), end=np.int32(7), step=np.int32(2)).tolist() == [2, 4, 6]


# ---- compressed weights ------------------------------------------------------------------------------------


def test_blockwise_shift_scale_against_the_formula() -> None:
    """int4 blocks of 32 along the input dimension and int8 per output channel, written out."""
    codes = RNG.integers(-8, 8, size=(4, 64)).astype(np.int8)
    scale = RNG.random((4, 2)).astype(np.float16)
    ref = np.stack(
        [codes[:, :32] * scale[:, :1].astype(np.float32), codes[:, 32:] * scale[:, 1:].astype(np.float32)], 1
    )
    out = ci.constexpr_blockwise_shift_scale(codes, scale)
    close(
        out,
        ref.transpose(0, 1, 2).reshape(4, 2, 32).reshape(4, 64)
        if False
        else np.concatenate([ref[:, 0], ref[:, 1]], axis=1),
    )
    offset = np.full((4, 1), 3, np.int8)
    per_channel = ci.constexpr_blockwise_shift_scale(codes, scale[:, :1], offset)
    close(per_channel, (codes.astype(np.float32) - 3) * scale[:, :1].astype(np.float32))


def test_lut_to_dense_per_grouped_channel() -> None:
    """One 4-entry table per group of 2 output rows."""
    idx = RNG.integers(0, 4, size=(4, 6)).astype(np.uint8)
    lut = rand(2, 1, 4, 1).astype(np.float16)
    ref = np.stack([lut[r // 2, 0, idx[r], 0] for r in range(4)])
    close(ci.constexpr_lut_to_dense(idx, lut), ref)


# ---- whole programs read from disk -------------------------------------------------------------------------


def _save(prog, path: Path, states: bool = False):
    import coremltools as ct

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
        compute_precision=ct.precision.FLOAT32,
    )
    model.save(str(path))
    return path


def test_saved_fp16_program_overflows_like_a_device(tmp_path: Path) -> None:
    """A program that squares in fp16: 300^2 = 90000 > 65504 is inf in fp16, and finite in fp32."""
    ci.import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3), dtype=types.fp16)], opset_version=ci_opset())
    def prog(x):
        sq = mb.mul(x=x, y=x, name="sq16")
        wide = mb.cast(x=x, dtype="fp32")
        return sq, mb.mul(x=wide, y=wide, name="sq32")

    program = ci.load_program(_save(prog, tmp_path / "sq.mlpackage"))
    out = program.predict({"x": np.array([[300.0, 2.0, -3.0]], np.float16)}, program.make_state())
    sq16, sq32 = (out[n] for n in program.outputs)
    assert sq16.dtype == np.float16 and np.isinf(sq16[0, 0]) and sq16[0, 1] == 4.0
    assert sq32.dtype == np.float32 and sq32[0, 0] == 90000.0


def ci_opset():
    import coremltools as ct

    return ct.target.iOS18


def test_saved_stateful_program_accumulates(tmp_path: Path) -> None:
    """Core ML's accumulator example: the state is read, added to and written back on every call."""
    import coremltools as ct

    ci.import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(1, 2), dtype=types.fp16),
            mb.StateTensorSpec(shape=(1, 2), dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(x, acc):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.mul(x=total, y=np.float16(2.0))

    path = tmp_path / "acc.mlpackage"
    ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True
    ).save(str(path))
    program = ci.load_program(path)
    assert program.states == ["acc"] and program.state_access("acc") == (1, 1)
    state = program.make_state()
    for _ in range(3):
        out = program.predict({"x": np.array([[1.0, 0.5]], np.float16)}, state)
    assert state["acc"].tolist() == [[3.0, 1.5]]
    assert out[program.outputs[0]].tolist() == [[6.0, 3.0]]
    fresh = program.make_state()
    assert fresh["acc"].tolist() == [[0.0, 0.0]]


def test_unknown_op_is_refused_naming_it(tmp_path: Path) -> None:
    ci.import_coremltools()
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.erf(x=x)

    path = _save(prog, tmp_path / "erf.mlpackage")
    with pytest.raises(UnsupportedOpError, match="does not implement op.*erf"):
        ci.load_program(path)


def test_missing_and_corrupt_packages_are_user_errors(tmp_path: Path) -> None:
    from lfm_export.contract.errors import UserError

    with pytest.raises(UserError, match="no such Core ML package"):
        ci.load_program(tmp_path / "none.mlpackage")
    bad = tmp_path / "bad.mlpackage"
    bad.mkdir()
    (bad / "Manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the Core ML package"):
        ci.load_program(bad)


def test_every_implemented_op_has_a_test() -> None:
    """Runs last in this module (pytest keeps file order): each op of `OPS` was exercised above."""
    assert set(OPS) - TESTED == set()
