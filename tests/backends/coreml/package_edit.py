"""Editing a saved Core ML package in place, for wrong-artifact tests: scale the stored scales of one
`constexpr_blockwise_shift_scale` op in `weights/weight.bin`, leaving the program and every other byte as
they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scale_op(package: Path, op_name: str, factor: float) -> None:
    """Multiply the fp16 scales of the constexpr op `op_name` by `factor` (rounded to fp16), found in the
    package's weight file by their bytes (which must occur there once)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
    )
    op = next(o for o in program.functions["main"].operations if o.name == op_name)
    scale = np.asarray(op.inputs["scale"].val)
    old, new = scale.tobytes(), (scale.astype(np.float32) * np.float32(factor)).astype(scale.dtype).tobytes()
    weights = next(package.rglob("weight.bin"))
    data = weights.read_bytes()
    assert data.count(old) == 1 and new != old, (op_name, data.count(old))
    weights.write_bytes(data.replace(old, new))
