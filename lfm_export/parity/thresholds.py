"""Parity gates, in two parts.

(a) Exactness (`GATES`): the artifact against its recipe simulated in torch (`lfm_export.quant.simulate`: the
same dequantized codes, the same activation rounding). Scale-free limits (logit error over the logit scale,
state error over the state scale, KL and top-1 against the simulation) that apply to any weights, trained or
random, so a failure means the artifact does not compute its recipe. How small an error each gate catches is
measured, not implied (`Gate.detection`, docs/parity.md "Detection limits"). The `-a8` gates' scenario limits
allow for int8 activation rounding; their tight row is `lfm_export.parity.boundary` (`RESOLVED_LIMIT`).
(b) Quality (`sanity_gate` by default, `quality_gate` when asked): the artifact against the fp32 reference.
What a recipe costs depends on the weights (int4 pooled KL 0.04 on the trained `tiny`, 0.10 on a
transformers-initialised checkpoint with initializer_range 0.08), so by default only a loose sanity bound
applies; `--max-kl` or a gates file make it strict.

A recipe name maps to a gate by prefix (`int4-b32` -> `int4`); where the runtime rounds activations to int8
the `-a8` gate applies (`gate_for`). `gates_markdown()` renders the table for the README.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lfm_export.contract.errors import UnsupportedError, UserError
from lfm_export.recipes import Recipe, parse_recipe

LE = "<="
GE = ">="
POOLED = "pooled"
"""The pseudo-scenario holding every compared position of every scenario: where the statistical limits of the
quantized gates apply, since a single short scenario gives noisy tails and top-1 shares."""


@dataclass(frozen=True)
class Limit:
    """`metric op value`, checked on every scenario that reports the metric (or only on `scenarios`).

    `POOLED` is checked only by limits that name it. `rounding`: where the runtime rounds activations to int8,
    no simulation can tell which codes a float-rounding difference flips, so the limit widens to `rounding` x
    what activation rounding itself does to the metric (the simulation with against without it, same scenario,
    `noise`), never tighter than `value`."""

    metric: str
    op: str
    value: float
    scenarios: tuple[str, ...] | None = None
    rounding: float | None = None

    def applies_to(self, scenario: str) -> bool:
        if self.scenarios is None:
            return scenario != POOLED
        return scenario in self.scenarios

    def bound(self, noise: float | None = None) -> float:
        """The limit in force, given the activation-rounding effect `noise` on this metric (if measured)."""
        if self.rounding is None or noise is None or math.isnan(noise):
            return self.value
        if self.op == LE:
            return max(self.value, self.rounding * noise)
        return min(self.value, 1.0 - self.rounding * (1.0 - noise))

    def holds(self, value: float | None, noise: float | None = None) -> bool:
        """False for a missing or non-finite value: NaN logits never pass."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        limit = self.bound(noise)
        return value <= limit if self.op == LE else value >= limit

    def describe(self) -> str:
        where = f" ({', '.join(self.scenarios)})" if self.scenarios else " (every scenario)"
        if self.rounding is None:
            return f"{self.metric} {self.op} {self.value:g}{where}"
        widen = "max" if self.op == LE else "min"
        return (
            f"{self.metric} {self.op} {widen}({self.value:g}, {self.rounding:g} x activation rounding){where}"
        )


@dataclass(frozen=True)
class Gate:
    """`detection`: the gate's measured detection limit (the smallest single-matrix error it caught, and where
    that was measured), stated in every report; empty where none was measured. `router_margin`: positions
    where the simulation's top-k router margin is below this (and the conv window after them) are judged apart
    from the exactness limits, held to the gate's `*_at_tie` limits and reported
    (`lfm_export.parity.expert_ties`); None: every position is held to the limits."""

    name: str
    limits: tuple[Limit, ...]
    note: str = ""
    detection: str = ""
    router_margin: float | None = None


# Checked by every gate: finite logits, and the session counts positions like the reference.
UNIVERSAL = (Limit("finite", GE, 1.0), Limit("position_match", GE, 1.0))


def _exact_gate(
    name: str,
    *,
    logit_max_rel: float,
    kl_max: float,
    top1_decisive: float,
    state_max_rel: float,
    note: str,
    rounding: float | None = None,
    state_p99_rel: float | None = None,
    state_max_steps: float | None = None,
    detection: str = "",
) -> Gate:
    """Exactness limits; with `rounding`, each widens to that multiple of the activation-rounding effect (KL,
    quadratic in the logit error, to its square). `state_p99_rel` adds a limit on the state error's 99th
    percentile over positions (gates that allow an honest export to differ at a few positions);
    `state_max_steps` a limit on the state error in steps of the grid each state is written on (quantized
    states: a prompt whose values are small against the calibrated range shows one code as a large part of its
    own maximum, which `state_max_rel` counts; checked where the simulation gives the steps,
    `lfm_export.parity.metrics.state_max_abs`); `detection` states what the gate was measured to catch
    (`Gate.detection`)."""
    kl_rounding = None if rounding is None else rounding**2
    p99 = () if state_p99_rel is None else (Limit("state_p99_rel", LE, state_p99_rel),)
    if state_max_steps is not None:
        p99 += (Limit("state_max_steps", LE, state_max_steps),)
    return Gate(
        name,
        UNIVERSAL
        + (
            Limit("logit_max_rel", LE, logit_max_rel, rounding=rounding),
            Limit("kl_max", LE, kl_max, rounding=kl_rounding),
            Limit("state_max_rel", LE, state_max_rel, rounding=rounding),
            *p99,
            Limit("top1_decisive", GE, top1_decisive, (POOLED,), rounding=rounding),
        ),
        note,
        detection,
    )


ROUNDING_FACTOR = 2.0
"""Int8-rounded activations: the artifact may differ from the simulation by this multiple of what activation
rounding itself does (KL: its square). Calibrated (docs/parity.md, Calibration) with onnxruntime 1.32 at accuracy_level 4, on 26
honest ONNX artifacts (int8-b32, int8-b64-asym, int4-b32, int4-b64-asym; tiny, tiny-moe and transformers-
initialised dense and MoE checkpoints at initializer_range 0.02 and 0.08): the artifact's distance from the
simulation was at most 0.82x that effect on logits, 0.61x on state and 0.82x on KL max (where the simulation
reproduces the rounding exactly, 1e-6 relative, until a float-rounding difference flips one code). Breaks it
must catch measured 3.2x (MoE routing scale dropped, transformers-initialised MoE) to 40x and more."""

RESOLVED_LIMIT = 2e-5
"""The `-a8` gates' tight limit (`lfm_export.parity.boundary`, row `resolved_prefill`): the largest error of a
position's logits (and, where the session exposes them, its keys and values) over its largest magnitude,
against the simulation with its undecided activation codes resolved. Honest worst 1.2e-6 (onnxruntime 1.32
and ExecuTorch 1.5.1 on AVX2; benchmarks/results/a8_exactness.json); one matrix x 1.01: 8e-3 and more. The GGUF
gates hold the same row (llama.cpp's Q8_0 / Q8_K codes and Q8_0 fp16 block scales resolved): honest worst
9.2e-7 (benchmarks/results/gguf_resolved.json)."""

FP16_PROGRAM_LIMIT = 1e-4
"""The `-fp16` / `-fp16-moe` gates' tight limit where the session is the numpy interpreter
(`lfm_export.parity.fp16_program`, row `fp16_program_prefill`): the largest error of a position's logits over
its largest simulated logit, and of the state (keys, values, conv states) over each tensor's largest magnitude,
against the simulation rounded op by op as the interpreter runs the program. An honest artifact equals it bit
for bit (benchmarks/results/coreml_fp16_program.json); one fp16 step of the largest logits is 2.4e-4 to
4.9e-4 of them, so the limit passes only steps of logits below a quarter of the largest."""

PROGRAM_NOTE = (
    "through the numpy interpreter, row fp16_program_prefill: the simulation rounded op by op as the program, "
    f"logit and state max rel <= {FP16_PROGRAM_LIMIT:g}"
)

DETECTION_A8 = (
    "a middle layer's w2, out_proj, in_proj and an MoE expert's w2 x 1.01 (the smallest tried) are caught by the "
    "logits checks (row resolved_prefill) on the trained tiny / tiny-moe and the transformers-initialised "
    "hf-dense / hf-moe (ONNX int4 at accuracy level 4, ExecuTorch 8da4w; prefill scenario; "
    "benchmarks/results/detection_limits_onnx_int4.json, detection_limits_executorch_8da4w.json), and by the "
    "stored-weights check beside them"
)
DETECTION_FLOAT = (
    "a middle layer's w2, out_proj, in_proj and an MoE expert's w2 x 1.01 (the smallest tried) are caught on the "
    "trained tiny / tiny-moe and the transformers-initialised hf-dense / hf-moe, but hf-dense's conv out_proj: "
    "x 1.05 by the logits, x 1.01 by the stored weights (MLX int4, prefill scenario; "
    "benchmarks/results/detection_limits_mlx_int4.json)"
)
DETECTION_FP16_PROGRAM = (
    "through the numpy interpreter, with its exact row (fp16_program_prefill), a middle layer's w2, out_proj, "
    "in_proj and an MoE expert's w2 x 1.01 (the smallest tried) are caught by the logits on the trained tiny / "
    "tiny-moe and the transformers-initialised hf-dense / hf-moe at int4 (prefill scenario; "
    "benchmarks/results/detection_limits_coreml_int4.json), and by that row on tiny-moe at fp16, int8, "
    "palettize4 and palettize6 (benchmarks/results/coreml_fp16_program.json)"
)
DEVICE_NOTE = (
    "on a device (no exact row) the scenario limits alone caught, measured before the row: tiny-moe int4's "
    "w2 at x 1.02 and an expert's w2 at x 1.05, hf-dense's w2 at x 1.05; hf-dense's conv out_proj and hf-moe's "
    "w2 and an expert's w2 not up to x 1.10 (each caught at x 1.01 by the stored-weights check; "
    "detection_limits_coreml_int4.json before 2026-12-07 12:37, in the git history)"
)
DETECTION_COREML_INT4 = f"{DETECTION_FP16_PROGRAM}; {DEVICE_NOTE}"
"""What `benchmarks/detection_limits.py` measured each gate to catch (scales tried: 1.01, 1.02, 1.05, 1.10)."""

EXPERT_TIE_MARGIN = 3e-3
"""The `-fp16-moe` gates' `router_margin`: a position whose simulated top-k router margin (over the spread of
the router's choices, `lfm_export.model.MoE.router_margin`) is below this is judged apart, with the conv window
after it. Measured through the Core ML interpreter on `tiny-moe` (`benchmarks/coreml_expert_ties.py`, context
64, 307 positions per recipe, AMD EPYC): the honest exports chose another expert where the margin was at most
6.0e-4 (fp16) and 3.6e-5 (palettize4). On an Intel Xeon the simulation's own float order differs, and the honest
fp16 export of `tests/backends/coreml/test_coreml.py` (prefill lengths 1, 4, 8) flipped at a margin between 1e-3
and 1.5e-3 (it fails at 1e-3, passes at 1.5e-3); 3e-3 is the benchmark's next measured margin, at which fp16
`w2 x 1.02` passes the scenario rows (caught from x 1.05; the interpreter's exact row catches x 1.01).
Positions below it: 7.8% (int4) to 11.1% (fp16)."""

DETECTION_FP16_MOE = (
    f"{DETECTION_FP16_PROGRAM}; {DEVICE_NOTE}; on every scenario the scenario limits catch one expert's w2 "
    "x 1.02 (palettize4, int4; fp16 from x 1.05) and an int4 export whose experts were left uncompressed "
    "(tiny-moe, router margin 3e-3; benchmarks/results/coreml_expert_ties.json)"
)
AT_TIE_LIMITS = {"logit_max_rel_at_tie": 0.15, "kl_max_at_tie": 0.5, "state_max_rel_at_tie": 1.0}
"""What the `-fp16-moe` gates allow at a position judged apart (and the KV slots it wrote): the limits these
gates held every position to before ties were judged apart, which an honest flip stays well within (KL 0.33 at
one position of an honest `tiny-moe` palettize4 export)."""


def _tie_gate(gate: Gate, margin: float = EXPERT_TIE_MARGIN, at_tie: dict[str, float] | None = None) -> Gate:
    """`gate` judging tied positions apart (router margin below `margin`): they are held to `at_tie`
    (`AT_TIE_LIMITS` by default), every other position to `gate`'s limits."""
    loose = tuple(Limit(metric, LE, value) for metric, value in (at_tie or AT_TIE_LIMITS).items())
    return replace(gate, limits=gate.limits + loose, router_margin=margin)


GATES: dict[str, Gate] = {
    # Part (a), exactness: the artifact against its recipe simulated in torch. Honest maxima (docs/parity.md), ONNX
    # (onnxruntime 1.32) on tiny, tiny-moe and transformers-initialised dense / MoE checkpoints (initializer
    # range 0.02 and 0.08), logit max rel / state max rel / KL max:
    #   fp32                                   2.0e-6 / 2.2e-6 / 1.9e-12 (fp32 keeps the absolute limits below)
    #   fp16 (vs fp16-rounded weights, fp32 compute)  1.8e-3 / 2.3e-3 / 2.7e-5
    #   int4 / int8, float activations         1.5e-6 / 1.6e-6 / 1.4e-12 (accuracy_level 0)
    #   int4 / int8, int8 activations          3.5e-2 / 3.0e-2 / 2.0e-3 (accuracy_level 4; see ROUNDING_FACTOR)
    # fp16 is simulated with fp16-rounded weights and fp32 compute: torch's own fp16 on the CPU was further from
    # onnxruntime's fp16 (logit max rel 1.4e-3 against 7.8e-4 on tiny's first prompt).
    "fp32": Gate(
        "fp32",
        UNIVERSAL
        + (
            Limit("logit_max_abs", LE, 1e-4),
            Limit("top1_agreement", GE, 1.0),
            Limit("state_max_abs", LE, 1e-3),
        ),
        "same math as the reference; only op-ordering rounding allowed",
    ),
    "fp16": _exact_gate(
        "fp16",
        logit_max_rel=5e-3,
        kl_max=2e-4,
        top1_decisive=0.99,
        state_max_rel=5e-3,
        note="against fp16-rounded weights in fp32 (honest: logit 1.8e-3, state 2.3e-3, KL max 2.7e-5)",
    ),
    "int8": _exact_gate(
        "int8",
        logit_max_rel=1e-4,
        kl_max=1e-6,
        top1_decisive=1.0,
        state_max_rel=1e-4,
        note="float activations: the simulation is exact to float rounding (honest: 1.5e-6 relative)",
    ),
    "int4": _exact_gate(
        "int4",
        logit_max_rel=1e-4,
        kl_max=1e-6,
        top1_decisive=1.0,
        state_max_rel=1e-4,
        detection=DETECTION_FLOAT,
        note="float activations: the simulation is exact to float rounding (honest: 1.5e-6 relative)",
    ),
    "int8-a8": _exact_gate(
        "int8-a8",
        logit_max_rel=1e-3,
        kl_max=1e-5,
        top1_decisive=1.0,
        state_max_rel=1e-3,
        rounding=ROUNDING_FACTOR,
        note="int8 activations (onnxruntime accuracy_level 4, 8da8w): scenario limits allow 2x what the rounding "
        "itself does (honest: at most 0.82x); row resolved_prefill, undecided codes resolved: logit max rel <= 2e-05",
    ),
    "int4-a8": _exact_gate(
        "int4-a8",
        logit_max_rel=1e-3,
        kl_max=1e-5,
        top1_decisive=1.0,
        state_max_rel=1e-3,
        rounding=ROUNDING_FACTOR,
        detection=DETECTION_A8,
        note="int8 activations (onnxruntime accuracy_level 4, 8da4w): scenario limits allow 2x what the rounding "
        "itself does (honest: at most 0.82x); row resolved_prefill, undecided codes resolved: logit max rel <= 2e-05",
    ),
    # fp16 compute (Core ML: the residual stream, the states and every linear in fp16; norm statistics, softmax
    # and routing fp32): the simulation holds the program's weights and rounds every linear's input to fp16
    # (activation mode `fp16`) but computes in fp32 otherwise, so fp16 rounding is what separates them. Like
    # int8 activations, fp16 rounding now and then flips a discrete choice (an MoE expert whose score ties
    # another's), so the limits widen to ROUNDING_FACTOR x what the input rounding itself does (honest worst,
    # the Core ML interpreter: docs/backends/coreml.md).
    **{
        f"{quant}-fp16": _exact_gate(
            f"{quant}-fp16",
            logit_max_rel=5e-3,
            kl_max=2e-4,
            top1_decisive=0.99,
            state_max_rel=2e-2,
            rounding=ROUNDING_FACTOR,
            note=f"fp16 compute (Core ML{extra}); limits widen to 2x what fp16 input rounding does; {PROGRAM_NOTE}",
            detection=DETECTION_COREML_INT4 if quant == "int4" else "",
        )
        for quant, extra in (("fp16", ""), ("int8", ""), ("int4", "; palettized weights too"))
    },
    # With MoE routing, fp16 rounding chooses another expert where two router scores tie within it: such a
    # position (and the KV slots it writes) differs by far more than rounding. Those positions are judged apart
    # (`router_margin`: the simulation's top-k router margin below EXPERT_TIE_MARGIN of the choices' spread,
    # with the conv window after it; `lfm_export.parity.expert_ties`), reported and held to AT_TIE_LIMITS;
    # every other position, the later positions of a tied sequence included, to the dense `-fp16` limits.
    **{
        f"{quant}-fp16-moe": _tie_gate(
            _exact_gate(
                f"{quant}-fp16-moe",
                logit_max_rel=5e-3,
                kl_max=2e-4,
                top1_decisive=0.99,
                state_max_rel=2e-2,
                rounding=ROUNDING_FACTOR,
                detection=DETECTION_FP16_MOE,
                note=f"fp16 compute with MoE routing (Core ML{extra}): the `-fp16` limits on every position "
                "but those whose expert choice is within fp16 rounding, which are judged apart, reported and "
                f"held to the limits these gates had before (logit 0.15, KL 0.5, state 1.0); {PROGRAM_NOTE}",
            )
        )
        for quant, extra in (("fp16", ""), ("int8", ""), ("int4", "; palettized weights too"))
    },
}

SANITY_KL_MEAN: dict[str, float] = {
    "fp32": 1e-4,
    "fp16": 1e-3,
    "int8": 0.1,
    "int4": 0.4,
}
"""Part (b) by default: pooled KL(fp32 reference || artifact) mean at most this, about 10x the worst honest
export measured (the same 6 models: fp32 1e-12, fp16 2.4e-6, int8 4.3e-3, int4 0.097; int4 holds 4x) and
below a wrong one (other weights: 0.8 to 6.4; the int4 bound sits 2x under the smallest). Loose on purpose: the loss depends on the weights, so a strict
limit is the user's (`--max-kl`, gates file)."""


# ---- fp16 / bf16 computed in that type (MLX; `lfm_export.recipes.ACT_NATIVE`) ---------------------------------------
NATIVE = "-native"
"""Suffix of the exactness gate where the whole model computes in fp16 / bf16 and the simulation is the canonical
model run by torch in that type (activation mode `native`). Two half-precision programs that round the same ops
at the same places still differ by an ulp where float32 accumulation order differs (bf16: 2^-8 relative), and
in an MoE layer such an ulp now and then flips an expert whose router score ties another's: one position's
logits then differ by several percent. So the per-position maxima only catch gross breaks; the pooled median
position's logit error (`logit_median_rel`, scale-free) and the pooled KL mean catch a small one.

Measured with mlx 0.32.4 on the CPU, context 64 (docs/backends/mlx.md), honest artifact / the same with the first attention layer's
v_proj 5% off; pooled logit_median_rel, pooled KL mean:
  bf16  tiny 0, 2.9e-5 / 5.8e-3, 1.2e-3; tiny-moe 1.7e-3, 2.9e-4 / 5.2e-3, 2.2e-3;
        transformers dense 0, 7.2e-9 / 1.5e-2, 2.5e-5; transformers MoE 0, 0 / 6.4e-3, 5.6e-6
  fp16  tiny 3.6e-4, 2.5e-6 / 5.5e-3, 1.3e-3; tiny-moe 4.1e-4, 1.3e-4 / 4.9e-3, 2.8e-3;
        transformers dense 5.7e-5, 3.7e-9 / 1.4e-2, 2.7e-5; transformers MoE 1.6e-4, 1.2e-9 / 7.6e-3, 5.7e-6
(KL alone misses the break on transformers-initialised weights, whose outputs are flat; every break exceeds
the median limit, on tiny-moe bf16 by 1.7x only, and on the trained models the KL limit too.) Honest per-scenario maxima, logit
max rel / state max rel / KL max: bf16 tiny 7.1e-3 / 1.1e-2 / 7.3e-4, tiny-moe (an expert flipped) 5.4e-2 /
9.9e-2 / 1.6e-2; fp16 tiny 1.1e-3 / 1.3e-3 / 5.7e-5, tiny-moe 4.9e-2 / 9.8e-2 / 1.4e-2. The `fp16` gate
above (rounded weights, fp32 compute) would fail every honest MLX fp16 MoE artifact."""


NATIVE_ROUNDING = 1.5
"""The pooled median limit of the `-native` gates widens to this multiple of what computing in the half type
does to the model (the simulation against the fp32 reference, `Limit.rounding`). The simulation rounds what it
can as the runtimes do (every linear computed in float32 and rounded once, as MLX and XNNPACK's fp16 GEMMs on
x86 do), but not their own element-wise approximations: XNNPACK's fp16 sigmoid differed from torch's in 48% of
outputs (one fp16 step). Measured (docs/parity.md, Long contexts): ExecuTorch fp16 against its simulation, pooled median over the
simulation's own distance from fp32: tiny 0.91, tiny-moe 0.93, transformers-written dense at 0.08 init (2048
context) 0.83, MoE 0.80 (1.14 on 510 random tokens); the same artifacts with one v_proj 5% off: 3.4 and more.
A fixed 1.5e-3 failed the honest dense export (2.1e-3, at 128 and at 2048 tokens of context alike)."""


def _native_gate(name: str, median: float, kl_mean: float, note: str) -> Gate:
    return Gate(
        name,
        UNIVERSAL
        + (
            Limit("logit_max_rel", LE, 0.15),
            Limit("kl_max", LE, 0.05),
            # per position, as the `-fp16-moe` gates: a flipped expert sets the maximum at one position of a
            # long cache (MLX bf16 MoE, 2046 slots before the simulation rounded linears once: max 0.58, p99
            # 7.3e-3; v_proj 5% off: p99 4.9e-2)
            Limit("state_max_rel", LE, 1.0),
            Limit("state_p99_rel", LE, 2e-2),
            Limit("logit_median_rel", LE, median, (POOLED,), rounding=NATIVE_ROUNDING),
            Limit("kl_mean", LE, kl_mean, (POOLED,)),
            Limit("top1_decisive", GE, 0.98, (POOLED,)),
        ),
        note,
    )


BF16_COMPUTE = "-bf16"
"""Suffix of the exactness gate where the runtime rounds every linear's input to bf16 (activation mode `bf16`:
llama.cpp's CPU with BF16 weights)."""
GATES["bf16" + BF16_COMPUTE] = _exact_gate(
    "bf16" + BF16_COMPUTE,
    logit_max_rel=5e-3,
    kl_max=2e-4,
    top1_decisive=0.99,
    state_max_rel=2e-2,
    rounding=ROUNDING_FACTOR,
    note="bf16 weights, every linear's input rounded to bf16 (llama.cpp's CPU) against the simulation with the "
    "same rounding; limits widen to 2x what the bf16 input rounding does (honest: tiny 0.61x, tiny-moe 0.04x; "
    "benchmarks/results/gguf_bf16_gate.json)",
)
GATES["fp16-native"] = _native_gate(
    "fp16-native",
    1.5e-3,
    6e-4,
    "computed in fp16 (MLX, ExecuTorch) vs torch in fp16; median widens to 1.5x what fp16 does to the model; "
    "maxima allow an MoE expert flipped by an ulp (honest pooled: median 4.1e-4 (MLX), 2.1e-3 (ExecuTorch, "
    "0.08 init), KL 1.3e-4; v_proj 5% off: median >= 4.9e-3)",
)
GATES["bf16-native"] = _native_gate(
    "bf16-native",
    3e-3,
    1e-3,
    "computed in bf16 (MLX) vs torch in bf16; median widens to 1.5x what bf16 does to the model; maxima allow "
    "an MoE expert flipped by an ulp (honest pooled: median 1.7e-3, KL 2.9e-4; v_proj 5% off: median >= 5.2e-3)",
)
SANITY_KL_MEAN.update({"bf16": 0.01, "bf16-native": 0.01, "fp16-native": SANITY_KL_MEAN["fp16"]})
"""bf16 against fp32 (pooled KL mean), honest worst: tiny 2.3e-4, tiny-moe 7.9e-4, transformers
dense 2.1e-6, MoE 6.0e-7: bound 0.01 (13x). fp16 keeps the `fp16` bound 1e-3 (honest: at most 4.1e-6)."""
NATIVE_ONLY = ("bf16",)
"""Families gated only when computed in their type: no backend exports bf16 with fp32 compute."""


def register_gates(gates: Mapping[str, Gate], sanity: Mapping[str, float]) -> None:
    """Add a backend's own gates (exactness, by recipe name) and their default quality bounds (pooled KL mean),
    as `lfm_export.backends` does for every registered backend that declares some."""
    GATES.update(gates)
    SANITY_KL_MEAN.update(sanity)


INT8_ACTIVATIONS = "-a8"
"""Suffix of the exactness gate used where the runtime rounds the activations of quantized linears to int8."""
FP16_COMPUTE = "-fp16"
"""Suffix of the exactness gate used where the runtime computes in fp16 (activation mode `fp16`)."""
K_BLOCKS = "-q8k"
"""Suffix of a backend's gate for a one-type file that also holds a K-quant matmul fed Q8_K activation blocks
(activation mode `ggml-k` for some role: llama.cpp's `q4_0` with its Q6_K output), where the backend registers
one."""
FAMILY_ALIASES = {"palettize": "int4"}
"""Recipe names outside the core grammar and the gate family they are judged by (Core ML's `palettize4` /
`palettize6`: weights looked up in a table, judged by the int4 family's gates)."""


def gate_for(recipe: str, activations: str | dict[str, str] = "float") -> Gate:
    """The exactness gate for `recipe`, matched exactly or by the longest gate name it starts with; the `-a8`
    variant when the runtime rounds activations to int8 (`activations`, one mode or one per role as
    `lfm_export.quant.simulate` takes it, not all "float"; or `-a8` in the name)."""
    family = _family(recipe)
    modes = set(activations.values()) if isinstance(activations, dict) else {activations}
    core = _core_recipe(recipe)
    named_a8 = core.activations == "int8" if core is not None else "a8" in recipe.strip().lower().split("-")
    if family in ("fp16", "int4", "int8") and modes == {"fp16"}:
        return GATES[family + FP16_COMPUTE]
    if family in ("fp16", "int4", "int8") and modes == {"fp16-routed"}:
        return GATES[family + FP16_COMPUTE + "-moe"]
    if family in ("int4", "int8") and (modes != {"float"} or named_a8):
        family += INT8_ACTIVATIONS
    if family == "bf16" and modes == {BF16_COMPUTE.lstrip("-")}:
        return GATES[family + BF16_COMPUTE]
    if "ggml-k" in modes and family + K_BLOCKS in GATES:
        family += K_BLOCKS
    if modes == {NATIVE.lstrip("-")} and family in ("fp16", "bf16"):
        family += NATIVE
    if family not in GATES:
        raise UnsupportedError(
            f"no parity gate for {family} recipes computed in float32 (none was calibrated)"
        )
    return GATES[family]


def _core_recipe(recipe: str) -> Recipe | None:
    try:
        return parse_recipe(recipe)
    except UserError:
        return None


def _family(recipe: str) -> str:
    """`fp32`, `fp16`, `int8` or `int4` for a recipe name: the core recipe's gate family (aliases such as
    `8da4w` included), else the longest gate name the recipe starts with (a backend's own name)."""
    key = recipe.strip().lower()
    bases = [
        name
        for name in GATES
        if INT8_ACTIVATIONS not in name and FP16_COMPUTE not in name and BF16_COMPUTE not in name
    ]
    bases += list(NATIVE_ONLY)
    core = _core_recipe(key)
    if core is not None:
        if core.gate_family not in bases:
            raise UnsupportedError(f"no parity gate for {core.gate_family} recipes yet (none was calibrated)")
        return core.gate_family
    if key in bases:
        return key
    for prefix, family in FAMILY_ALIASES.items():
        if key.startswith(prefix):
            return family
    matches = [name for name in bases if key.startswith(name)]
    if not matches:
        raise UnsupportedError(
            f"no parity gate for recipe {recipe!r}; known recipe prefixes: {', '.join(bases)}"
        )
    return max(matches, key=len)


def sanity_gate(recipe: str) -> Gate:
    """The default quality gate: the loose sanity bound of the recipe's family."""
    family = _family(recipe)
    return Gate(
        f"{family} sanity bound",
        (Limit("kl_mean", LE, SANITY_KL_MEAN[family], (POOLED,)),),
        "loose by design: catches a recipe gone badly wrong, not a lossy one (strict: --max-kl, --gates)",
    )


QUALITY_METRICS: dict[str, str] = {
    "kl_mean": LE,
    "kl_p99": LE,
    "kl_max": LE,
    "top1_agreement": GE,
    "top1_decisive": GE,
    "cosine_mean": GE,
}
"""Metrics a gates file may limit (on the pooled positions, artifact against the fp32 reference)."""


def quality_gate(recipe: str, max_kl: float | None = None, gates_file: Path | None = None) -> Gate:
    """The quality gate for `recipe`: the sanity bound, replaced by `max_kl` (pooled KL mean of the artifact
    against fp32) and / or the recipe's entry in `gates_file` when given. Raises `UserError` on a bad value or
    file, so callers can validate before any export work.

    Gates file (JSON): `{"gates": {"int4-b32": {"kl_mean": 0.06, "top1_decisive": 0.93}, "int8": {...}}}`;
    a recipe takes the entry named exactly as it, else the longest entry name it starts with."""
    limits: list[Limit] = []
    names: list[str] = []
    if max_kl is not None:
        if (
            isinstance(max_kl, bool)
            or not isinstance(max_kl, int | float)
            or not math.isfinite(max_kl)
            or max_kl <= 0
        ):
            raise UserError(f"--max-kl must be a positive number, got {max_kl!r}")
        limits.append(Limit("kl_mean", LE, float(max_kl), (POOLED,)))
        names.append(f"--max-kl {max_kl:g}")
    if gates_file is not None:
        entry, key = _gates_file_entry(Path(gates_file), recipe)
        limits += [Limit(m, QUALITY_METRICS[m], v, (POOLED,)) for m, v in entry.items()]
        names.append(f"{Path(gates_file).name}[{key}]")
    if not limits:
        return sanity_gate(recipe)
    return Gate(" and ".join(names), UNIVERSAL[:1] + tuple(limits), "asked for by the user")


def _gates_file_entry(path: Path, recipe: str) -> tuple[dict[str, float], str]:
    def bad(why: str) -> UserError:
        return UserError(f"{path}: {why}")

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise bad("gates file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not a JSON gates file ({e})") from None
    gates = data.get("gates") if isinstance(data, dict) else None
    if not isinstance(gates, dict) or not gates:
        raise bad('expected {"gates": {"<recipe>": {"<metric>": <limit>, ...}, ...}}')
    for name, entry in gates.items():
        if not isinstance(entry, dict) or not entry:
            raise bad(f"gates[{name!r}] must be an object of metric limits")
        for metric, value in entry.items():
            if metric not in QUALITY_METRICS:
                raise bad(
                    f"gates[{name!r}]: unknown metric {metric!r}; expected {', '.join(QUALITY_METRICS)}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(f"gates[{name!r}][{metric!r}] must be a number, got {value!r}")
    key = recipe.strip().lower()
    matches = [n for n in gates if key == n.lower() or key.startswith(n.lower())]
    if not matches:
        raise bad(f"no gate for recipe {recipe!r} (entries: {', '.join(gates)})")
    chosen = max(matches, key=len)
    return {m: float(v) for m, v in gates[chosen].items()}, chosen


def gates_markdown() -> str:
    """The gate table as markdown (for the README): exactness limits per recipe family, and the default
    quality bound."""
    lines = [
        "| recipe | exactness: artifact vs simulated recipe | quality by default: artifact vs fp32 | note |",
        "|---|---|---|---|",
    ]
    for gate in GATES.values():
        checks = "; ".join(f"`{lim.describe()}`" for lim in gate.limits)
        if gate.router_margin is not None:
            checks += f"; positions with a top-k router margin below {gate.router_margin:g} judged apart"
        sanity = "; ".join(f"`{lim.describe()}`" for lim in sanity_gate(gate.name).limits)
        lines.append(f"| {gate.name} | {checks} | {sanity} | {gate.note} |")
    return "\n".join(lines)
