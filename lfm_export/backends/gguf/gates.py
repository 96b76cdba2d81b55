"""Parity gates of the GGUF quantized recipes (`q8_0`, `q4_0`, the K-quant mixes), registered through the
backend record.

(a) Exactness: llama.cpp's CPU quantizes the input of every quantized matmul to Q8_0 blocks (Q8_K into a
K-quant). The simulation does the same (`lfm_export.quant.fake_quant_q8_0`, `fake_quant_q8_k`) and holds the
file's very weights, so it matches the artifact op by op to float rounding (1.5e-7 of a matmul's output,
`benchmarks/results/gguf_exactness_trace_tiny_q4_k_m.json`) until a float-ordering difference puts one
activation decision on the other side of a rounding boundary: a code, or a Q8_0 block's fp16 scale
`amax / 127` (the trace: the first split of an honest `tiny` q4_k_m position is one such scale, the block's
float32 amax 1.7891352 in the simulation, 1.789135 in llama.cpp); the flip then carries through the state to
later positions. Two rows judge that:

- `resolved_prefill` (`lfm_export.parity.boundary`, the `-a8` gates' tight row): the prompt stepped one token a
  call, every undecided code and fp16 block scale resolved to the side the artifact took, limit
  `RESOLVED_LIMIT` (2e-5). Honest `tiny`, `tiny-moe` and the trained hidden-256 `small` at `q4_0`, `q4_k_m`,
  their `-gptq` and `-imat`: at most 9.2e-7 (docs/backends/gguf.md).
- the scenario rows, whose limits are a fraction (`FACTOR`) of what the activation rounding itself does to the
  logits (KL: its square), tighter than the core's `-a8` gates (2x). Honest worst, as a multiple of that effect
  (`benchmarks/gguf_gates.py`): 0.51x on `tiny` / `tiny-moe` at context 64 (`gguf_gates.json`,
  `gguf_gates_mse.json`), 0.81x on the trained hidden-256 `small` (`gguf_gates_small.json`), 0.92x (KL) on
  `tiny-moe` q4_0 at contexts 128 to 512, where a router flip at a near-tie reaches later positions through
  attention (`gguf_gates_contexts.json`), 0.76x for q4_k_m on a random hidden-256 checkpoint: so 1.0x for every
  type. What catches one matrix 1% off is the `resolved_prefill` row (`DETECTION`).

`q4_0-q8k`: a `q4_0` file whose output (the tied token table) is Q6_K, as llama.cpp holds it where the rows
are multiples of 256, fed Q8_K blocks (its note says so; the limits are those of `q4_0`).
(b) Quality by default: the core's int8 / int4 sanity bounds.
"""

from __future__ import annotations

from lfm_export.parity.thresholds import RESOLVED_LIMIT, SANITY_KL_MEAN, Gate, _exact_gate, _tie_gate

FACTOR = 1.0
"""Scenario limits as a multiple of the activation-rounding effect (KL: its square), every GGUF type."""

_RESOLVED = f"; row resolved_prefill, undecided codes and fp16 block scales resolved: logit max rel <= {RESOLVED_LIMIT:g}"
_NOTE = (
    "llama.cpp CPU (Q8_0 activation blocks) against the simulation with the same rounding; scenario limits "
    f"allow {FACTOR}x what the rounding itself does" + _RESOLVED
)
_K_NOTE = (
    "llama.cpp CPU (Q8_K activation blocks into K-quants, Q8_0 into their fallbacks) against the simulation "
    f"with the same rounding; scenario limits allow {FACTOR}x what the rounding itself does" + _RESOLVED
)
_Q8K_NOTE = (
    "llama.cpp CPU (Q8_0 activation blocks into Q4_0, Q8_K into the Q6_K output) against the simulation with "
    f"the same rounding; scenario limits allow {FACTOR}x what the rounding itself does" + _RESOLVED
)


DETECTION = (
    "a middle layer's w2, out_proj, in_proj and an MoE expert's w2 x 1.01 (the smallest tried) are caught by the "
    "logits checks (row resolved_prefill) on the trained tiny / tiny-moe and the transformers-initialised "
    "hf-dense / hf-moe, and so are other weights, a dropped conv state, KV off by one and a dropped routing "
    "scale (q4_0 and q4_k_m; prefill scenario; benchmarks/results/detection_limits_gguf_q4_0.json, "
    "detection_limits_gguf_q4_k_m.json); on the trained hidden-256 small (q4_0, q4_k_m, their -gptq and "
    "-imat) w2 / out_proj / in_proj x 1.01 by that row alone (benchmarks/results/gguf_resolved.json); and by "
    "the stored-weights check beside them"
)
"""What `benchmarks/detection_limits.py` measured the `q4_0` / `q4_k_m` gates to catch."""

TIE_MARGIN = 5e-3
"""The MoE files' `router_margin` (`lfm_export.parity.expert_ties`) for the scenario rows: a multi-token call
rounds activations through llama.cpp's repacked-weight path, which the simulation does not follow code for code,
so at a router near-tie llama.cpp may run another expert. Honest `tiny-moe` q4_k_m (context 256) did at a
margin of 1.1e-3 (`benchmarks/results/gguf_moe_router_q4_k_m.json`: median margin 2.5e-2); about 4.5x that.
The `resolved_prefill` row steps one token a call with every code resolved, needs no such allowance, and holds
every position to `RESOLVED_LIMIT`."""
AT_TIE = {"logit_max_rel_at_tie": 0.5, "kl_max_at_tie": 0.5, "state_max_rel_at_tie": 1.0}
"""What a position judged apart may reach: another expert's output (honest `tiny-moe` q4_k_m: logit max rel
0.18, KL 0.04 at the flipped position); the quality part still bounds the file as a whole."""

GGUF_GATES: dict[str, Gate] = {
    name: _tie_gate(
        _exact_gate(
            name,
            logit_max_rel=1e-3,
            kl_max=1e-5,
            top1_decisive=1.0,
            state_max_rel=1e-3,
            rounding=FACTOR,
            note=_NOTE if name.endswith("_0") else _Q8K_NOTE if name.endswith("-q8k") else _K_NOTE,
            detection=DETECTION if name in ("q4_0", "q4_k_m", "q4_0-q8k") else "",
        ),
        TIE_MARGIN,
        AT_TIE,
    )
    for name in ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0-q8k")
}

GGUF_SANITY_KL_MEAN: dict[str, float] = {
    "q8_0": SANITY_KL_MEAN["int8"],
    "q4_0": SANITY_KL_MEAN["int4"],
    "q4_k_m": SANITY_KL_MEAN["int4"],
    "q5_k_m": SANITY_KL_MEAN["int4"],
    "q6_k": SANITY_KL_MEAN["int4"],
    "q4_0-q8k": SANITY_KL_MEAN["int4"],
}
