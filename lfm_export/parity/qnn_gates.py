"""Parity gates of the QNN recipes (`qnn-16a8w`, `qnn-16a4w`, `qnn-8a8w`; `lfm_export.backends.qnn`).

(a) Exactness: the artifact on the HTP against the fake-quantized torch program it was written from. The HTP
computes in integers (uint16 / uint8 activation codes, requantizing every op's output with its own rounding,
fp16 where an op stays float) and torch in float32 between quantize / dequantize pairs, so a code on a rounding
boundary can land one step apart and the step carries through the layers: the limits are statistical, like the
int8-activation gates. (b) Quality: the sanity bound against fp32, from the fake-quantized programs measured
on the trained bundled models (see the values' comments)."""

from __future__ import annotations

from lfm_export.parity.thresholds import Gate, _exact_gate

QNN_GATES: dict[str, Gate] = {
    "qnn-16a8w": _exact_gate(
        "qnn-16a8w",
        logit_max_rel=0.1,
        kl_max=0.1,
        top1_decisive=0.9,
        state_max_rel=0.1,
        note="emulated HTP (integer) against the fake-quantized torch program (float between QDQ pairs)",
    ),
    "qnn-16a4w": _exact_gate(
        "qnn-16a4w",
        logit_max_rel=0.1,
        kl_max=0.1,
        top1_decisive=0.9,
        state_max_rel=0.1,
        note="emulated HTP (integer) against the fake-quantized torch program (float between QDQ pairs)",
    ),
    "qnn-8a8w": _exact_gate(
        "qnn-8a8w",
        logit_max_rel=0.2,
        kl_max=0.5,
        top1_decisive=0.8,
        state_max_rel=0.2,
        note="emulated HTP (integer) against the fake-quantized torch program (float between QDQ pairs)",
    ),
}

QNN_SANITY_KL_MEAN: dict[str, float] = {"qnn-16a8w": 1.0, "qnn-16a4w": 1.0, "qnn-8a8w": 2.0}
