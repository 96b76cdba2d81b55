"""`to_edge_transform_and_lower` with XNNPACK, on ExecuTorch's cheaper decomposition path, and a check that
the path lost nothing.

`XnnpackPartitioner.ops_to_not_decompose` returns the ops XNNPACK wants kept whole (`aten.linear`, torchao's
quantization primitives) *and* a per-node check. Given a check, ExecuTorch 1.5.1 preserves those ops by
marking them (`EDGE_DO_NOT_DECOMP`), which costs two more whole-program `run_decompositions`; given none, it
drops them from one decomposition table (`_can_skip_using_EDGE_DO_NOT_DECOMP`). `FastXnnpackPartitioner`
returns no check, which saves a tenth of the lowering time (3 layers of LFM2-350M at 8da4w: 39.0 s against
43.3 s; docs/benchmarks.md, export cost).

What the per-node check guarded: without it, an op is kept whole in every node or in none. If XNNPACK then
refuses one `aten.linear` (a weight that is not a constant, a shape it does not take), that linear stays
outside the delegate undecomposed: ExecuTorch raises ("was not decomposed or delegated"; it does not look at
torchao's quantization primitives, which would be left the same way). `lower` catches that, also looks for
the primitives itself, and if anything kept whole is left outside a delegate, lowers again with the stock
partitioner (the per-node check): the result is never worse than before, only slower to get.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _fast_partitioner() -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class FastXnnpackPartitioner(XnnpackPartitioner):
        """`XnnpackPartitioner` whose ops to keep whole come without the per-node check (module doc)."""

        def ops_to_not_decompose(self, ep: Any) -> tuple[list[Any], None]:
            ops, _ = super().ops_to_not_decompose(ep)
            return ops, None

    return FastXnnpackPartitioner()


def kept_whole(program: torch.export.ExportedProgram) -> set[Any]:
    """The ATen ops XNNPACK asks to keep undecomposed for `program`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return set(XnnpackPartitioner().ops_to_not_decompose(program)[0])


def left_outside(edge: Any, ops: set[Any]) -> list[str]:
    """Nodes of any method of `edge` (an `EdgeProgramManager`) that run one of `ops` outside a delegate."""
    found = []
    for name in edge.methods:
        for node in edge.exported_program(name).graph.nodes:
            if node.op != "call_function":
                continue
            target = getattr(node.target, "_op", node.target)
            if target in ops:
                found.append(f"{name}: {node.name} ({target})")
    return found


def lower(
    programs: dict[str, torch.export.ExportedProgram],
    xnnpack: bool,
    constant_methods: dict[str, Any] | None = None,
    fast: bool = True,
) -> Any:
    """`programs` through `to_edge_transform_and_lower`, with XNNPACK when `xnnpack` (the fast partitioner
    unless `fast` is False, checked and redone as the module doc says); the `EdgeProgramManager`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    def run(partitioner: list[Any]) -> Any:
        return to_edge_transform_and_lower(
            programs,
            partitioner=partitioner,
            constant_methods=constant_methods,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )

    if not xnnpack:
        return run([])
    if not fast:
        return run([XnnpackPartitioner()])
    ops = set().union(*(kept_whole(p) for p in programs.values()))
    try:
        edge = run([_fast_partitioner()])
        left = left_outside(edge, ops)
    except RuntimeError as e:  # ExecuTorch's own check of the same (quantization primitives excepted)
        if "was not decomposed or delegated" not in str(e):
            raise
        left = [str(e).splitlines()[0]]
    if left:
        log.warning("XNNPACK left %d kept-whole ops undelegated (%s); lowering again", len(left), left[0])
        edge = run([XnnpackPartitioner()])
    return edge
