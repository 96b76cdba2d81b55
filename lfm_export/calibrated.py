"""Calibrated codes and scales by weight content: how a calibrated rounding reaches every caller of the core
quantizer without any of them knowing a weight's name.

A calibrated rounding (`-imat`, `-gptq`) needs statistics of each linear's inputs, known by the checkpoint's
names; the backends and the simulation quantize weights by value (ONNX quantizes the traced graph's constants,
and fuses or interleaves some of them, e.g. the MoE experts' `w1` / `w3` into one `fc1`). Rows of a `[N, K]`
weight quantize independently along K, so a `Table` keys each row's codes and scales by a hash of the row's
float32 bytes; `lfm_export.quant.quantize_weight` reads the table that is `active` for every row it is given.
The table holds the lm_head too (`lfm_export.calibrate.HEAD`), so a tied embedding table
held at the head's bits and block reads the head's codes; rows the table does not hold (a table at other bits
than the head, an expert no calibration token chose) get plain rounding. A calibrated recipe
quantized with no table active is an error, never a silent fallback.

This module imports neither torch nor the quantizer: `lfm_export.quant` imports it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from lfm_export.contract.errors import UserError


class CalibrationMissing(UserError):
    """A calibrated recipe was quantized with no calibration table active."""


def row_keys(w: np.ndarray) -> list[bytes]:
    """One 16-byte hash per row of `w` (as float32)."""
    rows = np.ascontiguousarray(w, dtype=np.float32)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


@dataclass
class Table:
    """Codes `[N, K]` (uint8, unsigned as `lfm_export.quant.Quantized` holds them) and scales `[N, K / block]`
    of calibrated weights, found by row content, per (bits, block size)."""

    matrices: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    rows: dict[tuple[bytes, int, int], tuple[int, int]] = field(default_factory=dict)
    importances: dict[int, np.ndarray] = field(default_factory=dict)
    """Per matrix (index into `matrices`), the inputs' per-channel mean square `[K]` it was calibrated with,
    for a format whose own search weighs its error by it (GGUF's K-quants)."""
    factors: dict[int, np.ndarray] = field(default_factory=dict)
    """Per matrix, the Hessian's Cholesky factor `[K, K]` (`lfm_export.rounding.cholesky_factor`; with act-order
    an `OrderedFactor`, the factor and its channel order) of its inputs, kept only for a format that rounds its
    own blocks by GPTQ (GGUF `-gptq`); linears that share an input share the object."""
    rows_served: int = 0
    more: Callable[[], bool] | None = None
    """A streamed calibration's next step (`lfm_export.calibrate.calibrated_table(stream=True)`): run on a
    lookup that finds nothing, until the weight is found or it returns False (every layer done)."""
    release_factors: bool = False
    """Drop a matrix's factor once served (a streamed export: each is read once); a second read is an error."""
    released: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(
        self,
        w: np.ndarray,
        bits: int,
        block: int,
        codes: np.ndarray | None,
        scales: np.ndarray | None,
        importance: np.ndarray | None = None,
        factor: np.ndarray | None = None,
    ) -> None:
        """Hold `codes` / `scales` for weight `w` (the values the backends will be given; None for a format that
        rounds its own blocks from the importance and factor only), the importance `[K]` they were chosen with
        and, where kept, the inputs' Hessian Cholesky `factor`."""
        index = len(self.matrices)
        self.matrices.append((codes, scales))  # type: ignore[arg-type]
        if importance is not None:
            self.importances[index] = np.asarray(importance, np.float32)
        if factor is not None:
            self.factors[index] = factor
        keyed = w if codes is not None else w[:1]  # no codes: found by its first row alone
        for r, key in enumerate(row_keys(keyed)):
            self.rows.setdefault((key, bits, block), (index, r))

    def find(self, w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(codes, scales, found-row mask) for the rows of `w` the table holds; None when it holds none."""
        n = w.shape[0]
        hits = [self.rows.get((key, bits, block)) for key in row_keys(w)]
        found = np.array([h is not None for h in hits], bool)
        if not found.any():
            return None
        codes = np.zeros(w.shape, np.uint8)
        scales = np.zeros((n, w.shape[1] // block), np.float32)
        for r, hit in enumerate(hits):
            if hit is not None:
                c, s = self.matrices[hit[0]]
                if c is None:
                    raise UserError("this calibration kept no codes (GGUF -gptq rounds its own blocks)")
                codes[r], scales[r] = c[hit[1]], s[hit[1]]
        with self._lock:
            self.rows_served += int(found.sum())
        return codes, scales, found

    def find_importance(
        self, w: np.ndarray, bits: int, block: int, what: str = "importances"
    ) -> np.ndarray | None:
        """The importance `[K]` weight `w` was calibrated with (found by its first row; `what="factors"`: its
        Hessian Cholesky factor), or None; its rows count as served (`rows_served`) when found."""
        key = (row_keys(w[:1])[0], bits, block)
        hit = self.rows.get(key)
        while hit is None and self.more is not None and self.more():
            hit = self.rows.get(key)
        if what == "factors" and hit is not None and hit[0] in self.released:
            raise UserError("a -gptq factor was read twice from a calibration that released it after use")
        with self._lock:
            found = None if hit is None else getattr(self, what).get(hit[0])
            if what == "factors" and found is not None and self.release_factors:
                del self.factors[hit[0]]  # the array goes with the last linear sharing it
                self.released.add(hit[0])
            if found is not None:
                self.rows_served += int(w.shape[0])
        return found

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes + s.nbytes for c, s in self.matrices if c is not None)


_ACTIVE: list[Table] = []


@contextmanager
def active(table: Table) -> Iterator[Table]:
    """Make `table` the one `lookup` reads while the block runs (export and parity of one artifact)."""
    _ACTIVE.append(table)
    try:
        yield table
    finally:
        _ACTIVE.remove(table)


def current() -> Table | None:
    return _ACTIVE[-1] if _ACTIVE else None


def lookup(
    w: np.ndarray, bits: int, block: int, rounding: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The active table's codes and scales for `w` (see `Table.find`); `rounding` names the recipe's for the
    error raised when no table is active."""
    table = current()
    if table is None:
        raise CalibrationMissing(
            f"-{rounding} rounding needs a calibration pass; export the recipe with lfm-export (it calibrates "
            "on the bundled corpus, or on --calib FILE)"
        )
    return table.find(w, bits, block)


def importance(w: np.ndarray, bits: int, block: int) -> np.ndarray | None:
    """The active table's importance `[K]` for weight `w` (`Table.find_importance`); None when `w` is not in it
    (a table at other bits than the head, an expert no calibration token chose). Raises `CalibrationMissing` when
    no table is active, as `lookup` does."""
    table = current()
    if table is None:
        raise CalibrationMissing(
            "-imat rounding needs a calibration pass; export the recipe with lfm-export (it calibrates on the "
            "bundled corpus, or on --calib FILE)"
        )
    return table.find_importance(np.asarray(w), bits, block)


def factor(w: np.ndarray, bits: int, block: int) -> np.ndarray | None:
    """The active table's Hessian Cholesky factor for weight `w` (kept by a calibration for GGUF `-gptq`), None
    where the table holds none for it; raises `CalibrationMissing` when no table is active."""
    table = current()
    if table is None:
        raise CalibrationMissing(
            "-gptq rounding needs a calibration pass; export the recipe with lfm-export (it calibrates on the "
            "bundled corpus, or on --calib FILE)"
        )
    return table.find_importance(np.asarray(w), bits, block, "factors")
