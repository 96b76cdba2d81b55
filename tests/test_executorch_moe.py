"""The ExecuTorch backend's sparse MoE (`backends/executorch/moe.py`): one MoE layer of `tiny-moe` lowered with
XNNPACK and run by the real ExecuTorch runtime (default suite, seconds), and whole exports through the CLI with
parity (slow: minutes each on 2 cores)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("executorch")


from lfm_export.backends.executorch.moe import SparseMoE, sparse_moe_swap  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.model import MoE  # noqa: E402
from lfm_export.trace import apply_swaps  # noqa: E402


class _Layer(torch.nn.Module):
    def __init__(self, moe: torch.nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


def _lowered_layer(moe: torch.nn.Module, hidden: int, tmp: Path) -> Any:
    """`moe` exported with T dynamic in 1..16, lowered with XNNPACK, loaded by `executorch.runtime`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    x = torch.zeros(1, 3, hidden)
    seq = torch.export.Dim("seq", min=1, max=16)
    program = torch.export.export(_Layer(moe), (x,), dynamic_shapes=({1: seq},), strict=False)
    lowered = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    pte = tmp / "moe.pte"
    pte.write_bytes(lowered.to_executorch().buffer)
    return Runtime.get().load_program(str(pte)).load_method("forward")


def test_a_lowered_sparse_moe_layer_reads_only_the_selected_experts(tmp_path: Path) -> None:
    """tiny-moe's first MoE layer (8 experts, top-2) as a `.pte`: it equals the core `MoE` for 1 and 6 tokens;
    then one expert that the decode token does not select gets NaN weights. The sparse program never reads
    them (its output is unchanged and finite), while the core's dense form, which runs every expert and
    weights the unselected ones by 0, turns NaN: the check can fail."""
    torch.set_num_threads(2)
    loaded = load_model("tiny-moe")
    moe = next(m for m in loaded.model.modules() if isinstance(m, MoE))
    hidden = loaded.config.hidden_size
    torch.manual_seed(0)
    decode = torch.randn(1, 1, hidden)
    with torch.no_grad():
        chosen = set(moe._route(decode.reshape(1, hidden))[1].reshape(-1).tolist())
    unused = min(set(range(len(moe.experts))) - chosen)

    counts: dict[str, int] = {}
    sparse = apply_swaps(loaded.model, [sparse_moe_swap(loaded.model, None, 32, counts, None)])
    layer = next(m for m in sparse.modules() if isinstance(m, SparseMoE))
    assert counts["experts"] == 8 * 4  # 4 MoE layers of 8 experts
    with torch.no_grad():
        layer.experts[unused].w1.weight_t.fill_(float("nan"))  # the swapped copy's own transposed weight
    method = _lowered_layer(layer, hidden, tmp_path)

    prefill = torch.randn(1, 6, hidden)
    with torch.no_grad():
        want_prefill, want_decode = moe(prefill), moe(decode)
        hits = (moe._route(prefill.reshape(6, hidden))[1] == unused).any(-1)
    got_decode = method.execute([decode])[0]
    assert torch.isfinite(got_decode).all()
    assert float((got_decode - want_decode).abs().max()) < 1e-5 * float(want_decode.abs().max())
    # prefill: the rows routed to the poisoned expert are NaN, every other row is the core's
    got_prefill = method.execute([prefill])[0][0]
    assert torch.isnan(got_prefill[hits]).all(-1).all() and bool(hits.any()) and not bool(hits.all())
    diff = (got_prefill[~hits] - want_prefill[0][~hits]).abs().max()
    assert float(diff) < 1e-5 * float(want_prefill.abs().max())
    dense = copy.deepcopy(moe)  # the bundled weights are read-only memory maps
    with torch.no_grad():
        dense.experts[unused].w1.weight.fill_(float("nan"))
        assert torch.isnan(dense(decode)).all()  # the dense form reads the unselected expert


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=1800
    )
