"""The weights part of exactness: the artifact's stored quantized weights against the simulation's, bit for bit.

The logits gates of recipes whose runtime rounds activations (ONNX int4 at accuracy level 4, XNNPACK `8da4w`)
cannot be tight, so a matrix a few percent off can pass them. The weights themselves need no tolerance: the
artifact stores codes, scales and zero points, and dequantizing them in numpy must give, bit for bit, the
float32 values the simulation computes with (`lfm_export.quant.simulate`, or the backend's `weight_values`).

Rows of a quantized `[N, K]` weight are quantized independently along K, so the comparison needs no map from
the artifact's tensor names to the checkpoint's: every dequantized row is hashed, and the artifact's rows must
be found among the simulation's rows as a multiset (each simulation row matched at most as often as it
occurs). Backends that fuse or interleave matrices (q/k/v concatenated along N, ONNX MoE `w1`/`w3` rows
interleaved into one `fc1`) store the same rows in another order, which this does not see.

What it catches: any changed code, scale or zero point of a quantized matrix (a checkpoint of other weights, a
matrix scaled by 1.02, scales edited in place), named by the artifact's tensor. What it cannot catch: a graph
that uses the right weights wrongly (a wrong op, a dropped state, a swapped matrix of the same shape): those
are the logits gates' job.

A backend offers its reader as `Backend.stored_weights` (`"module:function"`, `(artifact folder) -> {name:
float32 [N, K]}` or an iterator of `(name, array)` pairs, one tensor at a time)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lfm_export.parity.report import Check
from lfm_export.precision import held_as

SCENARIO = "stored_weights"
"""The scenario name of this check's rows in the report (one per unmatched tensor: `stored_weights[NAME]`)."""
METRIC = "rows_unmatched"
DETECTION = (
    "any changed code, scale or zero point of a quantized matrix (bit-exact, every row); "
    "not graph errors (the logits gates' job)"
)
EMBEDDING = "model.embed_tokens"
"""The embedding module's name, whose weight is the one quantized tensor that is not a linear's."""

Weights = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]


@dataclass
class StoredWeights:
    """The comparison's outcome: rows and tensors checked on each side, and per artifact tensor with rows not
    found in the simulation, `(rows unmatched, rows)`."""

    artifact_tensors: int
    artifact_rows: int
    simulation_tensors: int
    simulation_rows: int
    unmatched: dict[str, tuple[int, int]] = field(default_factory=dict)
    nearest: dict[str, str] = field(default_factory=dict)
    """Per unmatched tensor whose name does not say the checkpoint's: the simulated weight nearest to it."""

    @property
    def passed(self) -> bool:
        return self.artifact_rows > 0 and not self.unmatched

    @property
    def rows_unmatched(self) -> int:
        return sum(n for n, _ in self.unmatched.values())

    def describe(self) -> str:
        head = (
            f"{self.artifact_rows} rows of {self.artifact_tensors} quantized artifact tensors against "
            f"{self.simulation_rows} rows of {self.simulation_tensors} simulated weights"
        )
        if self.artifact_rows == 0:
            return f"{head}: the artifact holds no quantized weight to compare"
        if not self.unmatched:
            return f"{head}: every row matches bit for bit"
        bad = ", ".join(f"{self.label(name)} ({n}/{rows} rows)" for name, (n, rows) in self.unmatched.items())
        return f"{head}: {self.rows_unmatched} rows differ, in {bad}"

    def label(self, name: str) -> str:
        """An unmatched tensor as the report names it: `NAME`, or `NAME ~NEAREST` (`nearest`)."""
        return f"{name} ~{self.nearest[name]}" if name in self.nearest else name

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "artifact_tensors": self.artifact_tensors,
            "artifact_rows": self.artifact_rows,
            "simulation_tensors": self.simulation_tensors,
            "simulation_rows": self.simulation_rows,
            "rows_unmatched": self.rows_unmatched,
            "unmatched": {
                name: {
                    "rows": n,
                    "of": rows,
                    **({"nearest": self.nearest[name]} if name in self.nearest else {}),
                }
                for name, (n, rows) in self.unmatched.items()
            },
            "detection_limit": DETECTION,
        }


def row_hashes(w: np.ndarray) -> list[bytes]:
    """A digest of every row of `w [N, K]` as float32 bytes (-0.0 counted as 0.0; the row length is hashed
    too, so rows of different K never collide)."""
    a = np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(np.shape(w)[0], -1)) + np.float32(0.0)
    k = a.shape[1].to_bytes(8, "little")
    return [hashlib.blake2b(k + row.tobytes(), digest_size=16).digest() for row in a]


def _pairs(weights: Weights) -> Iterator[tuple[str, np.ndarray]]:
    yield from weights.items() if isinstance(weights, Mapping) else weights


@dataclass
class RowPool:
    """The simulation's row digests (`row_hashes`) as a multiset, and how many tensors they came from: built
    one tensor at a time (`add`), so a streamed simulation fills it as it makes each layer's weights."""

    rows: Counter[bytes] = field(default_factory=Counter)
    tensors: int = 0

    def add(self, w: np.ndarray) -> None:
        self.rows.update(row_hashes(w))
        self.tensors += 1


def compare(artifact: Weights, simulation: Weights | RowPool) -> StoredWeights:
    """Every artifact row must be one of the simulation's rows (a multiset: a simulation row is matched at
    most as often as the simulation holds it). Tensors are read one at a time."""
    simulated: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}  # by shape, for `_nearest`
    if isinstance(simulation, RowPool):  # streamed: digests only, so no nearest names
        built = RowPool(Counter(simulation.rows), simulation.tensors)
    else:
        built = RowPool()
        for name, w in _pairs(simulation):
            built.add(w)
            simulated.setdefault(tuple(np.shape(w)), []).append((name, w))
    pool, sim_tensors = built.rows, built.tensors
    sim_rows = sum(pool.values())
    unmatched: dict[str, tuple[int, int]] = {}
    arrays: dict[str, np.ndarray] = {}
    tensors = rows = 0
    for name, w in _pairs(artifact):
        hashes = row_hashes(w)
        tensors, rows = tensors + 1, rows + len(hashes)
        missing = 0
        for h in hashes:
            if pool[h] > 0:
                pool[h] -= 1
            else:
                missing += 1
        if missing:
            unmatched[name] = (missing, len(hashes))
            if len(arrays) < NEAREST_AT_MOST:
                arrays[name] = w
    nearest = {}
    if len(unmatched) <= NEAREST_AT_MOST:
        for name, w in arrays.items():
            near = _nearest(name, w, simulated)
            if near is not None:
                nearest[name] = near
    return StoredWeights(tensors, rows, sim_tensors, sim_rows, unmatched, nearest)


NEAREST_AT_MOST = 4
"""Up to this many unmatched artifact tensors, each whose name does not say the checkpoint's (an ExecuTorch
`.pte` keeps no names, GGUF has its own) is also named by the simulated weight of its shape nearest to it;
more, and the artifact is of other weights altogether, where a nearest name says nothing."""


def _nearest(
    name: str, w: np.ndarray, simulated: dict[tuple[int, ...], list[tuple[str, np.ndarray]]]
) -> str | None:
    """The simulated weight of `w`'s shape with the smallest relative squared difference from it, or None
    where there is none or `name` already starts with its module's name."""
    a = np.asarray(w, dtype=np.float64)
    best, best_err = None, np.inf
    for sim_name, s in simulated.get(tuple(np.shape(w)), []):
        s64 = np.asarray(s, dtype=np.float64)
        err = float(np.sum((a - s64) ** 2) / max(float(np.sum(s64**2)), 1e-30))
        if err < best_err:
            best, best_err = sim_name, err
    if best is None or name.startswith(best.removesuffix(".weight")):
        return None
    return best


def simulated_weights(simulated: Any, recipe: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """The quantized weights a simulation (`lfm_export.quant.simulate`'s module) computes with, by checkpoint
    name: the embedding table and every 2-D linear weight that `lfm_export.precision.held_as` holds at some
    bits for `recipe` (a tied table counts once per use, as the artifact stores it once per op). `prefix`: the
    canonical name prefix of a simulated part (`simulate(..., prefix=...)`)."""
    for local, module in simulated.named_modules():
        name = prefix + local
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        is_linear = hasattr(module, "in_features")
        if not (is_linear or name == EMBEDDING):
            continue
        if held_as(f"{name}.weight", recipe) is None:
            continue
        yield f"{name}.weight", weight.detach().float().numpy()


def checks(result: StoredWeights) -> list[Check]:
    """The report's exactness checks: one per unmatched tensor (`stored_weights[NAME]`, so a failure names
    it), else one for the whole artifact (failing where the artifact holds no quantized weight to compare)."""
    if result.unmatched:
        return [
            Check(
                f"{SCENARIO}[{result.label(name)}]",
                METRIC,
                float(n),
                "<=",
                0.0,
                False,
                note=f"{n}/{rows} rows",
            )
            for name, (n, rows) in result.unmatched.items()
        ]
    note = "" if result.passed else "the artifact holds no quantized weight to compare"
    return [Check(SCENARIO, METRIC, 0.0, "<=", 0.0, result.passed, note=note)]
