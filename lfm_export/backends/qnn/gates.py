"""Parity gates of the QNN recipes (`qnn-16a8w`, `qnn-16a4w`, `qnn-8a8w`), registered by the two QNN targets
(`onnx-qnn`, `executorch-qnn`) through their backend records.

(a) Exactness: the artifact on the HTP against the fake-quantized torch program it was written from. The HTP
computes in integers (uint16 / uint8 activation codes, each op requantizing its output with its own rounding,
fp16 where an op stays float) where torch computes float32 between quantize / dequantize pairs, so a code on a
rounding boundary lands one step apart and the step carries through the layers: the limits are statistical.
Measured with onnxruntime-qnn 2.7.0 (QAIRT 2.51 HTP emulator), context 64, honest worst (docs/parity.md):
  16a8w  `tiny` (all scenarios, 307 positions) and a transformers-written checkpoint (115 positions):
         logit max rel 4.6e-3, KL max 3.1e-4, state max rel 5.6e-3, top-1 decisive 1.0 -> limits about 4x (KL 16x)
  16a4w  `tiny` (prefill and decode, 233 positions): 2.4e-2 / 5.8e-2 / 2.6e-2 / 1.0 -> limits about 2x (KL 4x)
  8a8w   `tiny` (prefill and decode, 233 positions): 0.26 / 2.06 / 0.38 / 0.93 -> limits about 2x: a weak gate
         (one 8-bit step moves a logit far more).
16a4w and 8a8w rest on one model each: on a 2-layer transformers-written checkpoint the honest 16a4w export fails
the 16a4w state limit (prefill state max rel 0.062: one 8-bit key code flipped; docs/parity.md, Detection
limits), not yet recalibrated. What each gate catches (`detection`, `DETECTION`) was measured by
`benchmarks/detection_limits.py` on `tiny` (layer 3's w2, out_proj, in_proj x 1.02 / 1.05 / 1.10, prefill
scenario); the stored-weights check beside them (`lfm_export.backends.onnx_qnn.stored_weights`) fails every one
of those at x 1.02, naming the matrix, whatever the logits gate lets through.
(b) Quality by default: a sanity bound against fp32 (pooled KL mean) over the honest exports of `tiny`: 16a8w
0.056 (bound 0.5), 16a4w 0.115 (0.5), 8a8w 0.133 (1.0)."""

from __future__ import annotations

from lfm_export.parity.thresholds import Gate, _exact_gate

_NOTE = "emulated HTP (integer codes) against the fake-quantized torch program (float32 between QDQ pairs)"

_STORED = "; the stored-weights check beside it catches x 1.02 in each, naming the matrix"
DETECTION = {
    "qnn-16a8w": "a middle layer's out_proj or in_proj x 1.02 and w2 x 1.05 (w2 x 1.02 passes the logits rows) "
    "are caught on tiny; on a 2-layer transformers-written checkpoint in_proj x 1.02, out_proj x 1.10 and w2 not "
    "up to x 1.10 (prefill scenario; benchmarks/results/detection_limits_qnn_16a8w.json, _hf.json)" + _STORED,
    "qnn-16a4w": "a middle layer's in_proj x 1.05, w2 and out_proj x 1.10 are caught by the logits rows (x 1.02 "
    "of each passes them; tiny, prefill scenario; benchmarks/results/detection_limits_qnn_16a4w.json)"
    + _STORED,
    "qnn-8a8w": "none of a middle layer's w2, out_proj, in_proj x 1.10 is caught by the logits rows, whose honest "
    "noise is larger (tiny and a 2-layer transformers-written checkpoint, prefill scenario; "
    "benchmarks/results/detection_limits_qnn_8a8w.json, _hf.json)" + _STORED,
}
"""What `benchmarks/detection_limits.py` measured each QNN gate to catch (scales tried: 1.02, 1.05, 1.10)."""

QNN_GATES: dict[str, Gate] = {
    "qnn-16a8w": _exact_gate(
        "qnn-16a8w",
        logit_max_rel=0.02,
        kl_max=5e-3,
        top1_decisive=0.98,
        state_max_rel=0.02,
        note=_NOTE + " (honest: logit 4.6e-3, KL max 3.1e-4, state 5.6e-3)",
        detection=DETECTION["qnn-16a8w"],
    ),
    "qnn-16a4w": _exact_gate(
        "qnn-16a4w",
        logit_max_rel=0.05,
        kl_max=0.25,
        top1_decisive=0.98,
        state_max_rel=0.05,
        note=_NOTE + " (honest tiny: logit 2.4e-2, KL max 5.8e-2, state 2.6e-2)",
        detection=DETECTION["qnn-16a4w"],
    ),
    "qnn-8a8w": _exact_gate(
        "qnn-8a8w",
        logit_max_rel=0.5,
        kl_max=4.0,
        top1_decisive=0.85,
        state_max_rel=0.75,
        note=_NOTE + " (honest tiny: logit 0.26, KL max 2.1, state 0.38; weak)",
        detection=DETECTION["qnn-8a8w"],
    ),
}

QNN_SANITY_KL_MEAN: dict[str, float] = {"qnn-16a8w": 0.5, "qnn-16a4w": 0.5, "qnn-8a8w": 1.0}
