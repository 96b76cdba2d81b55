"""The graph row of `onnx-qnn` (`Backend.exact_row`, `lfm_export.parity.graph_row`): the artifact's QDQ graph
on onnxruntime's CPU provider against the fake-quantized torch program, activation code by activation code.

Every activation of the QDQ graph passes through a `QuantizeLinear`, which the torch program has too, in the same
order with the same scale and zero point (the exporter keeps both; checked here, else the row fails), less
the ones the exporter merged into an identical earlier one. With graph
optimizations off, onnxruntime runs each op as written, in float32 between the quantize / dequantize pairs, as
the torch program does; the two differ by float32 rounding only, which now and then puts a value on the other
side of a rounding boundary: that code lands one step apart. The graph's outputs of every `QuantizeLinear` are
read at each position and fed to the torch program in place of its own (each such code resolved to the
artifact's side, as `lfm_export.parity.boundary` resolves int8 codes by search), so a flip does not carry into
later ops, and each op is compared given the same inputs: the largest difference of any activation code, in
steps of its own grid, is at most `CODE_LIMIT` for an honest graph at any depth. A weight a few percent off
moves its op's output codes by that fraction of their range, in steps: hundreds on the 16-bit grids, a few
on the 8-bit ones; a wrong op or a dropped state moves them further.

What it does not see: the HTP, which computes in integers of its own (its states tens to hundreds of 16-bit
steps off the program's); the scenario rows hold that runtime, statistically. With graph optimizations on,
onnxruntime folds quantize / dequantize pairs away and the codes no longer follow the program's."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.parity.exact_row import ExactInputs
from lfm_export.parity.graph_row import GraphRow

from .qdq import DATA_FILE, MODEL_FILE

CODE_LIMIT = 1.0
"""The largest activation code difference an honest graph shows: one step, a code on a rounding boundary."""
COARSE_FLIP_LIMIT = 1e-5
"""Of the codes on 8-bit grids, the share that may be one step apart. A float32 rounding difference crosses a
boundary of a 256-level grid 256 times less often than one of a 65536-level grid, so an honest graph leaves
next to none of its 8-bit codes apart, while a weight 2% off moves many 8-bit codes by one step where it moves
few or none by two (measured: benchmarks/results/detection_limits_qnn_*.json, `graph_prefill`)."""
MAX_DIFF = "activation_code_max_diff"
COARSE_FLIPS = "coarse_codes_one_step_apart"
QUANTIZE = "quantized_decomposed.quantize_per_tensor.default"
COARSE = 255
"""The largest code of an 8-bit grid (the quantizer's `quant_max`)."""


def exact_row(inputs: ExactInputs) -> GraphRow | None:
    """The row parity adds (`Backend.exact_row`): `graph_check` against the backend's own simulation session."""
    if inputs.simulation is None:
        return None
    return graph_check(inputs.folder, inputs.simulation, inputs.prompts, inputs.threads)


def graph_check(folder: Path, simulation: Any, prompts: list[np.ndarray], threads: int = 1) -> GraphRow:
    """The row for the artifact in `folder` against `simulation` (`lfm_export.backends.qnn.session
    .FakeQuantSession`) on `prompts` (`[1, T]` ids each), one token a call from an empty state: the largest
    activation code difference (limit `CODE_LIMIT`) and the share of 8-bit codes one step apart (limit
    `COARSE_FLIP_LIMIT`)."""
    import torch

    step = simulation.step
    nodes = [n for n in step.module.graph.nodes if n.op == "call_function" and str(n.target) == QUANTIZE]
    coarse = [int(n.args[4]) <= COARSE for n in nodes]
    row = GraphRow(
        runtime="onnxruntime CPU (graph optimizations off)",
        limits={MAX_DIFF: CODE_LIMIT, COARSE_FLIPS: COARSE_FLIP_LIMIT},
    )
    with tempfile.TemporaryDirectory() as tmp:
        session, grids = _codes_session(Path(folder), Path(tmp), threads)
        align, mismatch = _align(grids, nodes)
        if mismatch:
            row.positions, row.values, row.where = 1, {MAX_DIFF: float("inf")}, mismatch
            return row
        signature = step.signature
        specs = signature.state_inputs()
        present = [signature.present_for(s.name) for s in specs]
        n_out = len(signature.output_names)
        flips = {True: 0, False: 0}
        compared = {True: 0, False: 0}
        where: tuple[float, str] = (0.0, "")
        for p, ids in enumerate(prompts):
            state = {s.name: np.zeros(s.shape, dtype=np.float32) for s in specs}
            for t, token in enumerate(np.asarray(ids, dtype=np.int64).reshape(-1)):
                feeds = {
                    "input_ids": np.array([[token]], dtype=np.int64),
                    "input_pos": np.array([t], dtype=np.int64),
                    **state,
                }
                results = session.run(None, feeds)
                named = dict(zip(signature.output_names, results[:n_out], strict=True))
                codes = results[n_out:]
                own = [torch.from_numpy(state[s.name]) for s in specs]
                forced = [None if a is None else codes[a] for a in align]
                diffs = _forced_run(step, nodes, forced, token, t, own)
                for d, c, is_coarse in zip(diffs, forced, coarse, strict=True):
                    if c is not None:
                        flips[is_coarse] += int((d == 1).sum())
                        compared[is_coarse] += int(d.size)
                worst = max(range(len(diffs)), key=lambda i: float(diffs[i].max()))
                value = float(diffs[worst].max())
                if value > where[0]:
                    where = (value, f"prompt {p} position {t}, {_describe(nodes[worst])}")
                state = {s.name: named[q] for s, q in zip(specs, present, strict=True)}
                row.positions += 1
        row.where = where[1]
        row.values = {MAX_DIFF: where[0], COARSE_FLIPS: flips[True] / max(compared[True], 1)}
        row.counts = {
            "codes_one_step_apart": f"{flips[False]} of {compared[False]} on 16-bit grids, {flips[True]} of "
            f"{compared[True]} on 8-bit grids",
            "activation_quantizers": len(grids),
            "merged": sum(a is None for a in align),
        }
    return row


def _codes_session(folder: Path, tmp: Path, threads: int) -> tuple[Any, list[tuple[float, int]]]:
    """A CPU session over a copy of the graph whose outputs add every `QuantizeLinear`'s, in graph order (the
    weights file linked, not copied), and each one's (scale, zero point)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def value(name: str) -> np.ndarray:
        tensor = inits.get(name) or constants[name]
        return np.asarray(numpy_helper.to_array(tensor, base_dir=str(folder)))

    grids = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zero = inits.get(node.input[2]) or constants[node.input[2]]
        grids.append((float(value(node.input[1])), int(value(node.input[2]))))
        graph.output.append(helper.make_tensor_value_info(node.output[0], zero.data_type, None))
    if (folder / DATA_FILE).is_file():  # onnxruntime refuses a symbolic link out of the model's folder
        try:
            os.link(folder / DATA_FILE, tmp / DATA_FILE)
        except OSError:  # another file system
            shutil.copyfile(folder / DATA_FILE, tmp / DATA_FILE)
    onnx.save(model, str(tmp / MODEL_FILE))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(tmp / MODEL_FILE), opts, providers=["CPUExecutionProvider"]), grids


def _align(grids: list[tuple[float, int]], nodes: list[Any]) -> tuple[list[int | None], str]:
    """For each of the program's quantizers, in order, the index of the graph's quantizer with the same grid
    next in order, or None where the graph has none there: the exporter merges quantizers that compute the same
    values (the causal mask of a second attention layer, quantized as the first one's); those keep the
    program's own codes. Every quantizer of the graph must be matched, else the reason, naming the program's
    quantizer where the match broke ("" where all are): a graph calibrated on other weights has other grids."""
    out: list[int | None] = []
    j = 0
    skipped_at: dict[int, Any] = {}
    for node in nodes:
        same = j < len(grids) and grids[j][1] == int(node.args[2])
        if same and np.isclose(grids[j][0], float(node.args[1]), rtol=1e-6, atol=0):
            out.append(j)
            j += 1
        else:
            skipped_at.setdefault(j, node)
            out.append(None)
    if j < len(grids):
        scale, zero = grids[j]
        node = skipped_at.get(j)
        theirs = (
            ""
            if node is None
            else f": the program's {_describe(node)} has ({float(node.args[1]):g}, {node.args[2]})"
        )
        return out, f"the graph's quantizer {j} (grid {scale:g}, {zero}) is not the program's{theirs}"
    return out, ""


def _forced_run(
    step: Any, nodes: list[Any], codes: list[np.ndarray | None], token: int, position: int, state: list
) -> list:
    """One position through the torch program with each quantizer's output replaced by the graph's `codes`
    (None: its own kept); returns, per quantizer, the absolute difference of its own codes from the graph's."""
    import torch

    from lfm_export.backends.qnn.quantize import step_args

    index = {node: i for i, node in enumerate(nodes)}
    diffs: list[np.ndarray] = [np.zeros(1)] * len(nodes)

    class Forced(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            i = index.get(n)
            if i is None or codes[i] is None:
                return out
            theirs = torch.from_numpy(codes[i].astype(np.int64)).reshape(out.shape)
            diffs[i] = (out.to(torch.int64) - theirs).abs().numpy()
            return theirs.to(out.dtype)

    with torch.no_grad():
        Forced(step.module).run(*step_args(step.signature, int(token), position, state))
    return diffs


def _describe(node: Any) -> str:
    """The quantizer's fx name and the module whose output it quantizes (from the program's module stack)."""
    source = node.args[0]
    stack = getattr(source, "meta", {}).get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    return f"{node.name} after {getattr(source, 'name', source)}" + (f" in {module}" if module else "")
