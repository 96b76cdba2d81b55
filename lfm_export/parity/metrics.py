"""Numerical comparison of a session's logits and state with the reference's (numpy, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 with max subtraction."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(test)) per row, `[N]`, clipped at 0 against rounding."""
    lp, lq = log_softmax(ref), log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(kl, 0.0)


def cosine(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity per row; two zero rows count as identical."""
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    num = (r * t).sum(-1)
    den = np.linalg.norm(r, axis=-1) * np.linalg.norm(t, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.all(r == t, -1), 1.0, 0.0))
    return cos


DECISIVE_MARGIN = 0.1
"""A position is decisive when the reference's top-1 probability beats its runner-up by at least this much."""


def decisive_positions(ref: np.ndarray, margin: float = DECISIVE_MARGIN) -> np.ndarray:
    """Boolean `[N]`: the reference's top-1 probability beats its runner-up by at least `margin`."""
    p = np.exp(log_softmax(ref))
    top2 = np.sort(p, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= margin


def top1_decisive(ref: np.ndarray, test: np.ndarray, margin: float = DECISIVE_MARGIN) -> float | None:
    """Top-1 agreement over decisive positions only: quantization noise may flip a near-tie without the model
    being wrong, so quantized gates use this (KL still measures the shift).

    None when no position is decisive: a model with flat output distributions (transformers' default
    initialisation) has none, and counting that as full agreement let a wrong artifact pass."""
    decisive = decisive_positions(ref, margin)
    if not decisive.any():
        return None
    return float(np.mean((np.argmax(test, -1) == np.argmax(ref, -1))[decisive]))


def logit_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float | None]:
    """Metrics over positions for logits `[N, vocab]` (any leading shape is flattened)."""
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"logit shapes differ: reference {r.shape}, test {t.shape}")
    r = r.reshape(-1, r.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    finite = bool(np.isfinite(t).all())
    nan = float("nan")
    out: dict[str, float | None] = {
        "positions": r.shape[0],
        "finite": float(finite),
        "decisive": int(decisive_positions(r).sum()),
    }
    if not finite:
        out.update(
            logit_max_abs=nan,
            logit_max_rel=nan,
            logit_median_rel=nan,
            cosine_mean=nan,
            kl_mean=nan,
            kl_p99=nan,
            kl_max=nan,
            top1_agreement=float(np.mean(np.argmax(np.nan_to_num(t, nan=-np.inf), -1) == np.argmax(r, -1))),
            top1_decisive=nan,
        )
        return out
    err = np.abs(t - r)
    max_abs = float(err.max())
    ref_scale = float(np.abs(r).max())
    kl = kl_divergence(r, t)
    out.update(
        logit_max_abs=max_abs,
        logit_max_rel=max_abs / ref_scale if ref_scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        # the median position's largest error over the logit scale: robust to a few positions where a
        # half-precision ulp flipped a discrete choice (an MoE expert), unlike the maximum
        logit_median_rel=float(np.median(err.max(-1))) / ref_scale if ref_scale > 0 else 0.0,
        cosine_mean=float(cosine(r, t).mean()),
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1_agreement=float(np.mean(np.argmax(t, -1) == np.argmax(r, -1))),
        top1_decisive=top1_decisive(r, t),
    )
    return out


def greedy_match_length(ref_steps: np.ndarray, test_steps: np.ndarray) -> int:
    """Leading steps where both sessions' own argmax agree; `*_steps` are logits `[steps, vocab]`."""
    same = np.argmax(np.asarray(test_steps), -1) == np.argmax(np.asarray(ref_steps), -1)
    return int(same.size if same.all() else np.argmin(same))


def state_max_abs(
    ref: dict[str, np.ndarray] | None,
    test: dict[str, np.ndarray] | None,
    position: int,
    apart: np.ndarray | None = None,
    steps: dict[str, float] | None = None,
) -> tuple[float | None, dict[str, Any]]:
    """Max abs difference over the states both sessions expose, and what was compared; `info["max_rel"]` is
    the worst over the state tensors of (max abs difference / max abs reference value), the scale-free form,
    and `info["p99_rel"]` the 99th percentile (the lower neighbour, never interpolated) of that error per
    state position: each KV cache slot of each cache, and each conv state, counts as one. The percentile does
    not grow with the number of positions compared, as the maximum does where an honest export now and then
    differs at one position (an MoE expert flipped by a rounding tie): in a 2046-slot cache 13 such positions
    (0.6%) set the maximum, and the percentile stays at the other positions' level.

    A static-form KV cache (`[B, kv, max_seq_len, hd]`) is compared over its first `position` slots. A name
    present on one side only, or shapes that cannot be aligned, count as an infinite error.

    `apart` (boolean `[position]`): positions judged apart (`lfm_export.parity.expert_ties`); their KV slots
    are left out, and so is a conv state (`[B, C, L - 1]`) holding one of them (the last `L - 1` positions).

    `steps` (state name -> the quantization step of the grid the artifact writes that state on, its output's
    QDQ scale): the error is also counted in those steps, `info["max_steps"]` the largest and
    `info["p99_steps"]` the 99th percentile per state position as above (a quantized state's honest error is a
    few codes wherever the prompt's values sit in the calibrated range, which its relative error is not: a
    prompt whose keys are small against the range shows one code as a large fraction of its own maximum).
    """
    if ref is None or test is None:
        return None, {"compared": 0, "reason": "state not exposed"}
    worst = worst_rel = worst_steps = 0.0
    per_position: list[np.ndarray] = []
    per_position_steps: list[np.ndarray] = []
    problems: list[str] = []
    for name in sorted(set(ref) | set(test)):
        if name not in ref or name not in test:
            problems.append(f"{name} missing in {'test' if name not in test else 'reference'}")
            continue
        r = np.asarray(ref[name], dtype=np.float64)
        t = np.asarray(test[name], dtype=np.float64)
        if r.shape != t.shape and r.ndim == 4 and t.ndim == 4 and t.shape[2] >= position == r.shape[2]:
            t = t[:, :, :position]
        if r.shape != t.shape:
            problems.append(f"{name} shape {list(t.shape)} != reference {list(r.shape)}")
            continue
        if r.size:
            diff = np.where(np.isfinite(r - t), np.abs(r - t), np.inf)
            if apart is not None and apart.size == position:
                if diff.ndim == 4 and diff.shape[2] == position:
                    diff = diff[:, :, ~apart]
                elif diff.ndim == 3 and apart[max(0, position - diff.shape[-1]) :].any():
                    diff = diff[..., :0]
            if not diff.size:
                continue
            err = float(diff.max())
            scale = float(np.abs(r).max())
            worst = max(worst, err)
            worst_rel = max(worst_rel, _rel(err, scale))
            slots = diff.max(axis=(0, 1, 3)) if diff.ndim == 4 else diff.max(keepdims=True).reshape(1)
            per_position.append(np.array([_rel(float(e), scale) for e in slots]))
            step = (steps or {}).get(name)
            if step is not None:
                worst_steps = max(worst_steps, _rel(err, step))
                per_position_steps.append(np.array([_rel(float(e), step) for e in slots]))
    info: dict[str, Any] = {"compared": len(set(ref) & set(test))}
    if problems:
        info["problems"] = problems
        worst = worst_rel = float("inf")
    info["max_rel"] = worst_rel
    every = np.concatenate(per_position) if per_position else np.zeros(1)
    info["p99_rel"] = float("inf") if problems else float(np.percentile(every, 99, method="lower"))
    if steps:
        info["max_steps"] = float("inf") if problems else worst_steps
        every = np.concatenate(per_position_steps) if per_position_steps else np.zeros(1)
        info["p99_steps"] = float("inf") if problems else float(np.percentile(every, 99, method="lower"))
    return worst, info


def _rel(err: float, scale: float) -> float:
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
