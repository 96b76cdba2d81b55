"""Parity gates of the QNN recipes (`qnn-16a8w`, `qnn-16a4w`, `qnn-8a8w`; `lfm_export.backends.qnn`).

(a) Exactness: the artifact on the HTP against the fake-quantized torch program it was written from. The HTP
computes in integers (uint16 / uint8 activation codes, each op requantizing its output with its own rounding,
fp16 where an op stays float) where torch computes float32 between quantize / dequantize pairs, so a code on a
rounding boundary lands one step apart and the step carries through the layers: the limits are statistical.
Measured 2026-11-29, onnxruntime-qnn 2.7.0 (QAIRT 2.51 HTP emulator), `tiny` at 16a8w, context 64, all parity
scenarios (307 positions): logit max rel 3.8e-3, KL max 3.1e-4, state max rel 2.6e-3, top-1 decisive 1.0; the
limits are about 5x that (KL: 16x). The 16a4w limits are the 16a8w ones (the same activation codes; the weights
are the simulation's own). The 8a8w limits are wider in proportion to the 256x coarser activation step; see
the README's QNN section for which of them were measured.
(b) Quality by default: a sanity bound against fp32 (pooled KL mean), about 10x the honest 16a8w export of
`tiny` (0.056) and well below a wrong one."""

from __future__ import annotations

from lfm_export.parity.thresholds import Gate, _exact_gate

_NOTE = "emulated HTP (integer codes) against the fake-quantized torch program (float32 between QDQ pairs)"

QNN_GATES: dict[str, Gate] = {
    "qnn-16a8w": _exact_gate(
        "qnn-16a8w",
        logit_max_rel=0.02,
        kl_max=5e-3,
        top1_decisive=0.98,
        state_max_rel=0.02,
        note=_NOTE + " (honest tiny: logit 3.8e-3, KL max 3.1e-4, state 2.6e-3)",
    ),
    "qnn-16a4w": _exact_gate(
        "qnn-16a4w",
        logit_max_rel=0.02,
        kl_max=5e-3,
        top1_decisive=0.98,
        state_max_rel=0.02,
        note=_NOTE + " (as 16a8w)",
    ),
    "qnn-8a8w": _exact_gate(
        "qnn-8a8w",
        logit_max_rel=0.2,
        kl_max=0.1,
        top1_decisive=0.9,
        state_max_rel=0.2,
        note=_NOTE + " (8-bit activation steps)",
    ),
}

QNN_SANITY_KL_MEAN: dict[str, float] = {"qnn-16a8w": 0.5, "qnn-16a4w": 0.5, "qnn-8a8w": 1.0}
