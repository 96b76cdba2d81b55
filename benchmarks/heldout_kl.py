"""A larger held-out text for the GGUF KL comparisons, and the paired ratio of two roundings' KL with a
bootstrap interval.

The bundled `lfm_export/assets/corpus/heldout.txt` is 12 KB: 1280 scored positions, where a few positions carry
the mean (on `small` `q4_0-gptq` the standard error was 57% of the mean). `heldout_text(n_docs, folder)` writes
the first `n_docs` documents of `examples/make_corpus.py`'s held-out split (its held-out seed; documents that
occur in the training split are already replaced there) to `folder`, without any document that also occurs in
the calibration text `lfm_export/assets/calibration.txt` (checked document by document; the count dropped is
returned), so a comparison over it reads text neither the training of the bundled models and `small` nor any
calibration saw.

`paired_ratio(ours, theirs)`: both arrays hold one value per chunk (the sum of KL over the chunk's scored
positions, the same chunks for both files), and the ratio is `sum(ours) / sum(theirs)` (the ratio of the pooled
means); its 95% interval is the percentile bootstrap over chunks, resampling the same chunks for both, so what
the two files share (hard positions) cancels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "lfm_export" / "assets" / "calibration.txt"
BOS = "<|startoftext|>"
BOOTSTRAP = 10000


def _documents(text: str) -> set[str]:
    """The documents of a corpus text, each as `make_corpus` writes it (from its BOS on, stripped)."""
    return {BOS + d.strip() for d in text.split(BOS) if d.strip()}


def heldout_text(n_docs: int, folder: Path) -> tuple[Path, dict]:
    """`folder/heldout_{n_docs}.txt`: the held-out split's first `n_docs` documents, less any that occur in the
    calibration text; and a summary (documents written, dropped, characters)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import make_corpus

    _, docs = make_corpus.splits(make_corpus.N_TRAIN, n_docs)
    calib = _documents(CALIBRATION.read_text(encoding="utf-8"))
    kept = [d for d in docs if d.strip() not in calib]
    text = "\n\n".join(kept) + "\n"
    overlap = _documents(text) & calib
    if overlap:
        raise SystemExit(f"held-out text holds {len(overlap)} calibration documents")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"heldout_{n_docs}.txt"
    path.write_text(text, encoding="utf-8")
    return path, {
        "heldout_docs_requested": n_docs,
        "heldout_docs_written": len(kept),
        "heldout_docs_dropped_as_calibration": len(docs) - len(kept),
        "heldout_chars": len(text),
        "heldout_seed": make_corpus.HELDOUT_SEED,
    }


def paired_ratio(ours: np.ndarray, theirs: np.ndarray, seed: int = 0, rounds: int = BOOTSTRAP) -> dict:
    """`sum(ours) / sum(theirs)` over chunks (per-chunk KL sums, the same chunks for both) and its 95%
    percentile-bootstrap interval, chunks resampled together for both."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired per-chunk values of one shape expected, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, a.size, (rounds, a.size))
    boot = a[idx].sum(1) / b[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {
        "ratio": round(float(a.sum() / b.sum()), 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "chunks": int(a.size),
        "bootstrap_rounds": rounds,
    }
