"""XNNPACK delegates of many quantized experts from one lowering: `lower_expert` is run once per
expert shape on a synthetic expert (the template), and every real expert's delegate is the template's with its
own weight data.

Why: one `to_edge_transform_and_lower` of one LFM2-8B-A1B-sized 8da4w expert took 7-10 s on 2 cores, and
lowering several experts in one program does not amortise it (one program of 2 / 4 experts, each forced into
its own partition: 7.3 / 9.7 s per expert against 7.1 s one by one; the time is in fake-tensor passes over the
nodes and XNNPACK's per-partition preprocessing, both per expert). The 704 experts of LFM2-8B-A1B would take
80-120 min; cloned, they cost their quantization and hashing (docs/benchmarks.md, the 8B-A1B export).

Why a clone is the delegate XNNPACK would write (ExecuTorch 1.5.1, checked at every template and in
`tests/test_executorch_moe.py`): XNNPACK's delegate blob holds no weight bytes; it names each constant by the
SHA-256 of its serialised bytes (codes `"<hex>"`, scales `"scale_<hex>"`) in ExecuTorch's named data store.
Two experts of one shape therefore lower to blobs that differ only in those names. `weight_blobs` serialises
an expert's weights as XNNPACK does (int4 codes packed by XNNPACK's own `convert_to_qc4w`, scales as bf16 for
blocks and float32 per channel); the template's lowering must hold exactly those keys and bytes, each key
named once in its blob, or the export stops. A clone's blob is the template's with each key replaced by the
expert's (equal-length hex names). Measured: clones of two `tiny-moe`-sized experts equal their own lowering
byte for byte (blob and named data, int4 and int8).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .quantize import quantized_linear, xnnpack_weight

WEIGHTS = ("w1", "w3", "w2")
"""An expert's linears, in the order `_Expert` defines them and `weight_blobs` returns them."""


def weight_blobs(
    weight: Tensor, bits: int, block_size: int, rounding: str = "nearest"
) -> list[tuple[str, bytes]]:
    """The named data XNNPACK writes for one 8da4w / 8da8w linear weight `[N, K]`: (key, bytes) of its codes,
    then of its scales (module doc)."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    codes, scale, _ = xnnpack_weight(weight.detach(), bits, block_size, rounding)
    if bits == 4:
        data = NodeVisitor.convert_to_qc4w(codes).numpy().tobytes()
        scales = scale.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        data = codes.numpy().tobytes()
        scales = scale.to(torch.float32).contiguous().numpy().tobytes()
    return [
        (hashlib.sha256(data).hexdigest(), data),
        ("scale_" + hashlib.sha256(scales).hexdigest(), scales),
    ]


def expert_blobs(
    weights: Sequence[Tensor], bits: int, block_size: int, rounding: str = "nearest"
) -> list[tuple[str, bytes]]:
    """`weight_blobs` of an expert's w1, w3, w2."""
    return [blob for w in weights for blob in weight_blobs(w, bits, block_size, rounding)]


class _Synthetic(nn.Module):
    """An expert of the given shape with seeded normal weights: every weight distinct, so every key of the
    template is distinct and can be replaced on its own."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, (n, k) in zip(WEIGHTS, ((width, hidden), (width, hidden), (hidden, width)), strict=True):
            linear = nn.Linear(k, n, bias=False)
            linear.weight = nn.Parameter(torch.randn(n, k, generator=gen) * 0.02, requires_grad=False)
            setattr(self, name, linear)


class _Expert(nn.Module):
    """One expert's SwiGLU over quantized linears (`quantize.quantized_linear`)."""

    def __init__(self, mlp: nn.Module, bits: int, block_size: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = (quantized_linear(getattr(mlp, w), bits, block_size) for w in WEIGHTS)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x)),)


class _ShapeOnly(nn.Module):
    """The stand-in original program of a lowered expert: the output shape of the expert, no constants."""

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (torch.zeros_like(x),)


def lower_expert(mlp: nn.Module, bits: int, block_size: int, max_rows: int) -> Any:
    """`mlp` (an expert `MLP`) at `bits`, rows dynamic in 1..`max_rows`, lowered to one XNNPACK delegate:
    the `LoweredBackendModule`, its original program replaced by `_ShapeOnly` (module doc)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    hidden = mlp.w1.in_features
    rows = torch.export.Dim("rows", min=1, max=max(max_rows, 2))
    example = (torch.zeros(2, hidden),)
    program = torch.export.export(
        _Expert(mlp, bits, block_size).eval(), example, dynamic_shapes=({0: rows},), strict=False
    )
    edge = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    graph = edge.exported_program().graph_module
    lowered = [m for n, m in graph.named_children() if n.startswith("lowered_module")]
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    if len(lowered) != 1 or len(calls) != 1:
        raise RuntimeError(f"an expert lowered to {len(lowered)} XNNPACK delegates, not 1")
    module = lowered[0]
    module._original_exported_program = torch.export.export(
        _ShapeOnly(), example, dynamic_shapes=({0: rows},), strict=False
    )
    return module


class ExpertDelegates:
    """The delegate of every expert of one shape (hidden, width) at `bits`, rows 1..`max_rows`: lowered once
    (`template`, plain rounding: its weights are replaced), cloned per expert (`clone`, the recipe's
    `rounding`)."""

    def __init__(
        self, hidden: int, width: int, bits: int, block_size: int, max_rows: int, rounding: str = "nearest"
    ) -> None:
        self.bits, self.block_size, self.rounding = bits, block_size, rounding
        synthetic = _Synthetic(hidden, width)
        template = lower_expert(synthetic, bits, block_size, max_rows)
        self.template = template
        mine = expert_blobs([getattr(synthetic, w).weight for w in WEIGHTS], bits, block_size)
        self.keys = [key for key, _ in mine]
        stored = template._named_data_store_output
        found = {k: bytes(stored.buffers[e.buffer_index]) for k, e in stored.pte_data.items()}
        blob = template._processed_bytes
        if (
            found != dict(mine)
            or stored.external_data
            or any(blob.count(k.encode()) != 1 for k in self.keys)
            or len(set(self.keys)) != len(self.keys)
        ):
            raise RuntimeError(
                "XNNPACK's expert delegate does not name its weights as expert_delegates.py expects "
                "(SHA-256 keys of the serialised codes and scales, each once): cloning is unsafe"
            )
        self.alignment = {k: e.alignment for k, e in stored.pte_data.items()}
        self._names = re.compile(b"|".join(re.escape(k.encode()) for k in self.keys))

    def clone(self, weights: Sequence[Tensor]) -> Any:
        """The `LoweredBackendModule` of the expert with `weights` (w1, w3, w2 float `[N, K]`): the template's
        blob with the expert's keys, the expert's named data, the template's shape-only program."""
        from executorch.exir._serialize._named_data_store import NamedDataStore
        from executorch.exir.lowered_backend_module import LoweredBackendModule

        blobs = expert_blobs(weights, self.bits, self.block_size, self.rounding)
        new = {old.encode(): key.encode() for old, (key, _) in zip(self.keys, blobs, strict=True)}
        store = NamedDataStore()
        for old, (key, data) in zip(self.keys, blobs, strict=True):
            store.add_named_data(key, data, alignment=self.alignment[old])
        t = self.template
        blob = self._names.sub(
            lambda m: new[m.group(0)], t._processed_bytes
        )  # one pass: no key replaced twice
        return LoweredBackendModule(
            t._original_exported_program,
            t.backend_id,
            blob,
            t.compile_specs,
            store.get_named_data_store_output(),
        )
