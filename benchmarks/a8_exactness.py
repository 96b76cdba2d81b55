"""Is the int8-activation simulation exact? Op by op, and through whole artifacts with undecided codes resolved.

    .venv/bin/python benchmarks/a8_exactness.py --out benchmarks/results/a8_exactness.json --threads 1

1. Op by op (`ops`): every linear of each `--op-models` model, fed the inputs that model computes on the first
   parity prompt (text where the model has a tokenizer), quantized by the core quantizer at `bits` / `block`,
   run as one onnxruntime `MatMulNBits` at accuracy level 4 and compared with the simulated linear
   (`fake_quant_int8_block` input times the dequantized weight): the largest error over the output's
   largest magnitude, worst over the linears; next to it, what rounding the inputs does at all (the same op
   against float inputs).
2. Whole artifacts (`runs`, `backend:recipe:model`; `hf-0.08` is a dense checkpoint transformers writes with
   initializer_range 0.08, seed 2, as tests/core/test_parity_gates.py does): the artifact against its
   simulation run as usual (per-position logit error: median and max) and with undecided codes resolved
   (`lfm_export.parity.boundary.resolve`, the parity prompts cut to its `POSITIONS`), honest and with one
   middle-layer `w2` / `out_proj` x `--scale`.

`--markdown` prints the tables docs/parity.md holds (*Exact int8 activations*).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import provenance

DEFAULT_RUNS = (
    "onnx:int4-b32:tiny",
    "onnx:int8-b32:tiny",
    "onnx:int4-b32:tiny-moe",
    "onnx:int4-b32:hf-0.08",
    "onnx:int8-b32:hf-0.08",
    "executorch:8da4w:tiny",
)
OPS = ((4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128))


def _hf_checkpoint(folder: Path) -> Path:
    """Dense LFM2, 4 layers, written by transformers' `save_pretrained` (initializer_range 0.08, seed 2)."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(2)
    cfg = transformers.Lfm2Config(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        block_auto_adjust_ff_dim=False,
        initializer_range=0.08,
    )
    transformers.Lfm2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def _one_op(x: np.ndarray, q: Any) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lfm_export.backends.onnx.quantize import matmulnbits_tensors

    n, k = q.codes.shape
    b, scales, _ = matmulnbits_tensors(q)
    attrs = dict(K=k, N=n, bits=q.bits, block_size=q.block_size, accuracy_level=4)
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def ops(model: str) -> list[dict[str, Any]]:
    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession, default_prompts
    from lfm_export.quant import fake_quant_int8_block, quantize_block

    loaded = load_model(model)
    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in loaded.model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(m: Any, i: Any, o: Any, name: str = name) -> None:
                seen[name] = i[0].reshape(-1, i[0].shape[-1]).detach().numpy().copy()

            hooks.append(mod.register_forward_hook(hook))
    prompt = default_prompts(loaded.config.vocab_size, loaded.tokenizer_file)[0]
    ReferenceSession(loaded.model).prefill(np.asarray(prompt, dtype=np.int64).reshape(1, -1))
    for h in hooks:
        h.remove()
    modules = dict(loaded.model.named_modules())
    rows = []
    for bits, block in OPS:
        worst, worst_name, effects = 0.0, "", []
        for name, x in seen.items():
            w = modules[name].weight.detach().numpy()
            if w.shape[1] % block:
                continue
            q = quantize_block(w, bits, block, True, "nearest", 1)
            deq = torch.from_numpy(q.dequantize())
            want = (fake_quant_int8_block(torch.from_numpy(x), block) @ deq.T).numpy()
            got = _one_op(x, q)
            scale = float(np.abs(want).max())
            err = float(np.abs(got - want).max()) / scale
            effects.append(float(np.abs(got - x @ deq.numpy().T).max()) / scale)
            if err > worst:
                worst, worst_name = err, name
        rows.append(
            {
                "model": model,
                "bits": bits,
                "block": block,
                "linears": len(effects),
                "prompt_tokens": int(np.size(prompt)),
                "worst_op_rel": worst,
                "worst_linear": worst_name,
                "input_rounding_effect_median": float(np.median(effects)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _recipe(backend: str, quant: str) -> Any:
    from lfm_export.backends import get

    record = get(backend)
    if backend == "executorch":
        return record.recipe(quant, 128, max_prefill=32)
    return record.recipe(quant, 128)


def artifact_run(backend: str, quant: str, model: str, work: Path, scale: float, threads: int) -> dict:
    import torch

    from lfm_export.backends import get, open_session
    from lfm_export.loading import load_model
    from lfm_export.manifest import read_manifest
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.boundary import prompts_for, resolve
    from lfm_export.pipeline import export_artifact, simulation_for
    from lfm_export.progress import Progress
    from lfm_export.quant import simulate

    source = str(_hf_checkpoint(work / "hf-0.08")) if model == "hf-0.08" else model
    folder = work / f"{backend}-{quant}-{model}"
    if not (folder / "manifest.json").is_file():
        export_artifact(
            backend,
            source,
            folder,
            _recipe(backend, quant),
            parity=False,
            threads=threads,
            progress=Progress(quiet=True),
            force=True,
        )
    manifest = read_manifest(folder)
    record = get(backend)
    recipe, activations = simulation_for(record, manifest["recipe"])
    weights = record.weight_values(manifest["recipe"]) if record.weight_values else None
    session = open_session(folder, threads=threads)
    tokenizer = folder / "tokenizer.json"
    prompts = prompts_for(session.vocab_size, tokenizer if tokenizer.is_file() else None, session.max_seq_len)
    row: dict[str, Any] = {
        "backend": backend,
        "recipe": manifest["recipe"]["name"],
        "model": model,
        "activations": activations,
    }
    cases: list[tuple[str, float]] = [("honest", 1.0), ("w2", scale), ("out_proj", scale)]
    for label, factor in cases:
        loaded = load_model(source)
        if label != "honest":
            layers = loaded.model.model.layers
            layer = layers[len(layers) // 2]
            ff = layer.feed_forward
            w2 = ff.experts[0].w2 if hasattr(ff, "experts") else ff.w2
            mixer = getattr(layer, "conv", None) or layer.self_attn
            with torch.no_grad():
                (w2 if label == "w2" else mixer.out_proj).weight.mul_(factor)
        simulated = simulate(loaded.model, recipe, activations, threads=threads, weights=weights)
        plain = []
        for ids in prompts:
            session.reset(1)
            got = session.prefill(ids)[0]
            want = ReferenceSession(simulated).prefill(ids)[0]
            plain.append(np.abs(got - want).max(-1) / np.abs(want).max())
        per_position = np.concatenate(plain)
        start = time.perf_counter()
        resolved = resolve(session, simulated, prompts)
        row[label if label == "honest" else f"{label}_x{factor:g}"] = {
            "as_usual": {"median": float(np.median(per_position)), "max": float(per_position.max())},
            "resolved": resolved.to_json(),
            "resolve_seconds": round(time.perf_counter() - start, 2),
        }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op-models", nargs="*", default=["tiny", "tiny-moe"])
    ap.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="backend:recipe:model")
    ap.add_argument("--scale", type=float, default=1.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="export folder, reused (default: temporary)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the docs tables of --out and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return

    import torch

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {**provenance(), "threads": args.threads, "scale": args.scale}
    result["ops"] = [row for model in args.op_models for row in ops(model)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result["runs"] = []
        for run in args.runs:
            backend, quant, model = run.split(":")
            result["runs"].append(artifact_run(backend, quant, model, work, args.scale, args.threads))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def markdown(result: dict[str, Any]) -> str:
    """The op-by-op table (worst over models per bits and block) and one row per artifact run."""
    lines = [
        "| bits | block | linears (models) | worst op error | what input rounding does (median) |",
        "|---|---|---|---|---|",
    ]
    for bits, block in OPS:
        rows = [r for r in result["ops"] if (r["bits"], r["block"]) == (bits, block)]
        if not rows:
            continue
        worst = max(r["worst_op_rel"] for r in rows)
        effect = float(np.median([r["input_rounding_effect_median"] for r in rows]))
        models = ", ".join(f"`{r['model']}`" for r in rows)
        lines.append(
            f"| {bits} | {block} | {sum(r['linears'] for r in rows)} ({models}) | {worst:.1e} | {effect:.1e} |"
        )
    scale = f"x {result['scale']:g}"
    lines += [
        "",
        f"| backend | recipe | model | as usual: median / max | resolved: max (codes) | w2 {scale} | out_proj {scale} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        honest = row["honest"]
        wrong = [row[k]["resolved"] for k in row if k.startswith(("w2_", "out_proj_"))]
        cells = [f"{'caught' if not w['passed'] else 'PASSED'} ({w['logit_max_rel']:.1e})" for w in wrong]
        lines.append(
            f"| {row['backend']} | {row['recipe']} | `{row['model']}` | {honest['as_usual']['median']:.1e} / "
            f"{honest['as_usual']['max']:.1e} | {honest['resolved']['logit_max_rel']:.1e} "
            f"({honest['resolved']['codes_resolved']}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
