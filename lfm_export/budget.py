"""Per-layer precision to a budget (`--budget size=MB | kl=X`): a precision mix chosen from measured sensitivity.

The quantized linears fall into tensor groups: per layer its mixer (a conv block's `in_proj` / `out_proj`, an
attention block's `q/k/v/out_proj`) and its feed-forward (the MLP's `w1/w2/w3`, or every expert of an MoE
layer: onnxruntime's QMoE and mlx-lm's stacked experts hold one precision per layer), then the lm_head and
the embedding table (one group when they are tied). Linears that read one input (q/k/v, w1/w3) share a
group, so a backend can still fuse them.

`measure` quantizes one group at a time at each candidate precision (`candidates`: `CANDIDATES` on every
backend, `LOW_BIT_CANDIDATES` where the backend's format holds them, or the backend recipe's own
`mix_candidates` (ExecuTorch's XNNPACK precisions; GGUF's ggml types, measured on the values its blocks hold,
`mix_values`); the rest of the model float32) and runs the fp32 model over the calibration text (`lfm_export.calibrate.calibration_ids`): the
group's cost is the mean KL divergence of the next-token distribution from the fp32 model's over every
position. The estimated KL of a mix is the sum of its groups' costs; its size is the weight bytes the backend
writes (`stored_bytes`: the recipe's `quantized_bytes` and `extra_bytes` where the backend's layout differs from
the core count, e.g. MLX's float32 bias per group, ONNX's rotary tables and the tied table's second scales;
otherwise codes at their bits, one float32 scale per block, a byte of zero point per block for `-asym`), every
float tensor at float32 (a tied table once). `choose` picks, by dynamic programming over the groups, the mix of least
estimated KL within a size, or the smallest within a KL. The mix becomes the recipe's `mix`
(`lfm_export.precision.rules`), which the simulation and every backend read; the request, each group's
costs and the choice are the manifest's `budget`.

The cost is measured with weight rounding only, the recipe's own, and float activations. A calibrated recipe's
(`-imat`, `-gptq`) groups are measured with its calibrated codes: one calibration table per candidate (every
group that fits held at it, the lm_head and the tied table included, `lfm_export.calibrate.calibrated_table`),
so the measuring costs a calibration pass per candidate; plain rounding's costs overstate what GPTQ loses,
most at the fewest bits and in the head.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UnsupportedError, UserError
from lfm_export.loading import LoadedModel
from lfm_export.precision import held_as, mix_word
from lfm_export.recipes import CALIBRATED_ROUNDINGS, PER_CHANNEL, WEIGHT_BITS, Recipe

CANDIDATES = ((8, 32), (8, 64), (8, 128), (4, 32), (4, 64), (4, 128))
"""The precisions a group may take on every backend: (bits, block size)."""
LOW_BIT_CANDIDATES = ((3, 64), (3, 128), (2, 32), (2, 64), (2, 128))
"""Fewer-bit precisions a group may take where the backend's format holds them (its recipe's `mix_bits`: MLX's
`quantized_matmul` takes 3 bits (the budget offers it no 2); onnxruntime 1.32's MatMulNBits and
GatherBlockQuantized take 2, 4 and 8 bits, not 3). A recipe's `expert_bits` narrows what an MoE layer's experts
may take (onnxruntime's QMoE: 4 and 8)."""
MB = 1_000_000
SIZE, KL = "size", "kl"
UNITS = 4000
"""Size steps of the dynamic program (each item's bytes rounded up to a step: a chosen mix never exceeds its
size budget)."""


def candidates(recipe: Any) -> tuple[tuple[int, int], ...]:
    """The (bits, block size) a group of `recipe` (a backend's recipe object, or a core `Recipe`) may take:
    the backend recipe's own `mix_candidates` where it has them (ExecuTorch's XNNPACK: int4 in blocks, int8 per
    channel, block `PER_CHANNEL`; GGUF: ggml's types, none for a one-type file), else `CANDIDATES` and the
    `LOW_BIT_CANDIDATES` whose bits the backend's recipe lists in `mix_bits`."""
    own = getattr(recipe, "mix_candidates", None)
    if own is not None:
        return tuple(own)
    extra = getattr(recipe, "mix_bits", WEIGHT_BITS)
    return CANDIDATES + tuple(c for c in LOW_BIT_CANDIDATES if c[0] in extra)


def may_take(recipe: Any, group: Group, bits: int, block: int) -> bool:
    """Whether `group` may take `bits` in blocks of `block` under `recipe`: the block divides its rows, an
    MoE layer's experts take only the recipe's `expert_bits` (every bits where it lists none), and the backend
    recipe's `may_hold(group, bits, block)` allows it where it has one (GGUF: llama.cpp's output type for the
    output, a 32-value fallback only where no super-block fits)."""
    if not group.fits(block):
        return False
    own = getattr(recipe, "may_hold", None)
    if own is not None and not own(group, bits, block):
        return False
    experts = getattr(recipe, "expert_bits", None)
    return experts is None or not group.name.endswith(".experts") or bits in experts


class BudgetError(UserError):
    """A budget that cannot be read or met."""


@dataclass(frozen=True)
class Budget:
    """`size` in bytes (`size=MB`, 1 MB = 10^6 bytes) or `kl` (estimated mean KL against fp32)."""

    kind: str
    value: float

    @property
    def text(self) -> str:
        return f"size={self.value / MB:g}" if self.kind == SIZE else f"kl={self.value:g}"


def parse_budget(text: str) -> Budget:
    """`size=MB` or `kl=X` (positive numbers)."""
    kind, _, raw = text.strip().partition("=")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if kind not in (SIZE, KL) or not value > 0 or value == float("inf"):
        raise BudgetError(f"--budget {text!r}: expected size=MB or kl=X with a positive number")
    return Budget(kind, value * MB if kind == SIZE else value)


@dataclass
class Group:
    """Tensors chosen together: `name` (`layers.3.attention`, `head+embedding`), the `patterns` its mix rules
    match, and its quantized tensors' shapes."""

    name: str
    patterns: tuple[str, ...]
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def fits(self, block: int) -> bool:
        """Whether `block` divides every tensor's input dimension (`PER_CHANNEL`: always)."""
        return block == PER_CHANNEL or all(shape[1] % block == 0 for shape in self.tensors.values())

    def nbytes(self, bits: int, block: int, symmetric: bool, recipe: Any = None) -> int:
        """Bytes the group's tensors take at `bits` in blocks of `block` as `recipe`'s backend writes them
        (`stored_bytes`); the core count without one."""
        tied = self.name == TABLE_GROUP
        return sum(stored_bytes(recipe, s, bits, block, symmetric, tied) for s in self.tensors.values())


TABLE_GROUP = "head+embedding"
"""The group of a tied token table and lm_head (one tensor, held once)."""


def core_bytes(shape: tuple[int, ...], bits: int, block: int, symmetric: bool) -> int:
    """The core count of a quantized `[rows, K]` tensor: codes at `bits`, one float32 scale per block (per
    row for `PER_CHANNEL`) and, for `-asym`, a byte of zero point per block."""
    n = int(np.prod(shape))
    return n * bits // 8 + n // (block or shape[-1]) * (4 + (0 if symmetric else 1))


def stored_bytes(
    recipe: Any, shape: tuple[int, ...], bits: int, block: int, symmetric: bool, tied_table: bool = False
) -> int:
    """Bytes of one quantized tensor as `recipe`'s backend writes it: its `quantized_bytes(shape, bits, block,
    symmetric, tied_table)` where the backend recipe has one (`tied_table`: the tied token table that also
    serves as the lm_head), else `core_bytes`."""
    own = getattr(recipe, "quantized_bytes", None)
    if own is None:
        return core_bytes(shape, bits, block, symmetric)
    return int(own(shape, bits, block, symmetric, tied_table))


def extra_bytes(recipe: Any, loaded: LoadedModel) -> int:
    """Bytes of the weight tensors `recipe`'s backend writes that are not the checkpoint's (its
    `extra_bytes(config)`: ONNX's rotary tables); 0 without one."""
    own = getattr(recipe, "extra_bytes", None)
    return 0 if own is None else int(own(loaded.config))


def _group_of(name: str) -> tuple[str, str] | None:
    """(group name, pattern) of a quantized tensor."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        word = "embedding" if "embed" in name else "head"
        return word, name
    m = re.match(r"model\.layers\.(\d+)\.(self_attn|conv|feed_forward)\.", name)
    if m is None:
        return None
    i, part = int(m[1]), m[2]
    if part == "feed_forward":
        what = "experts" if ".experts." in name else "mlp"
    else:
        what = "attention" if part == "self_attn" else "conv"
    return f"layers.{i}.{what}", f"layers.{i}.{part}"


def groups(loaded: LoadedModel, recipe: Recipe) -> tuple[list[Group], int]:
    """The tensor groups of `loaded` that `recipe` quantizes, and the bytes of every float tensor (float32)."""
    cfg = loaded.config
    found: dict[str, Group] = {}
    fixed = 0
    tied = cfg.tie_word_embeddings
    for name, t in loaded.model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        shape = tuple(t.shape)
        if held_as(name, recipe) is None or len(shape) != 2:
            fixed += int(np.prod(shape)) * 4
            continue
        where = _group_of(name)
        if where is None:
            raise UnsupportedError(f"--budget: no tensor group for {name}")
        gname, pattern = where
        if tied and gname == "embedding":
            gname, patterns = "head+embedding", (pattern, "lm_head.weight")
        else:
            patterns = (pattern,)
        found.setdefault(gname, Group(gname, patterns)).tensors[name] = shape
    return list(found.values()), fixed


def measure(
    loaded: LoadedModel,
    recipe: Recipe,
    found: list[Group],
    text_file: Path | None = None,
    tokens: int | None = None,
    offered: tuple[tuple[int, int], ...] = CANDIDATES,
    backend_recipe: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`[groups, offered]` mean KL (nats) against the fp32 model on the calibration text with one group
    quantized at a time (inf where the group may not take a candidate: `may_take` under `backend_recipe`, the
    core `recipe` without one), and the text's description."""
    import torch
    from torch.func import functional_call

    from lfm_export import calibrated
    from lfm_export.calibrate import DEFAULT_TOKENS, calibrated_table, calibration_ids
    from lfm_export.quant import quantize_weight

    ids, label, digest = calibration_ids(loaded, text_file, tokens or DEFAULT_TOKENS)
    own_values = getattr(backend_recipe, "mix_values", None)
    keep_factors = bool(getattr(backend_recipe, "calibration_keeps_factors", False))
    ref = loaded.materialized().model
    ref.set_moe_form("sparse")
    rows = int(getattr(backend_recipe, "budget_sequence", 0) or 0)  # longer rows of the same tokens
    if rows and ids.size % rows == 0:
        ids = ids.reshape(-1, rows)
    batch = torch.from_numpy(ids)
    calibrated_recipe = recipe.rounding in CALIBRATED_ROUNDINGS
    params = dict(ref.named_parameters(remove_duplicate=False))

    def logprobs(replaced: dict[str, Any]) -> Any:
        state = ref.empty_state(batch=batch.shape[0])
        with torch.no_grad():
            logits = functional_call(ref, replaced, (batch, *state))[0]
        return torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])

    try:
        base = logprobs({})
        p = base.exp()
        cost = np.full((len(found), len(offered)), np.inf)
        for ci, (bits, block) in enumerate(offered):
            # every group that fits at this candidate, the recipe's rounding (a calibrated one: its table for
            # this mix, the head's included)
            takes = [may_take(backend_recipe or recipe, g, bits, block) for g in found]
            if not any(takes):
                continue  # no group may take it: no calibration pass for it
            each = recipe.with_options(
                mix=tuple((pat, bits, block) for g, ok in zip(found, takes) if ok for pat in g.patterns)
            )
            table = None
            if calibrated_recipe:
                table, _ = calibrated_table(
                    loaded, each, text_file, tokens or DEFAULT_TOKENS, keep_factors=keep_factors
                )
            with calibrated.active(table) if table is not None else nullcontext():
                for gi, group in enumerate(found):
                    if not takes[gi]:
                        continue
                    replaced = {}
                    for name in group.tensors:
                        w = params[name].detach().float().numpy()
                        if own_values is not None:  # the values the backend's own blocks hold
                            held = own_values(w, each, name, bits, block)
                        else:
                            held = quantize_weight(w, each, bits, block=block or w.shape[-1]).dequantize()
                        replaced[name] = torch.from_numpy(np.ascontiguousarray(held, np.float32))
                        if name == "model.embed_tokens.weight" and loaded.config.tie_word_embeddings:
                            replaced["lm_head.weight"] = replaced[name]
                    lq = logprobs(replaced)
                    cost[gi, ci] = float((p * (base - lq)).sum(-1).mean())
            del table
    finally:
        ref.set_moe_form("dense")
    return cost, {
        "corpus": label,
        "corpus_sha256": digest,
        "tokens": int(ids.size),
        "sequence": int(ids.shape[1]),
    }


def choose(costs: np.ndarray, sizes: np.ndarray, fixed: int, budget: Budget) -> list[int]:
    """A candidate per group (row of `costs` / `sizes`, inf cost: not allowed): least summed cost with
    `fixed + sum(sizes) <= budget.value` (size), or least size with summed cost `<= budget.value` (kl).
    Raises `BudgetError` when no mix meets the budget."""
    allowed = np.isfinite(costs)
    small = np.where(allowed, sizes, np.inf).min(1).sum() + fixed
    if budget.kind == SIZE and budget.value < small:
        raise BudgetError(
            f"--budget {budget.text}: below the smallest mix this model takes ({small / MB:.3f} MB, every "
            "group at its fewest bytes)"
        )
    least = costs.min(1).sum()
    if budget.kind == KL and budget.value < least:
        raise BudgetError(
            f"--budget {budget.text}: below the least estimated KL of any mix ({least:.4g}, every group at "
            "its most precise candidate)"
        )
    top = np.where(allowed, sizes, 0).max(1).sum()
    unit = max(1.0, top / UNITS)
    units = np.where(allowed, np.ceil(sizes / unit), 0).astype(np.int64)
    cap = int(units.max(1).sum())
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(costs), cap + 1), np.int64)
    for g in range(len(costs)):
        new = np.full(cap + 1, np.inf)
        for c in np.flatnonzero(allowed[g]):
            u = units[g, c]
            shifted = np.full(cap + 1, np.inf)
            shifted[u:] = best[: cap + 1 - u] + costs[g, c]
            better = shifted < new
            new[better] = shifted[better]
            picks[g, better] = c
        best = new
    if budget.kind == SIZE:
        room = int(np.floor((budget.value - fixed) / unit))
        end = int(np.argmin(best[: min(room, cap) + 1]))
    else:
        feasible = np.flatnonzero(best <= budget.value)
        end = int(feasible[0])
    chosen = [0] * len(costs)
    for g in range(len(costs) - 1, -1, -1):
        c = int(picks[g, end])
        chosen[g] = c
        end -= int(units[g, c])
    return chosen


def check_recipe(recipe: Any) -> Recipe:
    """The core recipe a budget applies to (a quantized one in blocks), or a one-line refusal."""
    from lfm_export.calibrate import core_recipe

    core = core_recipe(recipe)
    own = getattr(recipe, "mix_candidates", None)
    if own is not None and not own:
        raise BudgetError(
            f"--budget: {getattr(recipe, 'name', core)} holds one ggml type per tensor role; the budget chooses "
            "among K-quant types: give a K-quant mix (e.g. --quant q4_k_m-gptq)"
        )
    if core is None or not core.quantized:
        raise BudgetError(
            "--budget chooses among quantized precisions; give --quant int4 or int8 (e.g. int4)"
        )
    if core.per_channel:
        raise BudgetError(f"--budget: {core.name} is per channel; the budget's candidates are blocks")
    if core.mix:
        raise BudgetError(f"--budget: {core.name} already holds a mix")
    return core


def check_size_floor(loaded: LoadedModel, recipe: Any, budget: Budget) -> None:
    """Refuse a size budget no mix of `recipe`'s `candidates` meets before measuring anything."""
    core = check_recipe(recipe)
    found, fixed = groups(loaded, core)
    sizes = _sizes(found, core, candidates(recipe), recipe)
    costs = np.where(np.isfinite(sizes), 0.0, np.inf)
    if budget.kind == SIZE:
        choose(costs, sizes, fixed + extra_bytes(recipe, loaded), budget)


def _sizes(
    found: list[Group], core: Recipe, offered: tuple[tuple[int, int], ...], recipe: Any = None
) -> np.ndarray:
    """`[groups, offered]` stored bytes (inf where the group may not take the candidate)."""
    return np.array(
        [
            [
                g.nbytes(b, bs, core.symmetric, recipe) if may_take(recipe or core, g, b, bs) else np.inf
                for b, bs in offered
            ]
            for g in found
        ]
    )


def weight_bytes(loaded: LoadedModel, recipe: Any) -> int:
    """The weight bytes `recipe` (a backend's recipe, its mix or its one precision) writes for `loaded`, as the
    budget counts them: every quantized tensor at the bits and block `lfm_export.precision` gives it
    (`stored_bytes`), every float tensor at float32, and the backend's own tensors (`extra_bytes`)."""
    from lfm_export.calibrate import core_recipe
    from lfm_export.precision import block_as

    core = core_recipe(recipe) or recipe
    found, floats = groups(loaded, core)
    total = floats + extra_bytes(recipe, loaded)
    for g in found:
        for name, shape in g.tensors.items():
            bits = held_as(name, core)
            assert bits is not None
            block = block_as(name, core, shape[-1])
            total += stored_bytes(recipe, shape, bits, block, core.symmetric, g.name == TABLE_GROUP)
    return total


def plan(
    loaded: LoadedModel,
    recipe: Any,
    budget: Budget,
    text_file: Path | None = None,
    tokens: int | None = None,
) -> tuple[Recipe, dict[str, Any]]:
    """The core recipe of `recipe` with the mix meeting `budget` (measured on `tokens` tokens of the
    calibration text), and the manifest's `budget` entry."""
    core = check_recipe(recipe)
    check_size_floor(loaded, recipe, budget)
    offered = candidates(recipe)
    found, floats = groups(loaded, core)
    extra = extra_bytes(recipe, loaded)
    fixed = floats + extra
    sizes = _sizes(found, core, offered, recipe)
    costs, text = measure(loaded, core, found, text_file, tokens, offered, recipe)
    chosen = choose(costs, sizes, fixed, budget)
    mix = tuple(
        (pattern, offered[c][0], offered[c][1]) for g, c in zip(found, chosen) for pattern in g.patterns
    )
    word = getattr(recipe, "candidate_name", None) or mix_word
    words = [word(b, bs) for b, bs in offered]
    entry = {
        "request": budget.text,
        "candidates": words,
        "calibration": text,
        "groups": [
            {
                "group": g.name,
                "match": list(g.patterns),
                "chosen": words[c],
                "kl": {
                    w: (None if not np.isfinite(k) else round(float(k), 6)) for w, k in zip(words, costs[i])
                },
                "bytes": {w: (None if not np.isfinite(s) else int(s)) for w, s in zip(words, sizes[i])},
            }
            for i, (g, c) in enumerate(zip(found, chosen))
        ],
        "estimated_kl": round(float(sum(costs[i, c] for i, c in enumerate(chosen))), 6),
        "estimated_bytes": int(fixed + sum(sizes[i, c] for i, c in enumerate(chosen))),
        "float_bytes": int(floats),
        "backend_bytes": int(extra),
    }
    return core.with_options(bits=name_bits(mix), mix=mix), entry


def name_bits(mix: tuple[tuple[str, int, int], ...]) -> int:
    """The bits a mix's recipe name carries: the most of `WEIGHT_BITS` at or under the mix's fewest (int4 where
    a group holds 2, 3, 5 or 6 bits, which no recipe name has); every quantized tensor is in a group, so the
    name's bits hold none."""
    least = min(b for _, b, _ in mix)
    return max((b for b in WEIGHT_BITS if b <= least), default=min(WEIGHT_BITS))


def with_core(recipe: Any, core: Recipe) -> Any:
    """`recipe` (a core `Recipe` or a backend's recipe holding one as `recipe`) with its core replaced."""
    import dataclasses

    if isinstance(recipe, Recipe):
        return core
    return dataclasses.replace(recipe, recipe=core)
