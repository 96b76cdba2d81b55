"""Generation settings and the one token sampler every runtime shares (numpy, seeded).

Processing order follows transformers: repetition penalty, temperature, top-k, top-p, min-p, then a draw
from the softmax. Greedy (argmax after the repetition penalty) when `do_sample` is False or temperature is 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings. A value left out of generation_config.json disables its filter (no implicit top_k=50)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0 disables."""
    top_p: float = 1.0
    """1.0 disables."""
    min_p: float = 0.0
    """0.0 disables."""
    repetition_penalty: float = 1.0
    """1.0 disables; > 1 discourages tokens already in the prompt or the output."""
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"generation setting {name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with `changes`; None values are ignored (handy for optional CLI flags)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> GenerationConfig:
        """From a generation_config.json dict (transformers keys; `eos_token_id` may be an int or a list)."""
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in known and key != "eos_token_ids" and value is not None:
                kw[key] = value
        eos = d.get("eos_token_ids", d.get("eos_token_id"))
        if isinstance(eos, int) and not isinstance(eos, bool):
            kw["eos_token_ids"] = (eos,)
        elif isinstance(eos, (list, tuple)):
            kw["eos_token_ids"] = tuple(eos)
        try:
            return cls(**kw).replace(**overrides)
        except TypeError as e:
            raise UserError(f"generation config: {e}") from None

    @classmethod
    def from_folder(cls, path: str | Path, **overrides: Any) -> GenerationConfig:
        """From `generation_config.json` in `path` (defaults when absent)."""
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls().replace(**overrides)
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{file}: expected a JSON object")
        return cls.from_dict(data, **overrides)


class Sampler:
    """Picks the next token from logits. Seeded: the same seed, logits and history give the same tokens."""

    def __init__(self, config: GenerationConfig, seed: int | None = 0) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)

    def process(self, logits: np.ndarray, seen: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
        """Logits `[V]` after repetition penalty, temperature and the top-k / top-p / min-p filters
        (removed tokens at -inf), as float64."""
        cfg = self.config
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if cfg.repetition_penalty != 1.0 and seen is not None:
            ids = np.unique(np.fromiter((int(i) for i in seen), dtype=np.int64))
            if ids.size:
                v = x[ids]
                x[ids] = np.where(v > 0, v / cfg.repetition_penalty, v * cfg.repetition_penalty)
        if cfg.greedy:
            return x
        if cfg.temperature != 1.0:
            x /= cfg.temperature
        if 0 < cfg.top_k < x.size:
            kth = np.partition(x, x.size - cfg.top_k)[x.size - cfg.top_k]
            x[x < kth] = -np.inf
        if cfg.top_p < 1.0:
            order = np.argsort(-x, kind="stable")
            p = _softmax(x[order])
            before = np.cumsum(p) - p
            x[order[before >= cfg.top_p]] = -np.inf
        if cfg.min_p > 0.0:
            p = _softmax(x)
            x[p < cfg.min_p * p.max()] = -np.inf
        return x

    def probs(self, logits: np.ndarray, seen: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
        """The distribution `sample` draws from (one-hot on the argmax when greedy)."""
        x = self.process(logits, seen)
        if self.config.greedy:
            out = np.zeros_like(x)
            out[int(np.argmax(x))] = 1.0
            return out
        return _softmax(x)

    def sample(self, logits: np.ndarray, seen: Iterable[int] | np.ndarray | None = None) -> int:
        """Next token id for logits `[V]`; `seen` = token ids of prompt + output (for the repetition penalty)."""
        x = self.process(logits, seen)
        if self.config.greedy:
            return int(np.argmax(x))
        cdf = np.cumsum(_softmax(x))
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), x.size - 1))

    __call__ = sample


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
