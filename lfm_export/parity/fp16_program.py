"""The exact check of Core ML artifacts run by the reference interpreter: the simulation rounded as the program is.

The `-fp16` / `-fp16-moe` gates compare a Core ML artifact with the recipe's simulation, which rounds only each
linear's input to fp16 (`lfm_export.quant`, activation mode `fp16`); the program rounds every op's result, so
their scenario limits allow for what fp16 rounding does (about 1.3e-3 of the logit scale on `tiny-moe` int4),
and a 2% error in one MoE expert sits under that. The numpy interpreter (`lfm_export.runtime.
coreml_interpreter`) is deterministic: every op computes in float32 with numpy and rounds to the dtype its output
declares. `program_model` turns the simulation into a model that computes the same way, op by op: the ops the
conversion keeps in fp32 (`lfm_export.backends.coreml.precision`: RMSNorm statistics, attention scores through
the softmax, the MoE router through the normalised routing weights, the RoPE angles) in float32, every other
op's result rounded to fp16, each computed by the interpreter's own op kernel (`OPS`) on the operands the
program gives it (the KV cache read whole, `max_seq_len` slots, masked; an MoE layer in the program's form:
`sparse` gathers each token's top-k expert matrices and sums their weighted outputs in float32, `dense` adds
every expert's weighted output in turn in fp16). The held weights are the simulation's (the same rows the
stored-weights check compares) with the float-held ones (norms, conv kernels) rounded to fp16 as the program
holds them, and the MoE routers' taken from the float32 model, as the program keeps them.

Measured (`benchmarks/coreml_fp16_program.py`): an honest artifact equals this model bit for bit at every
position of the parity prompts (logits, keys, values, conv states), so the row's limit (`LIMIT`) only allows a
flipped fp16 step in a logit well below the position's largest; a matrix 1-2% off changes some position by
one fp16 step of its largest logits or more. Core ML itself orders its sums otherwise (its CPU, GPU and Neural
Engine kernels), so this row applies only where the session is the interpreter (`CoreMLSession.rounds_op_by_op`);
on a device the gate's scenario limits stay as they are.

The prompts are the parity prompts (`lfm_export.parity.boundary.prompts_for`, 64 positions), each fed in the
chunks the session feeds (`chunks`), from an empty state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lfm_export.contract.session import Session
from lfm_export.contract.signature import CONV, KEY, VALUE, past_name
from lfm_export.parity.exact_row import ExactInputs, PositionRow, first_position, relative_error
from lfm_export.parity.report import _num
from lfm_export.parity.thresholds import FP16_PROGRAM_LIMIT

SCENARIO = "fp16_program_prefill"
"""The report row of this check."""
METRIC = "logit_max_rel"
LIMIT = FP16_PROGRAM_LIMIT
ATTRIBUTE = "rounds_op_by_op"
"""The session attribute that says its runtime is the numpy interpreter (`CoreMLSession` with engine
`interpreter`): True where this check applies."""

_F16 = np.float16
_F32 = np.float32


def _ops() -> dict[str, Any]:
    from lfm_export.runtime.coreml_interpreter import OPS

    return OPS


@dataclass
class ProgramResult(PositionRow):
    """Per run: positions compared, the largest and median logit error (over each position's largest simulated
    logit), the largest state error (keys, values, conv states over each tensor's largest magnitude), the
    positions that differ at all, and the first ones over `LIMIT` (prompt, position, error)."""

    name: ClassVar[str] = SCENARIO
    metric: ClassVar[str] = METRIC
    runs: ClassVar[str] = (
        "the artifact through the Core ML interpreter against the simulation rounded op by op as the program is"
    )
    summary_keys: ClassVar[tuple[str, ...]] = (
        "passed",
        "positions",
        "logit_max_rel",
        "state_max_rel",
        "differing_positions",
    )
    state_max_rel: float = 0.0
    differing: int = 0
    over: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def worst(self) -> float:
        """The larger of the logit and the state error: the row holds both to `LIMIT`."""
        return max(self.max_rel, self.state_max_rel)

    @property
    def limit(self) -> float:
        return LIMIT

    @property
    def passed(self) -> bool:
        return self.positions > 0 and self.max_rel <= LIMIT and self.state_max_rel <= LIMIT

    @property
    def first_failure(self) -> str | None:
        where = first_position(self, self.over)
        return "the state" if where is None and not self.passed else where

    def describe(self) -> str:
        head = (
            f"{self.positions} positions against the simulation rounded op by op as the interpreter runs the "
            f"program: logit max rel {self.max_rel:.2g} (median {self.median_rel:.2g}), state max rel "
            f"{self.state_max_rel:.2g}, {self.differing} positions not bit-identical (limit {LIMIT:g})"
        )
        if not self.over:
            return head
        where = ", ".join(f"prompt {p} position {t} ({e:.2g})" for p, t, e in self.over[:3])
        return f"{head}; over the limit at {where}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "positions": self.positions,
            "logit_max_rel": self.max_rel,
            "logit_median_rel": self.median_rel,
            "state_max_rel": self.state_max_rel,
            "differing_positions": self.differing,
            "limit": LIMIT,
            "over": [{"prompt": p, "position": t, "logit_max_rel": e} for p, t, e in self.over],
        }

    def note(self) -> str:
        return (
            f"fp16 program prefill {self.verdict} (interpreter engine only; Core ML's own engines order sums "
            f"otherwise and keep the scenario limits): {self.positions} positions against the simulation rounded "
            f"op by op as the interpreter runs the program: logit max rel {_num(self.max_rel)}, state max rel "
            f"{_num(self.state_max_rel)}, {self.differing} positions not bit-identical (limit {_num(LIMIT)})."
        )


def applies(session: Any, activations: Any) -> bool:
    """True where the check runs: the session is the interpreter and the simulation rounds to fp16 (one mode)."""
    from lfm_export.recipes import ACT_FP16, ACT_FP16_ROUTED

    return bool(getattr(session, ATTRIBUTE, False)) and activations in (ACT_FP16, ACT_FP16_ROUTED)


# ---- the model --------------------------------------------------------------------------------------------------


def _half(t: Any) -> np.ndarray:
    return np.asarray(t.detach().float().numpy() if hasattr(t, "detach") else t, dtype=_F32).astype(_F16)


class _Linear:
    """`linear` of the program: float32 product of the fp16 input and the held weight, rounded to fp16 (the
    router: float32 throughout). The weight is the simulation's own tensor, not a copy: every linear of a Core ML
    simulation but the router already holds fp16 values (`simulate` rounds the weights of float recipes, and
    the backend's `weight_values` decodes to fp16)."""

    def __init__(self, mod: Any, router: bool) -> None:
        self.weight = mod.weight.detach().float().numpy()
        bias = getattr(mod, "bias", None)
        self.bias = None if bias is None else _half(bias).astype(_F32)
        self.router = router

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = _ops()["linear"](x, self.weight, self.bias)
        return out if self.router else out.astype(_F16)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ops = _ops()
    a = x.astype(_F32)
    mean = ops["reduce_mean"](ops["pow"](a, _F32(2.0)), axes=[-1], keep_dims=True)
    scale = ops["rsqrt"](ops["add"](mean, _F32(eps)), epsilon=_F32(1e-12))
    return ops["mul"](weight, ops["mul"](a, scale).astype(_F16)).astype(_F16)


def _mlp(lin: dict[str, _Linear], x: np.ndarray) -> np.ndarray:
    ops = _ops()
    gate = ops["silu"](lin["w1"](x)).astype(_F16)
    return lin["w2"](ops["mul"](gate, lin["w3"](x)).astype(_F16))


class ProgramModel:
    """`simulated` (a `lfm_export.quant.simulate` model) computing as the interpreter runs its Core ML program
    (module doc): `forward(ids [1, T], state)` -> `(logits [1, T, V] float32, state)`; `state` is
    `empty_state()` or what the last call returned (conv states, keys, values: fp16)."""

    def __init__(
        self, simulated: Any, max_seq_len: int, moe_form: str = "sparse", reference: Any = None
    ) -> None:
        from lfm_export.model import MoE
        from lfm_export.precision import ROUTER, rule_for

        cfg = simulated.config
        self.config, self.slots, self.moe_form = cfg, int(max_seq_len), moe_form
        m = simulated.model
        self.embed = _half(m.embed_tokens.weight).astype(_F32)
        self.final_norm = _half(m.embedding_norm.weight).astype(_F32)
        self.eps = float(cfg.norm_eps)
        self.head = _Linear(simulated.lm_head, False)
        self.layers: list[dict[str, Any]] = []
        for i, layer in enumerate(m.layers):
            d: dict[str, Any] = {
                "attn": layer.is_attention,
                "op_norm": _half(layer.operator_norm.weight).astype(_F32),
                "ffn_norm": _half(layer.ffn_norm.weight).astype(_F32),
            }
            if layer.is_attention:
                a = layer.self_attn
                d.update(
                    {n: _Linear(getattr(a, n), False) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
                    q_norm=_half(a.q_layernorm.weight).astype(_F32),
                    k_norm=_half(a.k_layernorm.weight).astype(_F32),
                )
            else:
                c = layer.conv
                d.update(
                    in_proj=_Linear(c.in_proj, False),
                    out_proj=_Linear(c.out_proj, False),
                    kernel=_half(c.conv.weight).astype(_F32),
                    kernel_bias=None if c.conv.bias is None else _half(c.conv.bias).astype(_F32),
                )
            ff = layer.feed_forward
            if isinstance(ff, MoE):
                router = f"model.layers.{i}.feed_forward.gate.weight"
                # the program keeps the router's weight in float32 whatever the recipe; the simulation of a
                # float recipe holds it rounded to the recipe's type
                gate = ff.gate if reference is None else reference.model.layers[i].feed_forward.gate
                d["moe"] = {
                    "gate": _Linear(gate, rule_for(router) is ROUTER),
                    "bias": None
                    if not ff.use_expert_bias
                    else np.asarray(ff.expert_bias.detach().float().numpy(), dtype=_F32),
                    "top_k": int(ff.top_k),
                    "norm": bool(ff.norm_topk_prob),
                    "scale": float(ff.scale),
                    "experts": [
                        {n: _Linear(getattr(e, n), False) for n in ("w1", "w2", "w3")} for e in ff.experts
                    ],
                }
            else:
                d["mlp"] = {n: _Linear(getattr(ff, n), False) for n in ("w1", "w2", "w3")}
            self.layers.append(d)

    def empty_state(self) -> dict[str, list[np.ndarray]]:
        cfg = self.config
        kv = (1, cfg.num_key_value_heads, 0, cfg.head_dim)
        return {
            "conv": [np.zeros((1, cfg.hidden_size, cfg.conv_state_len), _F16) for _ in cfg.conv_layers],
            "keys": [np.zeros(kv, _F16) for _ in cfg.attn_layers],
            "values": [np.zeros(kv, _F16) for _ in cfg.attn_layers],
        }

    def forward(self, ids: np.ndarray, state: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, dict]:
        from lfm_export.model import rope_inv_freq

        ops, cfg = _ops(), self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        past = state["keys"][0].shape[2] if state["keys"] else 0
        positions = np.arange(ids.shape[1], dtype=np.int32) + np.int32(past)
        freqs = ops["mul"](
            positions.astype(_F32)[:, None], rope_inv_freq(cfg.head_dim, cfg.rope_theta).numpy()
        )
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = ops["cos"](emb).astype(_F16), ops["sin"](emb).astype(_F16)
        h = self.embed[ids].astype(_F16)
        new = {"conv": [], "keys": [], "values": []}
        ci = ai = 0
        for d in self.layers:
            x = _rms_norm(h, d["op_norm"], self.eps)
            if d["attn"]:
                x, k, v = self._attention(d, x, cos, sin, positions, state["keys"][ai], state["values"][ai])
                new["keys"].append(k)
                new["values"].append(v)
                ai += 1
            else:
                x, s = self._conv(d, x, state["conv"][ci])
                new["conv"].append(s)
                ci += 1
            h = ops["add"](h, x).astype(_F16)
            y = _rms_norm(h, d["ffn_norm"], self.eps)
            y = self._moe(d["moe"], y) if "moe" in d else _mlp(d["mlp"], y)
            h = ops["add"](h, y).astype(_F16)
        logits = self.head(_rms_norm(h, self.final_norm, self.eps))
        return logits.astype(_F32), new

    def _conv(self, d: dict[str, Any], x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ops = _ops()
        proj = np.swapaxes(d["in_proj"](x), 1, 2)
        b, c, xx = np.split(proj, 3, axis=1)
        z = np.concatenate([state, ops["mul"](b, xx).astype(_F16)], axis=2)
        conv = ops["conv"](
            z, d["kernel"], d["kernel_bias"], strides=[1], pad_type="valid", dilations=[1], groups=z.shape[1]
        ).astype(_F16)
        y = ops["mul"](c, conv).astype(_F16)
        return d["out_proj"](np.swapaxes(y, 1, 2)), z[:, :, -(self.config.conv_L_cache - 1) :]

    def _attention(
        self,
        d: dict[str, Any],
        x: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        positions: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ops, cfg = _ops(), self.config
        t, hd, heads, n_kv = x.shape[1], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = _rms_norm(d["q_proj"](x).reshape(1, t, heads, hd), d["q_norm"], self.eps)
        k = _rms_norm(d["k_proj"](x).reshape(1, t, n_kv, hd), d["k_norm"], self.eps)
        v = d["v_proj"](x).reshape(1, t, n_kv, hd).transpose(0, 2, 1, 3)
        q, k = (self._rope(a.transpose(0, 2, 1, 3), cos, sin) for a in (q, k))
        keys = np.concatenate([k_cache, k], axis=2)
        values = np.concatenate([v_cache, v], axis=2)
        held = keys.shape[2]
        pad = ((0, 0), (0, 0), (0, max(self.slots, held) - held), (0, 0))
        kk = np.repeat(np.pad(keys, pad), heads // n_kv, axis=1)
        vv = np.repeat(np.pad(values, pad), heads // n_kv, axis=1)
        scores = ops["matmul"](q, np.swapaxes(kk, -1, -2)).astype(_F16)
        scores = ops["mul"](scores, _F32(hd**-0.5))
        allowed = np.arange(kk.shape[2])[None, :] <= positions[:, None]
        scores = ops["select"](~allowed[None, None], _F32(-3.4e38), scores)
        probs = ops["softmax"](scores, axis=-1).astype(_F16)
        out = ops["matmul"](probs, vv).astype(_F16).transpose(0, 2, 1, 3).reshape(1, t, heads * hd)
        return d["out_proj"](out), keys, values

    @staticmethod
    def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        ops = _ops()
        half = x.shape[-1] // 2
        rotated = np.concatenate([(-x[..., half:].astype(_F32)).astype(_F16), x[..., :half]], axis=-1)
        a = ops["mul"](x, cos).astype(_F16)
        b = ops["mul"](rotated, sin).astype(_F16)
        return ops["add"](a, b).astype(_F16)

    def _route(self, moe: dict[str, Any], flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Selected experts `[N, k]` and their routing weights `[N, k]` (fp16, as the program casts them)."""
        ops = _ops()
        scores = ops["sigmoid"](moe["gate"](flat.astype(_F32)).astype(_F32))
        choice = scores if moe["bias"] is None else ops["add"](scores, moe["bias"])
        _, idx = ops["topk"](choice, k=moe["top_k"], axis=-1)
        w = ops["gather_along_axis"](scores, idx, axis=-1)
        if moe["norm"]:
            total = ops["add"](ops["reduce_sum"](w, axes=[-1], keep_dims=True), _F32(1e-6))
            w = ops["real_div"](w, total)
        w = w.astype(_F16)
        if moe["scale"] != 1.0:
            w = ops["mul"](w, _F16(moe["scale"])).astype(_F16)
        return idx.astype(np.int64), w

    def _moe(self, moe: dict[str, Any], x: np.ndarray) -> np.ndarray:
        ops = _ops()
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self._route(moe, flat)
        if self.moe_form == "dense":
            dense = np.zeros((flat.shape[0], len(moe["experts"])), _F32)
            np.put_along_axis(dense, idx, w.astype(_F32), axis=-1)
            dense = dense.astype(_F16)
            out = np.zeros(flat.shape, _F16)
            for e, lin in enumerate(moe["experts"]):
                part = ops["mul"](dense[:, e : e + 1], _mlp(lin, flat)).astype(_F16)
                out = ops["add"](out, part).astype(_F16)
            return out.reshape(shape)
        k = idx.shape[-1]
        pick = idx.reshape(-1)
        xi = flat[:, None, :, None]

        def gathered(name: str) -> np.ndarray:
            """The program's `gather` of the stacked expert matrices by the top-k indices, `[N, k, out, in]`."""
            rows = np.stack([moe["experts"][int(e)][name].weight for e in pick])
            return rows.reshape(-1, k, *rows.shape[1:])

        h1 = ops["matmul"](gathered("w1"), xi).astype(_F16)[..., 0]
        h3 = ops["matmul"](gathered("w3"), xi).astype(_F16)[..., 0]
        hh = ops["mul"](ops["silu"](h1).astype(_F16), h3).astype(_F16)
        y = ops["matmul"](gathered("w2"), hh[..., None]).astype(_F16)[..., 0]
        weighted = ops["mul"](w[..., None], y).astype(_F16)
        return ops["reduce_sum"](weighted, axes=[1], keep_dims=False).astype(_F16).reshape(shape)


def program_model(
    simulated: Any, max_seq_len: int, moe_form: str = "sparse", reference: Any = None
) -> ProgramModel:
    """The model computing as the interpreter runs the Core ML program of `simulated` (module doc);
    `reference`: the float32 model `simulated` was made from, whose MoE routers the program holds as they are
    (`simulate` rounds them to fp16 in an fp16 recipe)."""
    return ProgramModel(simulated, max_seq_len, moe_form, reference)


# ---- the check --------------------------------------------------------------------------------------------------


def _state_error(
    session: Session, model: ProgramModel, state: dict[str, list[np.ndarray]], length: int
) -> float:
    """The largest relative error of the session's state against the model's after a prompt of `length` (the
    conv states, and the keys and values of the prompt's positions); 0 where the session hides its state."""
    held = session.state()
    if not held:
        return 0.0
    cfg = model.config
    worst = 0.0
    pairs = [(past_name(CONV, layer), state["conv"][i]) for i, layer in enumerate(cfg.conv_layers)]
    for i, layer in enumerate(cfg.attn_layers):
        pairs += [(past_name(KEY, layer), state["keys"][i]), (past_name(VALUE, layer), state["values"][i])]
    for name, mine in pairs:
        theirs = held.get(name)
        if theirs is None:
            continue
        theirs = np.asarray(theirs, dtype=np.float32)
        if name.endswith(CONV) or theirs.ndim != 4:
            worst = max(worst, relative_error(theirs, mine.astype(_F32)))
        else:
            worst = max(worst, relative_error(theirs[:, :, :length], mine.astype(_F32)))
    return worst


def run(session: Session, model: ProgramModel, prompts: list[np.ndarray]) -> ProgramResult:
    """The artifact `session` against `model` on each prompt (`[1, T]` ids) from an empty state, fed in the
    chunks the session feeds (its `chunks(n)` where it has one). Leaves `session` reset."""
    out = ProgramResult()
    errors: list[float] = []
    for p, ids in enumerate(prompts):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        session.reset(1)
        artifact = np.asarray(session.prefill(ids), dtype=np.float32)[0]
        state = model.empty_state()
        parts = []
        chunks = getattr(session, "chunks", None)
        start = 0
        for step in chunks(ids.shape[1]) if callable(chunks) else [ids.shape[1]]:
            logits, state = model.forward(ids[:, start : start + step], state)
            parts.append(logits[0])
            start += step
        simulated = np.concatenate(parts, axis=0)
        for t in range(ids.shape[1]):
            err = relative_error(artifact[t], simulated[t])
            errors.append(err)
            out.differing += int(err > 0)
            if err > LIMIT:
                out.over.append((p, t, err))
        out.state_max_rel = max(out.state_max_rel, _state_error(session, model, state, ids.shape[1]))
    session.reset(1)
    out.take(errors)
    return out


def exact_row(inputs: ExactInputs) -> ProgramResult | None:
    """The row of a Core ML artifact (`Backend.exact_row`): the prompts through the artifact against the core
    simulation rounded op by op as the program is (the recipe's MoE form); None where the check does not apply
    (`applies`) or no core simulation runs."""
    session = inputs.session
    if inputs.simulated is None or not applies(session, inputs.activations):
        return None
    form = inputs.manifest["recipe"].get("moe_form", "sparse")
    model = program_model(inputs.simulated, session.max_seq_len, form, reference=inputs.reference)
    return run(session, model, inputs.prompts)
