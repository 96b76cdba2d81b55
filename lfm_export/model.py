"""Canonical LFM2 / LFM2-MoE in PyTorch, written for export.

State is passed in and returned explicitly; no Python branches on tensor values, so `torch.export` traces it
with dynamic batch, sequence and past length. Module names match the checkpoint names.

Two KV-cache forms, chosen by the caller:
- growing: `keys[i]` is `[B, kv_heads, P, head_dim]`, the new keys are concatenated -> `[B, kv_heads, P+T, hd]`;
  positions are `P + arange(T)`; `attention_mask` `[B, P+T]` masks padded keys.
- static: `keys[i]` is `[B, kv_heads, S, head_dim]` preallocated; the new keys are written at
  `input_pos + arange(T)` and queries see keys at positions `<= their own`.
- stateful: as static, but the new keys are written in place into the `keys[i]` passed in (the caller's
  buffers, see `lfm_export.stateful`), which are also returned.
Conv state per conv layer is `[B, hidden, L-1]` in every form.

Two MoE forms, chosen by `Lfm2ForCausalLM.set_moe_form`: `dense` (default; every expert on every token) and
`sparse` (each expert only on the tokens routed to it), see `MoE`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.config import LAYER_ATTN, Lfm2Config

GROWING = "growing"
STATIC = "static"
STATEFUL = "stateful"
KV_FORMS = (GROWING, STATIC, STATEFUL)
MOE_DENSE = "dense"
MOE_SPARSE = "sparse"
MOE_FORMS = (MOE_DENSE, MOE_SPARSE)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ff, bias=False)
        self.w3 = nn.Linear(hidden, ff, bias=False)
        self.w2 = nn.Linear(ff, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sigmoid-routed top-k experts, in one of two forms that give the same numbers (`form`):

    - `dense` (default): every expert runs on every token and unselected ones get weight 0. Exact,
      shape-static and traceable; the ONNX backend pattern-matches it into its fused MoE op.
    - `sparse`: for each expert, the rows routed to it are gathered (`nonzero` + `index_select`), run through
      the expert and added back (`index_add`), so a backend without a MoE op reads only the selected
      experts' weights. The per-expert row counts are data-dependent sizes, which `torch.export` traces as
      unbacked symbols bounded by the token count. Measured on 1 CPU thread, one layer of 32 experts
      (1024 -> 896), top-4, eager fp32: decode (1 token) 3.9 ms vs 28 ms dense; prefill of 64 tokens 67 ms
      vs 203 ms dense: prefill reads every expert that any token selected once, and computes only the
      selected rows. The other sparse form tried, gathering stacked `[E, F, H]` weights by the top-k indices
      (`w1[idx]` -> `[N, k, F, H]`), was 27-34 ms at decode and 3.2 s at 64 tokens (it copies k experts'
      weights per token), so it was not kept. The experts keep their own weights in both forms: switching
      stacks or copies nothing.
    """

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.use_expert_bias = cfg.use_expert_bias
        self.form = MOE_DENSE
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        if cfg.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores `[N, E]`, selected experts `[N, k]` and their routing weights `[N, k]` (float32)."""
        scores = torch.sigmoid(self.gate(x).float())
        choice = scores + self.expert_bias if self.use_expert_bias else scores
        idx = torch.topk(choice, self.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-6)
        return scores, idx, w * self.scale

    def router_margin(self, x: Tensor) -> Tensor:
        """Per row of `x` (`[..., H]` -> `[...]`): how far the last selected expert's choice (score + expert bias)
        leads the first unselected one's, over the spread of the row's choices (max - min; 0 where they are all
        equal). Scale-free, so one bound serves router scores of any magnitude: where it is within what fp16
        rounding moves the scores, a runtime computing in fp16 may select another expert (`lfm_export.parity.
        expert_ties`)."""
        scores = torch.sigmoid(self.gate(x).float())
        choice = scores + self.expert_bias if self.use_expert_bias else scores
        top = torch.topk(choice, min(self.top_k + 1, choice.shape[-1]), dim=-1).values
        if top.shape[-1] <= self.top_k:  # every expert selected: no choice to flip
            return torch.full(choice.shape[:-1], float("inf"))
        spread = choice.amax(-1) - choice.amin(-1)
        gap = top[..., self.top_k - 1] - top[..., self.top_k]
        return torch.where(spread > 0, gap / torch.where(spread > 0, spread, 1.0), torch.zeros_like(gap))

    def routing(self, x: Tensor) -> Tensor:
        """Dense routing weights `[N, num_experts]` (zero for unselected experts)."""
        scores, idx, w = self._route(x)
        return torch.zeros_like(scores).scatter(-1, idx, w)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self._sparse(flat) if self.form == MOE_SPARSE else self._dense(flat)
        return out.reshape(shape)

    def _dense(self, flat: Tensor) -> Tensor:
        weights = self.routing(flat).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + weights[:, e : e + 1] * expert(flat)
        return out

    def _sparse(self, flat: Tensor) -> Tensor:
        _, idx, w = self._route(flat)
        w = w.to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            hit = idx == e
            rows = hit.any(-1).nonzero().squeeze(-1)
            row_w = (w * hit).sum(-1).index_select(0, rows)
            out = out.index_add(0, rows, row_w[:, None] * expert(flat.index_select(0, rows)))
        return out


class ShortConv(nn.Module):
    """Double-gated short convolution: `out_proj(C * causal_conv(B * x))`."""

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.L = cfg.conv_L_cache
        self.in_proj = nn.Linear(h, 3 * h, bias=cfg.conv_bias)
        self.conv = nn.Conv1d(h, h, kernel_size=self.L, groups=h, bias=cfg.conv_bias)
        self.out_proj = nn.Linear(h, h, bias=cfg.conv_bias)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        b, c, xx = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        z = torch.cat([state, b * xx], dim=2)  # [B, H, L-1+T]
        y = c * F.conv1d(z, self.conv.weight, self.conv.bias, groups=z.shape[1])
        return self.out_proj(y.transpose(1, 2)), z[:, :, -(self.L - 1) :]


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """`theta ** (-2i / head_dim)` as float32, computed in float64 here, so a traced program holds it as a
    constant rather than as ops a converter evaluates its own way: coremltools lowers `reciprocal` to MIL
    `inverse`, whose epsilon 1e-4 made the first frequency 0.9999 (an angle 0.2 rad off at position 2000)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return torch.from_numpy((1.0 / np.power(float(theta), exponents)).astype(np.float32))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin `[T, head_dim]` for rotate-half RoPE at integer `positions` `[T]`, computed in float32."""
    freqs = positions.float()[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, half: int) -> Tensor:
    """Rotate-half RoPE of `x` `[..., head_dim]`, `half = head_dim // 2` (a Python int: under `torch.jit.trace`
    `x.shape[-1] // 2` is a shape tensor, which coremltools' `int` op refuses). cos/sin are computed in fp32 and
    cast to `x`'s dtype, so an fp16 model stays fp16 when traced."""
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Rope(nn.Module):
    """The RoPE swap point of `Attention`: `forward(q, k, v, cos, sin)` takes the projections `[B, T, heads,
    head_dim]` and returns q and k rotated and q, k, v in the layout the cache update and attend modules take;
    here heads-first, `[B, heads, T, head_dim]`, the canonical KV layout."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.half = head_dim // 2

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        return apply_rope(q, cos, sin, self.half), apply_rope(k, cos, sin, self.half), v


class KVUpdate(nn.Module):
    """The cache-update swap point of `Attention`: `forward(k_cache, v_cache, k, v, positions, t, form)` writes
    the `t` new keys and values (at `positions`) into the caches in KV form `form` and returns `(keys, values,
    positions)`: the caches to attend over, which are also the new state, and the query positions in the form
    the attend module reads them.

    - growing: the new keys are concatenated, `[B, kv_heads, P+T, head_dim]`.
    - static: `index_copy` at `positions` into a copy of the `[B, kv_heads, S, head_dim]` cache.
    - stateful: written in place into the caches passed in (the caller's buffers, see `lfm_export.stateful`)
      with `index_put_`, which ExecuTorch's reinplacing pass keeps in place, and read back whole."""

    def forward(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, t: int, form: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        if form == GROWING:
            return torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2), positions
        if form == STATIC:
            return k_cache.index_copy(2, positions, k), v_cache.index_copy(2, positions, v), positions
        k_cache[:, :, positions] = k
        v_cache[:, :, positions] = v
        return k_cache, v_cache, positions


class SDPA(nn.Module):
    """The attend swap point of `Attention`: causal GQA attention of `q` `[B, heads, T, head_dim]` (at
    `positions`) over the caches `[B, kv_heads, S, head_dim]`, keys at positions up to the query's and, where
    `key_mask` `[B, S]` is given, not masked there; scores and softmax in float32. Returns `[B, T, heads *
    head_dim]`."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim

    def forward(
        self, q: Tensor, k_all: Tensor, v_all: Tensor, positions: Tensor, key_mask: Tensor | None
    ) -> Tensor:
        bsz, _, t, _ = q.shape
        key_pos = torch.arange(k_all.shape[2], device=q.device)
        allowed = key_pos[None, :] <= positions[:, None]  # [T, S]
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :].bool()
        groups = self.n_heads // self.n_kv
        kk = k_all.repeat_interleave(groups, dim=1)
        vv = v_all.repeat_interleave(groups, dim=1)
        scores = (q @ kk.transpose(-1, -2)).float() * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return (probs @ vv).transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)


class Attention(nn.Module):
    """GQA attention with q/k RMSNorm before RoPE. The projections and norms hold the weights; what a backend
    computes its own way is one of three weightless submodules, each swapped alone (`lfm_export.trace.
    apply_swaps`): `rope` (`Rope`), `kv_update` (`KVUpdate`) and `attend` (`SDPA`)."""

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.rope = Rope(self.head_dim)
        self.kv_update = KVUpdate()
        self.attend = SDPA(self.n_heads, self.n_kv, self.head_dim)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        positions: Tensor,
        form: str,
        key_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The pieces are called through `forward`, not as modules: under `torch.jit.trace` (Core ML) a module call
        # is a scope and a function boundary (tuple packing), which renumbers the graph's values, and the Core ML
        # program names its ops after them. `t` is read first for the same reason: there it is the traced size
        # that a slice write takes.
        t = x.shape[1]
        q, k, v = self.rope.forward(*self.project(x), cos, sin)
        k_all, v_all, at = self.kv_update.forward(k_cache, v_cache, k, v, positions, t, form)
        return self.out_proj(self.attend.forward(q, k_all, v_all, at, key_mask)), k_all, v_all

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of `x` as `[B, T, heads, head_dim]`, q and k normalised, before RoPE."""
        bsz, t, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(bsz, t, self.n_heads, self.head_dim))
        k = self.k_layernorm(self.k_proj(x).view(bsz, t, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(bsz, t, self.n_kv, self.head_dim)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Lfm2Config, idx: int) -> None:
        super().__init__()
        self.is_attention = cfg.layer_types[idx] == LAYER_ATTN
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if self.is_attention:
            self.self_attn = Attention(cfg)
        else:
            self.conv = ShortConv(cfg)
        self.feed_forward = MoE(cfg) if cfg.is_moe_layer(idx) else MLP(cfg.hidden_size, cfg.intermediate_size)


class Lfm2Model(nn.Module):
    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Lfm2ForCausalLM(nn.Module):
    """`forward(input_ids, conv_states, keys, values, ...)` -> `(logits, conv_states, keys, values)`.

    `conv_states` holds one tensor per conv layer and `keys` / `values` one per attention layer, each in
    layer order.
    """

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Lfm2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        conv_states: list[Tensor],
        keys: list[Tensor],
        values: list[Tensor],
        attention_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        form: str = GROWING,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        cfg = self.config
        t = input_ids.shape[1]
        if form == GROWING:
            past = keys[0].shape[2] if keys else 0
            positions = torch.arange(t, device=input_ids.device) + past
        elif form in (STATIC, STATEFUL):
            if input_pos is None:
                raise ValueError(f"the {form} KV form needs input_pos")
            positions = torch.arange(t, device=input_ids.device) + input_pos.reshape(-1)[0]
        else:
            raise ValueError(f"unknown KV form {form!r}; expected one of {KV_FORMS}")
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        h = self.model.embed_tokens(input_ids)
        new_conv, new_k, new_v = [], [], []
        ci = ai = 0
        for layer in self.model.layers:
            x = layer.operator_norm(h)
            if layer.is_attention:
                x, k, v = layer.self_attn(x, cos, sin, keys[ai], values[ai], positions, form, attention_mask)
                new_k.append(k)
                new_v.append(v)
                ai += 1
            else:
                x, s = layer.conv(x, conv_states[ci])
                new_conv.append(s)
                ci += 1
            h = h + x
            h = h + layer.feed_forward(layer.ffn_norm(h))
        logits = self.lm_head(self.model.embedding_norm(h))
        return logits, new_conv, new_k, new_v

    def set_moe_form(self, form: str) -> None:
        """Run every MoE layer in the `dense` (default) or `sparse` form (see `MoE`); weights are untouched."""
        if form not in MOE_FORMS:
            raise ValueError(f"unknown MoE form {form!r}; expected one of {MOE_FORMS}")
        for m in self.modules():
            if isinstance(m, MoE):
                m.form = form

    def empty_state(
        self, batch: int = 1, max_seq_len: int = 0, form: str = GROWING, dtype: torch.dtype = torch.float32
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Zero conv state and an empty (growing) or zeroed `max_seq_len` (static, stateful) KV cache."""
        cfg = self.config
        s = 0 if form == GROWING else max_seq_len
        conv = [torch.zeros(batch, cfg.hidden_size, cfg.conv_state_len, dtype=dtype) for _ in cfg.conv_layers]
        kv_shape = (batch, cfg.num_key_value_heads, s, cfg.head_dim)
        keys = [torch.zeros(kv_shape, dtype=dtype) for _ in cfg.attn_layers]
        values = [torch.zeros(kv_shape, dtype=dtype) for _ in cfg.attn_layers]
        return conv, keys, values


def build_model(cfg: Lfm2Config, device: str | torch.device = "meta") -> Lfm2ForCausalLM:
    """Model skeleton; on `meta` it allocates nothing (the loader assigns the checkpoint tensors)."""
    with torch.device(device):
        return Lfm2ForCausalLM(cfg)
