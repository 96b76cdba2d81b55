"""The fp32 reference and the recipe's simulation computed one decoder layer at a time from lazy weights: parity
on a model whose float32 copies do not fit in memory (LFM2-8B-A1B: 33.4 GB each).

How a streaming parity run goes (`run_parity(..., streaming=...)`):

1. The scenarios run against the artifact's session with `Recorder` sessions standing in for the reference, the
   simulation and the simulation without activation rounding. A recorder keeps the token ids fed since each
   reset (a *segment*) and returns placeholder logits whose column `TAG` holds a number naming the position
   (segment, batch row, position) and column `MARK` the constant `MARK_VALUE`. The scenarios only select and
   stack rows of the comparisons' logits, so every compared row still carries its tag afterwards. The tokens
   fed after a prompt are the *artifact's* greedy choices (`Sessions.chooser`): the simulation's are known
   only after step 2.
2. `StreamingReference.complete` streams the model: the embedding, then for each decoder layer its weights
   produced from the lazy source (`lfm_export.weights`) in fp32, and the simulated copy of that layer alone
   (`lfm_export.quant.simulate` with the layer's canonical name prefix, so the precision rules apply as
   ever); every segment's hidden states go through it as one full-sequence causal forward from an empty
   state; the layer is freed and the next one produced; then the final norm and the lm_head for the tagged
   positions only. A causal full-sequence forward equals the same tokens fed stepwise with the state carried
   (conv state and KV cache): each position sees exactly the positions before it, so the logits are what
   the recorded prefill / decode calls would have returned, up to float summation order (about 1e-6
   relative, `tests/core/test_streaming_reference.py`). The MoE layers run in the sparse form (the same
   numbers as the dense one).
3. The tags in every scenario's logits are replaced by those logits, and each recorder's `state()` (taken at
   a segment's end) is filled with that segment's final conv states and KV caches; then the metrics and
   gates run as for an in-memory reference.

Peak memory: one layer's weights per variant (the simulation's rounding-free copy shares the simulation's
weights), the embedding table and lm_head per variant, every segment's hidden states per variant, and the
compared positions' logits. The simulated weights are hashed row by row as they are made, for the stored
weights check (`pool`).

Covered: every scenario whose comparisons see prefill / decode calls after a reset: `prefill`, `decode` (by
replay), `chunked_prefill`, `batch2`, and the fill scenarios (`near_max_seq_len`, `long_context`) up to
`STREAM_FILL_LIMIT` tokens (skipped above it: the whole fill is one sequence here). The snapshot scenario
runs on the artifact's session alone, as ever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm_export.config import Lfm2Config
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.signature import CONV, KEY, VALUE, past_name
from lfm_export.model import GROWING, MOE_SPARSE, DecoderLayer, MoE, RMSNorm, rope_cos_sin
from lfm_export.parity.stored_weights import RowPool, simulated_weights
from lfm_export.weights import WeightSource

if TYPE_CHECKING:
    from lfm_export.quant import WeightValues
    from lfm_export.recipes import Recipe

STREAM_FILL_LIMIT = 4096
"""Longest sequence a streamed fill scenario computes (the attention scores of one layer are `T x T` per head)."""
TAG, MARK = 0, 1
MARK_VALUE = -7.25
"""Placeholder logits carry this in column `MARK` (a tagged row, not logits) and the row's tag in column
`TAG`: tags are integers below 2**24, exact in float32."""
COVERAGE = (
    "one layer at a time from the lazy weights; every position of every recorded sequence computed by one "
    "full-sequence causal forward (what stepwise decoding with the state carried computes); tokens fed after a "
    f"prompt are the artifact's greedy choices; fills above {STREAM_FILL_LIMIT} tokens skipped"
)


@dataclass
class Segment:
    """The token ids fed since one reset, call by call, and the `state()` dicts handed out on them."""

    batch: int
    calls: list[np.ndarray] = field(default_factory=list)
    states: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    """`(tokens fed when asked, the dict returned)`: filled with the segment's final state."""

    @property
    def length(self) -> int:
        return sum(c.shape[1] for c in self.calls)

    def tokens(self) -> np.ndarray:
        return np.concatenate(self.calls, axis=1)


class Recorder(SessionBase):
    """A stand-in for one comparison session (the reference, the simulation, ...) during the scenarios: keeps
    every segment's token ids and returns tagged placeholder logits (module doc); `StreamingReference.complete`
    puts the real logits and states in their place."""

    def __init__(self, name: str, vocab_size: int, max_seq_len: int | None) -> None:
        self.name, self.vocab_size, self.max_seq_len = name, vocab_size, max_seq_len
        self.segments: list[Segment] = []
        self.tags: list[tuple[int, int, int]] = []
        """`(segment, batch row, position)` of each tag."""
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        self.segments.append(Segment(batch_size))

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        seg = self.segments[-1]
        b, t = ids.shape
        start = seg.length
        first = len(self.tags)
        self.tags.extend((len(self.segments) - 1, r, start + p) for r in range(b) for p in range(t))
        if len(self.tags) >= 1 << 24:
            raise SessionError(f"{self.name}: more positions than the streaming reference can tag")
        seg.calls.append(np.array(ids, dtype=np.int64, copy=True))
        out = np.zeros((b, t, self.vocab_size), dtype=np.float32)
        out[:, :, TAG] = np.arange(first, first + b * t, dtype=np.float32).reshape(b, t)
        out[:, :, MARK] = MARK_VALUE
        return out

    def state(self) -> dict[str, np.ndarray]:
        seg = self.segments[-1]
        d: dict[str, np.ndarray] = {}
        seg.states.append((seg.length, d))
        return d

    def rows(self, logits: np.ndarray) -> list[tuple[int, int, int]]:
        """The `(segment, row, position)` of every row of stacked placeholder logits `[N, vocab]`."""
        arr = np.asarray(logits).reshape(-1, self.vocab_size)
        if not np.all(arr[:, MARK] == MARK_VALUE):
            raise SessionError(
                f"{self.name}: a scenario changed the placeholder logits (not only selected rows)"
            )
        return [self.tags[int(t)] for t in arr[:, TAG]]


def _layer_names(cfg: Lfm2Config, i: int) -> list[str]:
    with torch.device("meta"):
        return list(DecoderLayer(cfg, i).state_dict().keys())


class _Ends(nn.Module):
    """The parts of the canonical model outside the decoder layers, under their canonical names:
    `model.embed_tokens`, `model.embedding_norm`, `lm_head`."""

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class StreamingReference:
    """The reference (fp32), and where parity needs them the recipe's simulation and the simulation without
    activation rounding, as `Recorder`s (`reference`, `simulation`, `rounding`) computed afterwards by
    `complete` one layer at a time from `source` (module doc).

    `recipe`, `activations`, `weights`: as `lfm_export.quant.simulate` takes them (None: no simulation);
    `rounding`: also the simulation with float activations (the rounding-effect session)."""

    fill_limit = STREAM_FILL_LIMIT
    coverage = COVERAGE

    def __init__(
        self,
        config: Lfm2Config,
        source: WeightSource,
        max_seq_len: int | None,
        recipe: Recipe | None = None,
        activations: Any = "float",
        weights: WeightValues | None = None,
        rounding: bool = False,
        threads: int = DEFAULT_THREADS,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if rounding and recipe is None:
            raise ValueError("the rounding-effect session needs a simulation")
        self.config, self.source = config, source
        self.recipe, self.activations, self.weights, self.threads = recipe, activations, weights, threads
        self.progress = progress
        vocab = config.vocab_size
        self.reference = Recorder("reference", vocab, max_seq_len)
        self.simulation = None if recipe is None else Recorder("simulated", vocab, max_seq_len)
        self.rounding = Recorder("simulated-float-activations", vocab, max_seq_len) if rounding else None
        self.pool = RowPool()
        """The simulation's quantized weights, row digests (`lfm_export.parity.stored_weights.compare`)."""
        self.completed = False

    @property
    def recorders(self) -> list[Recorder]:
        return [r for r in (self.reference, self.simulation, self.rounding) if r is not None]

    # ---- the variants of one part of the model --------------------------------------------------------------
    def _variants(self, fp32: nn.Module, prefix: str) -> list[nn.Module]:
        """`[fp32, simulated, simulated with float activations]` of one part (as many as there are recorders);
        the simulated weights join the stored-weights pool."""
        out = [fp32]
        if self.recipe is None:
            return out
        from lfm_export.quant import simulate, with_activations

        sim = simulate(fp32, self.recipe, self.activations, self.threads, self.weights, prefix=prefix)
        out.append(sim)
        if self.recipe.quantized:
            for _, w in simulated_weights(sim, self.recipe, prefix):
                self.pool.add(w)
        if self.rounding is not None:
            out.append(with_activations(sim, "float"))
        return out

    def _load(self, module: nn.Module, prefix: str) -> nn.Module:
        state = {n: self.source.get(prefix + n) for n in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module.eval()

    def _ends(self) -> nn.Module:
        with torch.device("meta"):
            ends = _Ends(self.config)
        ends.model.load_state_dict(
            {n: self.source.get(f"model.{n}") for n in ends.model.state_dict()}, assign=True
        )
        if self.config.tie_word_embeddings:
            ends.lm_head.weight = ends.model.embed_tokens.weight
        else:
            ends.lm_head.load_state_dict({"weight": self.source.get("lm_head.weight")}, assign=True)
        return ends.eval()

    def _layer(self, i: int) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.config, i)
        self._load(layer, f"model.layers.{i}.")
        if isinstance(layer.feed_forward, MoE):
            layer.feed_forward.form = MOE_SPARSE
        return layer

    def _note(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    # ---- the pass -------------------------------------------------------------------------------------------
    def complete(self, runs: list[Any], comparisons: list[Any]) -> None:
        """Compute every recorded segment through the model one layer at a time and put the real logits and
        final states in place of the placeholders in `runs` (`lfm_export.parity.scenarios.ScenarioRun`, which
        imports this module's type), whose `logits` lists start with `comparisons`
        (this object's recorders, in the order the scenarios drove them)."""
        recorders = self.recorders
        if sorted(map(id, comparisons)) != sorted(map(id, recorders)):
            raise ValueError("the comparisons of a streaming run are its recorders")
        variant = [next(v for v, r in enumerate(recorders) if r is c) for c in comparisons]
        segments = recorders[0].segments
        for r in recorders[1:]:
            if len(r.segments) != len(segments) or any(
                a.batch != b.batch or not np.array_equal(a.tokens(), b.tokens())
                for a, b in zip(r.segments, segments, strict=True)
                if a.calls or b.calls
            ):
                raise SessionError(f"{r.name} was fed other tokens than {recorders[0].name}")
        wanted: list[dict[int, set[tuple[int, int]]]] = [{} for _ in recorders]
        for run in runs:
            for slot, v in enumerate(variant):
                for s, b, p in recorders[v].rows(run.logits[slot]):
                    wanted[v].setdefault(s, set()).add((b, p))
        live = sorted({s for w in wanted for s in w} | {i for i, g in enumerate(segments) if g.states})
        logits, states = self._stream([segments[s] for s in live], wanted, live)
        for run in runs:
            for slot, v in enumerate(variant):
                rows = [logits[v][key] for key in recorders[v].rows(run.logits[slot])]
                run.logits[slot] = (
                    np.stack(rows) if rows else np.zeros((0, self.config.vocab_size), np.float32)
                )
        for v, rec in enumerate(recorders):
            for j, s in enumerate(live):
                for length, d in rec.segments[s].states:
                    if length != segments[s].length:
                        raise SessionError(f"{rec.name}: state read in the middle of a sequence")
                    d.update(states[v][j])
        self.completed = True

    def _stream(
        self, segments: list[Segment], wanted: list[dict[int, set[tuple[int, int]]]], ids: list[int]
    ) -> tuple[list[dict[tuple[int, int, int], np.ndarray]], list[list[dict[str, np.ndarray]]]]:
        """Logits of the wanted `(segment, row, position)` and every segment's final state, per variant."""
        cfg = self.config
        n_var = len(self.recorders)
        tokens = [torch.from_numpy(seg.tokens()) for seg in segments]
        positions = [torch.arange(t.shape[1]) for t in tokens]
        rope = [rope_cos_sin(p, cfg.head_dim, cfg.rope_theta) for p in positions]
        states: list[list[dict[str, np.ndarray]]] = [[{} for _ in segments] for _ in range(n_var)]
        with torch.no_grad():
            self._note("embedding")
            ends = self._variants(self._ends(), "")
            hidden = [[e.model.embed_tokens(t) for t in tokens] for e in ends]
            for i in range(cfg.num_hidden_layers):
                self._note(f"layer {i + 1}/{cfg.num_hidden_layers}")
                layers = self._variants(self._layer(i), f"model.layers.{i}.")
                for v, layer in enumerate(layers):
                    for j, h in enumerate(hidden[v]):
                        state = self._empty_state(layer, h)
                        cos, sin = rope[j]
                        hidden[v][j], new = layer.step(h, state, cos, sin, positions[j], GROWING, None)
                        if layer.is_attention:
                            states[v][j][past_name(KEY, i)] = new[0].float().numpy()
                            states[v][j][past_name(VALUE, i)] = new[1].float().numpy()
                        else:
                            states[v][j][past_name(CONV, i)] = new[0].float().numpy()
                del layers
            self._note("lm_head")
            logits: list[dict[tuple[int, int, int], np.ndarray]] = [{} for _ in range(n_var)]
            for v, end in enumerate(ends):
                for j, s in enumerate(ids):
                    rows = sorted(wanted[v].get(s, ()))
                    if not rows:
                        continue
                    b = torch.tensor([r for r, _ in rows])
                    p = torch.tensor([q for _, q in rows])
                    out = end.lm_head(end.model.embedding_norm(hidden[v][j][b, p])).float().numpy()
                    for k, (r, q) in enumerate(rows):
                        logits[v][(s, r, q)] = out[k]
        return logits, states

    def _empty_state(self, layer: DecoderLayer, h: Tensor) -> tuple[Tensor, ...]:
        cfg = self.config
        b = h.shape[0]
        if layer.is_attention:
            kv = torch.zeros(b, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=h.dtype)
            return kv, kv.clone()
        return (torch.zeros(b, cfg.hidden_size, cfg.conv_state_len, dtype=h.dtype),)

    def describe(self) -> dict[str, Any]:
        """What the report says about this reference (`ParityResult.streaming`)."""
        return {"form": "streaming", "coverage": self.coverage, "fill_limit": self.fill_limit}
