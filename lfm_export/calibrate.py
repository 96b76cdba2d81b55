"""Calibration: statistics of every quantized linear's inputs over a text, and the calibrated codes of a recipe.

`calibrate` runs the model over `tokens` tokens of a text (the bundled `assets/calibration.txt` by default:
documents of the bundled models' procedural corpus, drawn with a seed that neither their training nor their
held-out split uses), one decoder layer at a time: each layer's weights are produced from the lazy weight
source, run on the whole batch, and dropped, so only one layer's weights and the batch's hidden states are
held. Per linear that a quantized recipe holds at its `bits` (`lfm_export.precision.LINEAR`), it collects the
inputs' per-channel mean square `E[x_j^2]` and, where asked, the second-moment matrix `E[x x^T]` (GPTQ's
Hessian); per MoE layer, how often each expert is chosen. The MoE layers run in their sparse form, so an
expert's statistics are those of the tokens routed to it.

With `head`, the lm_head's input (the final norm's output) is collected as one more layer, so the head (and
the embedding table tied to it) is calibrated as the linears are.

`calibrated_table` turns a layer's statistics into codes and scales (`lfm_export.rounding`) as soon as the
layer is done, and drops its Hessians: the Hessians of one layer are held at a time.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm_export.calibrated import Table
from lfm_export.contract.errors import UserError
from lfm_export.loading import LoadedModel
from lfm_export.model import GROWING, MOE_SPARSE, DecoderLayer, MoE, RMSNorm, rope_cos_sin
from lfm_export.precision import LINEAR, block_as, held_as, rule_for
from lfm_export.recipes import CALIBRATED_ROUNDINGS, Recipe
from lfm_export.rounding import cholesky_factor, gptq, weighted_search
from lfm_export.weights import lazy_source

CORPUS = Path(__file__).parent / "assets" / "calibration.txt"
BUNDLED = "bundled"
DEFAULT_TOKENS = 2048
SEQ_LEN = 256
"""Calibration sequences: the token budget in rows of this many tokens, each run from an empty state."""


HEAD = "lm_head.weight"
"""The lm_head's name in the calibration's statistics (a tied head: the embedding table's values)."""
HEAD_ERROR_ROWS = 4096
"""Rows of the lm_head (every `vocab // HEAD_ERROR_ROWS`-th) its reported output error is summed over: the whole
head of a 65536-token vocabulary would cost more products than its GPTQ rounding."""
ERROR_ROWS = 256
"""Rows of every other linear (every `N // ERROR_ROWS`-th) its reported output error is summed over: the error
of a row is `N K^2` multiply-adds for the whole matrix, as much as its GPTQ rounding (LFM2-1.2B: about 4e12)."""
FINAL_NORM = "model.embedding_norm.weight"
"""The final RMSNorm (checkpoints call it `embedding_norm`), whose output is the lm_head's input."""
KEPT_ACT_ORDER = False
"""Whether the factors a calibration keeps for a format that rounds its own blocks by GPTQ (GGUF `-gptq`) are of
the Hessian with its inputs by descending diagonal (`lfm_export.rounding.OrderedFactor`: GPTQ's act-order with
static groups, `gptq_on_grid`). False: measured on whole files against llama.cpp's over 28672 held-out
positions, act-order lowered the KL on `small` and `tiny` q4_0 but raised it on `tiny-moe` q4_0 beyond the
bootstrap interval (docs/backends/gguf.md), so `-gptq` keeps the column order; the benchmark's `gptq-act`
rounding uses it."""
RANDOM_IDS = "random ids"
RANDOM_IDS_SEED = 4321


class CalibrationError(UserError):
    """The calibration text cannot be used."""


@dataclass
class LinearStats:
    """Inputs of one linear: `tokens` rows, per-channel mean square `[K]`, second-moment matrix `[K, K]`
    (float64; None when not collected or already used)."""

    tokens: int
    mean_square: np.ndarray
    hessian: np.ndarray | None


@dataclass
class Calibration:
    """What `calibrate` measured, and where the text came from (the manifest's `calibration`)."""

    corpus: str
    corpus_sha256: str
    tokens: int
    linears: dict[str, LinearStats] = field(default_factory=dict)
    routing: dict[str, list[float]] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus,
            "corpus_sha256": self.corpus_sha256,
            "tokens": self.tokens,
            "sequence_length": SEQ_LEN,
            "linears": len(self.linears),
            "expert_routing_frequency": self.routing,
        }


def calibration_ids(loaded: LoadedModel, text_file: Path | None, tokens: int) -> tuple[np.ndarray, str, str]:
    """`[rows, SEQ_LEN]` token ids of the calibration text, its label and sha256. A model with random weights
    and no tokenizer calibrates on pseudo-random ids (`RANDOM_IDS`): its weights mean no text either."""
    path = CORPUS if text_file is None else Path(text_file)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"--calib {path}: cannot read ({e.strerror})") from None
    if tokens < SEQ_LEN or tokens % SEQ_LEN:
        raise CalibrationError(f"calibration tokens {tokens}: expected a positive multiple of {SEQ_LEN}")
    if loaded.tokenizer_file is None and loaded.random and text_file is None:
        ids = np.random.default_rng(RANDOM_IDS_SEED).integers(0, loaded.config.vocab_size, tokens)
        return ids.reshape(-1, SEQ_LEN), RANDOM_IDS, hashlib.sha256(ids.tobytes()).hexdigest()
    label = BUNDLED if text_file is None else str(path)
    digest = hashlib.sha256(raw).hexdigest()
    if loaded.tokenizer_file is None:
        raise CalibrationError(
            f"{loaded.source} has no tokenizer.json; calibration needs one to read the text"
        )
    from tokenizers import Tokenizer

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"--calib {path}: not UTF-8 text") from None
    ids = Tokenizer.from_file(str(loaded.tokenizer_file)).encode(text).ids
    if len(ids) < tokens:
        raise CalibrationError(
            f"--calib {path}: {len(ids)} tokens, calibration takes {tokens}; give a longer text"
        )
    return np.asarray(ids[:tokens], np.int64).reshape(-1, SEQ_LEN), label, digest


def _layer(loaded: LoadedModel, idx: int) -> DecoderLayer:
    """Decoder layer `idx` with real weights (produced from the lazy source, or the model's own)."""
    source = lazy_source(loaded.model)
    if source is None:
        return loaded.model.model.layers[idx]
    prefix = f"model.layers.{idx}."
    with torch.device("meta"):
        layer = DecoderLayer(loaded.config, idx)
    state = {n[len(prefix) :]: source.get(n) for n in source.names() if n.startswith(prefix)}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def _weight(loaded: LoadedModel, name: str) -> Tensor:
    source = lazy_source(loaded.model)
    return source.get(name) if source is not None else loaded.model.get_parameter(name).detach()


LayerDone = Callable[[int, dict[str, LinearStats]], None]


def calibrate(
    loaded: LoadedModel,
    text_file: Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    hessian: bool = False,
    layer_done: LayerDone | None = None,
    head: bool = False,
) -> Calibration:
    """Input statistics of every linear held at a recipe's `bits` (see the module doc) and, with `head`, of the
    lm_head (`HEAD`: its input is the final norm's output), handed to `layer_done` as one more layer (index
    `num_hidden_layers`). `layer_done(idx, stats)` is called after each layer; the Hessians are dropped from
    the result after it."""
    return _last(calibration_steps(loaded, text_file, tokens, hessian, layer_done, head))


def calibration_steps(
    loaded: LoadedModel,
    text_file: Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    hessian: bool = False,
    layer_done: LayerDone | None = None,
    head: bool = False,
) -> Iterator[Calibration]:
    """`calibrate` one decoder layer a step: yields the `Calibration` so far after each layer's `layer_done`,
    the last time complete (the head too, with `head`; routing frequencies normalised), so a caller can
    calibrate a layer only when it needs it (`calibrated_table(stream=True)`)."""
    ids, label, digest = calibration_ids(loaded, text_file, tokens)
    cfg = loaded.config
    out = Calibration(corpus=label, corpus_sha256=digest, tokens=int(ids.size))
    batch = torch.from_numpy(ids)
    rows, t = batch.shape
    positions = torch.arange(t)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        h = torch.nn.functional.embedding(batch, _weight(loaded, "model.embed_tokens.weight").float())
    for idx in range(cfg.num_hidden_layers):
        layer = _layer(loaded, idx)
        prefix = f"model.layers.{idx}."
        stats: dict[str, list[Any]] = {}
        seen: list[tuple[Tensor, list[Any]]] = []
        hooks = []
        for name, mod in layer.named_modules():
            full = f"{prefix}{name}.weight"
            if isinstance(mod, nn.Linear) and rule_for(full) is LINEAR:
                hooks.append(mod.register_forward_pre_hook(_collector(stats, full, hessian, seen)))
            if isinstance(mod, MoE):
                mod.form = MOE_SPARSE
                hooks.append(mod.register_forward_pre_hook(_router_counter(out, f"{prefix}{name}")))
        try:
            with torch.no_grad():
                x = layer.operator_norm(h)
                if layer.is_attention:
                    empty = torch.zeros(rows, cfg.num_key_value_heads, 0, cfg.head_dim)
                    x, _, _ = layer.self_attn(x, cos, sin, empty, empty, positions, GROWING, None)
                else:
                    x, _ = layer.conv(x, torch.zeros(rows, cfg.hidden_size, cfg.conv_state_len))
                h = h + x
                h = h + layer.feed_forward(layer.ffn_norm(h))
        finally:
            for hook in hooks:
                hook.remove()
        del layer
        seen.clear()
        _finish(out, idx, _averaged(stats), layer_done)
        stats.clear()
        if idx + 1 < cfg.num_hidden_layers or head:
            yield out
    if head:
        with torch.no_grad():
            norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            norm.weight = nn.Parameter(_weight(loaded, FINAL_NORM).float(), requires_grad=False)
            head_stats: dict[str, list[Any]] = {}
            _collector(head_stats, HEAD, hessian, [])(norm, (norm(h),))
        _finish(out, cfg.num_hidden_layers, _averaged(head_stats), layer_done)
    for key, counts in out.routing.items():
        total = sum(counts)
        out.routing[key] = [round(c / total, 6) if total else 0.0 for c in counts]
    yield out


def _averaged(stats: dict[str, list[Any]]) -> dict[str, LinearStats]:
    """`_collector`'s sums as means, divided in place (one K^2 float64 array per input, not two); linears that
    share an input share one `LinearStats`."""
    by_entry: dict[int, LinearStats] = {}
    done = {}
    for name, entry in stats.items():
        if id(entry) not in by_entry:
            n, sq, xx = entry
            if xx is not None:
                xx /= max(n, 1)
            by_entry[id(entry)] = LinearStats(tokens=n, mean_square=sq / max(n, 1), hessian=xx)
        done[name] = by_entry[id(entry)]
    return done


def _finish(out: Calibration, idx: int, done: dict[str, LinearStats], layer_done: LayerDone | None) -> None:
    """Hand one layer's statistics to `layer_done`, then keep them in `out` without their Hessians."""
    if layer_done is not None:
        layer_done(idx, done)
    for s in done.values():
        s.hessian = None
    out.linears.update(done)


def _collector(
    stats: dict[str, list[Any]], name: str, hessian: bool, seen: list[tuple[Tensor, list[Any]]]
) -> Callable[..., None]:
    """A pre-hook accumulating `[tokens, sum x^2, sum x x^T]` of the linear's input. Linears called on the same
    tensor (q/k/v, w1/w3) share one entry, so its Hessian is formed once and is the same object for each;
    `seen` holds those tensors for the layer's forward, so their memory cannot be reused by another input."""

    def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        shared = next((entry for t, entry in seen if t is args[0]), None)
        if shared is not None:
            stats[name] = shared
            return
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        entry = stats.setdefault(name, [0, np.zeros(x.shape[1]), None])
        seen.append((args[0], entry))
        entry[0] += x.shape[0]
        entry[1] += (x.double() * x.double()).sum(0).numpy()
        if hessian:  # one float32 product per call (the whole batch), summed in float64 (in place)
            xx = _gram(x).double().numpy()
            if entry[2] is None:
                entry[2] = xx
            else:
                entry[2] += xx

    return hook


GRAM_BLOCK = 2048
"""Columns per block row of `_gram`'s products."""


def _gram(x: Tensor) -> Tensor:
    """`x^T x` (float32) from the block rows on and above the diagonal (`x[:, i:i+B]^T x[:, i:]`, `B` =
    `GRAM_BLOCK`), the rest mirrored: 62.5% of the product's multiply-adds at `K` = 8192 (LFM2-1.2B's FFN
    input). Each entry is the same dot product over the tokens as in `x.T @ x`."""
    k = x.shape[1]
    if k <= GRAM_BLOCK:
        return x.T @ x
    out = torch.empty((k, k), dtype=x.dtype)
    for i in range(0, k, GRAM_BLOCK):
        torch.matmul(x[:, i : i + GRAM_BLOCK].T, x[:, i:], out=out[i : i + GRAM_BLOCK, i:])
    for i in range(GRAM_BLOCK, k, GRAM_BLOCK):
        out[i : i + GRAM_BLOCK, :i] = out[:i, i : i + GRAM_BLOCK].T
    return out


def _router_counter(out: Calibration, name: str) -> Callable[..., None]:
    def hook(mod: MoE, args: tuple[Tensor, ...]) -> None:
        flat = args[0].reshape(-1, args[0].shape[-1])
        _, idx, _ = mod._route(flat)
        counts = torch.bincount(idx.reshape(-1), minlength=len(mod.experts)).tolist()
        prev = out.routing.get(name, [0] * len(counts))
        out.routing[name] = [a + b for a, b in zip(prev, counts)]

    return hook


def calibrated_table(
    loaded: LoadedModel,
    recipe: Recipe,
    text_file: Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    keep_factors: bool = False,
    stream: bool = False,
) -> tuple[Table, dict[str, Any]]:
    """The codes and scales of every linear held at `recipe.bits` and of the lm_head at its bits (a tied head's
    codes are the embedding table's too, found by row content wherever the table is held at the head's bits
    and block), by `recipe.rounding` over the calibration text, and the manifest's `calibration` entry (what was
    measured, and the Hessian-weighted output error of the calibrated rounding against plain rounding, summed
    over the linears, and the head's apart).

    `keep_factors` (`-gptq` for a format that rounds its own blocks, GGUF): the table holds each linear's
    importance and its input's Hessian Cholesky factor (`K^2` float32 per distinct input), not the core's codes,
    which such a format never reads (nor their output error). `stream` (with `keep_factors`; an export that no
    parity check follows in the same process): a layer is calibrated only when a weight of it is first looked
    up (`Table.more`), and each factor is dropped once every linear sharing it has been served
    (`Table.release_factors`), so about one layer's factors are held instead of the whole model's (LFM2-1.2B:
    0.3 GB against 5 GB). The entry is complete once `finish(table)` has run the remaining layers."""
    from lfm_export.quant import Quantized, quantize_block

    assert recipe.bits is not None
    table = Table()
    errors = {"nearest": 0.0, recipe.rounding: 0.0}
    head_errors = dict(errors)
    method = recipe.rounding
    factors: dict[int, np.ndarray] = {}  # one Hessian Cholesky factor per shared input (q/k/v, w1/w3)
    h32: dict[int, np.ndarray] = {}  # their Hessians in float32, for the output-error tally
    kept_f32: dict[int, np.ndarray] = {}  # their float32 copies the table keeps (`keep_factors`)

    threads = torch.get_num_threads()  # the export's (`--threads`)

    def layer_done(_idx: int, stats: dict[str, LinearStats]) -> None:
        for name, s in stats.items():
            bits = held_as(name, recipe) or recipe.bits  # a mix's bits and block, else the recipe's
            if name == HEAD and held_as(name, recipe) is None:
                continue  # a float head
            assert bits is not None
            w = _weight(loaded, name).float().numpy()
            block = block_as(name, recipe, w.shape[1])
            if keep_factors:  # the format rounds its own blocks: importance and factor only
                kept = None
                if s.tokens and id(s) not in kept_f32 and s.hessian is not None:
                    hessian, s.hessian = s.hessian, None  # no longer needed: its buffer is scratch
                    kept_f32[id(s)] = cholesky_factor(hessian, overwrite=True, act_order=KEPT_ACT_ORDER)
                    del hessian
                kept = kept_f32.get(id(s)) if s.tokens else None
                table.add(w, bits, block, None, None, s.mean_square if s.tokens else None, kept)
                continue
            if s.tokens == 0:  # an expert no token chose: plain rounding
                q = quantize_block(w, bits, block)
            elif method == "gptq":
                assert s.hessian is not None
                if id(s.hessian) not in factors:
                    factors[id(s.hessian)] = cholesky_factor(s.hessian)
                q = gptq(w, bits, block, s.hessian, factor=factors[id(s.hessian)], threads=threads)
            else:
                q = weighted_search(w, bits, block, s.mean_square)
            table.add(w, bits, block, q.codes, q.scales, s.mean_square if s.tokens else None)
            if s.hessian is not None:
                tally, every = (head_errors, HEAD_ERROR_ROWS) if name == HEAD else (errors, ERROR_ROWS)
                rows = slice(None, None, max(1, w.shape[0] // every))
                plain = quantize_block(w[rows], bits, block).dequantize()
                ours = Quantized(q.codes[rows], q.scales[rows], None, bits, block).dequantize()
                if id(s.hessian) not in h32:
                    h32[id(s.hessian)] = s.hessian.astype(np.float32)
                e_plain, e_ours = _output_errors(w[rows], (plain, ours), h32[id(s.hessian)])
                tally["nearest"] += e_plain
                tally[method] += e_ours
        factors.clear()  # the layer's Hessians are freed after this: their ids may be reused
        h32.clear()
        kept_f32.clear()

    entry: dict[str, Any] = {"rounding": method}

    def completed(calib: Calibration) -> None:
        entry.update(calib.manifest_entry())
        for key, tally in (
            ("output_error_vs_nearest", errors),
            ("head_output_error_vs_nearest", head_errors),
        ):
            if tally["nearest"] > 0:
                entry[key] = round(tally[method] / tally["nearest"], 4)

    steps = calibration_steps(loaded, text_file, tokens, method == "gptq", layer_done, head=True)
    if not (stream and keep_factors):
        completed(_last(steps))
        return table, entry

    seen: list[Calibration] = []

    def more() -> bool:
        """Calibrate the next layer; False once every layer is done (the entry then complete)."""
        calib = next(steps, None)
        if calib is None:
            table.more = None
            completed(seen[-1])
            return False
        seen[:] = [calib]
        return True

    table.more = more
    table.release_factors = True
    return table, entry


def _output_errors(w: np.ndarray, values: tuple[np.ndarray, ...], hessian: np.ndarray) -> list[float]:
    """`hessian_error(w, v, H)` for each of `values`, from one float32 product `D H` over all their rows
    (`hessian` float32; each row's `d H d^T` summed in float64): the manifest's output-error report, where
    float32 changes the ratio it rounds to 4 digits by about 1e-6 and halves the cost of the float64 product."""
    d = np.concatenate([np.asarray(w, np.float32) - v for v in values])
    per_row = np.einsum("ij,ij->i", d @ hessian, d, dtype=np.float64)
    n = w.shape[0]
    return [float(per_row[i * n : (i + 1) * n].sum()) for i in range(len(values))]


def _last(steps: Iterator[Calibration]) -> Calibration:
    return deque(steps, maxlen=1)[0]


def finish(table: Table) -> None:
    """Run a streamed table's remaining calibration layers (`calibrated_table(stream=True)`), so its manifest
    entry is complete; nothing for another table."""
    while table.more is not None and table.more():
        pass


def core_recipe(recipe: Any) -> Recipe | None:
    """The core recipe inside a backend's recipe object (its `recipe` field), or `recipe` itself."""
    core = getattr(recipe, "recipe", recipe)
    return core if isinstance(core, Recipe) else None


def needs_calibration(recipe: Any) -> bool:
    core = core_recipe(recipe)
    return core is not None and core.quantized and core.rounding in CALIBRATED_ROUNDINGS


def table_for_export(
    loaded: LoadedModel,
    recipe: Any,
    text_file: Path | None,
    tokens: int = DEFAULT_TOKENS,
    stream: bool = False,
) -> tuple[Table, dict[str, Any]] | None:
    """The calibrated table an export of `recipe` reads (None for a recipe that needs none; `--calib` with
    such a recipe is refused); `stream` as `calibrated_table`'s, where the recipe keeps factors."""
    if not needs_calibration(recipe):
        if text_file is not None:
            raise CalibrationError(
                f"--calib: recipe {getattr(recipe, 'name', recipe)} uses no calibration; "
                f"add one of {', '.join('-' + r for r in CALIBRATED_ROUNDINGS)} to --quant"
            )
        return None
    core = core_recipe(recipe)
    assert core is not None
    return calibrated_table(loaded, core, text_file, tokens, keeps_factors(recipe), stream)


def keeps_factors(recipe: Any) -> bool:
    """Whether an export of `recipe` (a backend's recipe object, or its manifest entry) rounds its own blocks by
    GPTQ from the calibration's Hessian Cholesky factors (`calibration_keeps_factors`: GGUF `-gptq`)."""
    if isinstance(recipe, dict):
        return bool(recipe.get("calibration_keeps_factors"))
    return bool(getattr(recipe, "calibration_keeps_factors", False))


def table_from_manifest(loaded: LoadedModel, manifest: dict[str, Any]) -> Table | None:
    """The calibrated table of an artifact, rebuilt from its manifest's `calibration` (same text, same
    tokens) to check its parity in another process; None for an artifact that needs none."""
    entry = manifest.get("calibration")
    name = manifest.get("recipe", {}).get("name", "fp32")
    try:
        core = Recipe.from_dict(manifest.get("recipe", {}))
    except (UserError, TypeError):
        return None
    if not (core.quantized and core.rounding in CALIBRATED_ROUNDINGS):
        return None
    if not entry:
        raise CalibrationError(f"{name}: the manifest records no calibration; cannot rebuild its codes")
    text = None if entry["corpus"] in (BUNDLED, RANDOM_IDS) else Path(entry["corpus"])
    path = CORPUS if text is None else text
    if entry["corpus"] != RANDOM_IDS and (
        not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["corpus_sha256"]
    ):
        raise CalibrationError(
            f"{path}: not the calibration text the artifact was exported with (sha256 differs or missing)"
        )
    table, _ = calibrated_table(
        loaded, core, text, int(entry["tokens"]), keeps_factors(manifest.get("recipe", {}))
    )
    return table
