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
  logits (KL: its square), tighter than the core's `-a8` gates (2x). Calibrated by `benchmarks/gguf_gates.py`
  (`benchmarks/results/gguf_gates.json`, `gguf_gates_mse.json`; `tiny` and `tiny-moe`, q8_0 / q4_0 and their
  `-mse`, context 64, every scenario): honest worst 0.51x (tiny q4_0-mse), so 0.75x.

`q4_0-q8k`: a `q4_0` file whose output (the tied token table) is Q6_K, as llama.cpp holds it where the rows
are multiples of 256, fed Q8_K blocks: `K_FACTOR`. On the trained hidden-256 checkpoint `small`
(`benchmarks/results/gguf_gates_small.json`, context 64) honest `q4_0` / `q4_0-nearest` reach 0.81x / 0.78x
of the rounding effect on the scenario rows, above `FACTOR`.
(b) Quality by default: the core's int8 / int4 sanity bounds.
"""

from __future__ import annotations

from lfm_export.parity.thresholds import RESOLVED_LIMIT, SANITY_KL_MEAN, Gate, _exact_gate

FACTOR = 0.75
"""Limits as a multiple of the activation-rounding effect (KL: its square)."""
K_FACTOR = 1.0
"""The same for the K-quant mixes, whose K-quant matmuls take Q8_K activation blocks (256 values, one scale):
on a transformers-written random checkpoint of hidden size 256 (q4_k_m, context 64) the simulation matches
llama.cpp to 4e-8 (median, relative to the logit scale) and one flipped code at the last position reaches 0.76x
the rounding effect; measured on that one model only, not calibrated over scenarios like `FACTOR`."""

_RESOLVED = f"; row resolved_prefill, undecided codes and fp16 block scales resolved: logit max rel <= {RESOLVED_LIMIT:g}"
_NOTE = (
    "llama.cpp CPU (Q8_0 activation blocks) against the simulation with the same rounding; scenario limits "
    f"allow {FACTOR}x what the rounding itself does" + _RESOLVED
)
_K_NOTE = (
    "llama.cpp CPU (Q8_K activation blocks into K-quants, Q8_0 into their fallbacks) against the simulation "
    f"with the same rounding; scenario limits allow {K_FACTOR}x what the rounding itself does" + _RESOLVED
)
_Q8K_NOTE = (
    "llama.cpp CPU (Q8_0 activation blocks into Q4_0, Q8_K into the Q6_K output) against the simulation with "
    f"the same rounding; scenario limits allow {K_FACTOR}x what the rounding itself does" + _RESOLVED
)


def factor(name: str) -> float:
    """The limit factor of gate `name` (`FACTOR` for the 32-value types, `K_FACTOR` for the K-quant mixes and
    for a `q4_0` file whose output is a K-quant, gate `q4_0-q8k`)."""
    return FACTOR if name.endswith("_0") else K_FACTOR


DETECTION = (
    "a middle layer's w2, out_proj, in_proj and an MoE expert's w2 x 1.01 (the smallest tried) are caught by the "
    "logits checks (row resolved_prefill) on the trained tiny / tiny-moe and the transformers-initialised "
    "hf-dense / hf-moe, and so are other weights, a dropped conv state, KV off by one and a dropped routing "
    "scale (q4_0 and q4_k_m; prefill scenario; benchmarks/results/detection_limits_gguf_q4_0.json, "
    "detection_limits_gguf_q4_k_m.json), and by the stored-weights check beside them"
)
"""What `benchmarks/detection_limits.py` measured the `q4_0` / `q4_k_m` gates to catch."""

GGUF_GATES: dict[str, Gate] = {
    name: _exact_gate(
        name,
        logit_max_rel=1e-3,
        kl_max=1e-5,
        top1_decisive=1.0,
        state_max_rel=1e-3,
        rounding=factor(name),
        note=_NOTE if name.endswith("_0") else _Q8K_NOTE if name.endswith("-q8k") else _K_NOTE,
        detection=DETECTION if name in ("q4_0", "q4_k_m", "q4_0-q8k") else "",
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
