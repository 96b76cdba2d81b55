"""Rounding only, types matched: llama.cpp's own quantizer (`ggml_quantize_chunk` in the libggml-base that
llama-cpp-python ships) against ours, tensor by tensor at the SAME ggml type, in the simulation of what
llama.cpp computes (`lfm_export.quant.simulate` with llama.cpp's activation rounding), KL against fp32 over the
parity prompts. `gguf_vs_llamacpp.py` compares whole files, whose types can differ (at q4_0 llama.cpp holds a
tied token table whose rows are multiples of 256 at Q6_K, we hold it at Q8_0); this isolates the rounding.

    .venv/bin/python benchmarks/gguf_rounding_sim.py --model PATH --mix q4_0 \
        --variants theirs,nearest,fit,imat --out benchmarks/results/gguf_rounding_sim_small_q4_0.json

Types: `lfm_export.precision.ggml_mix_type` (`q4_0`: Q4_0 linears, the tied token table at Q6_K where its
rows are multiples of 256, else Q8_0, as llama.cpp; `--table-q8` holds it at Q8_0 on both sides, the layout
before). `theirs` is llama.cpp's reference quantizer (no importance matrix), `theirs-imat` with the
calibration's mean squares as its importance matrix; ours: `ggml_blocks` / `ggml_kquants` with the rounding
named (`gptq`, the recipe's `-gptq`: the `-imat` scales of the original weights with the codes chosen by GPTQ
from the calibration's Hessians on them, `gptq_on_grid`; `gptq-blocks`: each block's `-imat` scales fitted
when the sweep reaches it, on the columns as updated by the errors passed on, `gptq_on_blocks`, then each row's
scales refitted to its codes by least squares on the Hessian-weighted error, `lfm_export.rounding.refit_scales`;
`gptq-nols`: `gptq-blocks` without that refit; `gptqfit`: `gptq` with the unweighted fit's scales; `gptq-act`:
`gptq` with act-order, the columns rounded in descending order of the Hessian's diagonal, each on its own block's
scales fitted beforehand, `lfm_export.rounding.cholesky_factor(act_order=True)`). Result files
of commits 8ec8ff4 to 66737b1 name today's `gptq` `gptq-fixed`, `gptq-nols` `gptq` and `gptq-blocks` `gptq-ls`;
of commits 9222b07 to 30d86c0 (when `-gptq` was the blocks form) `gptq` `gptq-fixed` and `gptq-blocks` `gptq`. `VARIANT@GROUP` is ours by VARIANT for the
tensors of GROUP (`GROUPS`) and llama.cpp's reference quantizer for every other: which tensors carry the KL.
Each row has the pooled KL mean over positions and the corpus-level KL (the KL of the position-averaged
distributions), both against fp32.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
from pathlib import Path

import numpy as np
from heldout_kl import heldout_text, paired_ratio
from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


def llama_cpp_quantizer():  # noqa: ANN201
    import llama_cpp

    lib = ctypes.CDLL(str(sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    return lib


GROUPS = {
    "table": r"embed_tokens|lm_head",
    "attn": r"self_attn\.",
    "conv": r"conv\.(in|out)_proj",
    "ffn_in": r"\.w[13]\.",
    "ffn_down": r"\.w2\.",
    "experts": r"\.experts\.",
    "dense_ffn": r"feed_forward\.w[123]\.",
}
"""Tensor groups of `VARIANT@GROUP` (a regex on the checkpoint name)."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mix", default="q4_0", help="q4_0 or a K-quant mix (q4_k_m)")
    ap.add_argument("--variants", default="theirs,nearest,fit,imat,theirs-imat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-q8", action="store_true", help="q4_0: the token table at Q8_0 on both sides")
    ap.add_argument(
        "--corpus",
        type=Path,
        default=ROOT / "lfm_export" / "assets" / "corpus" / "heldout.txt",
        help="held-out text: KL over its chunks of --ctx tokens, second halves scored (as `parity --corpus`)",
    )
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (`lfm_export.rounding.DAMP`)")
    ap.add_argument(
        "--heldout-docs",
        type=int,
        default=0,
        help="also KL over the first N documents of make_corpus.py's held-out split (`kl_heldout_large_*`, "
        "written to --work; calibration documents left out), with paired ratios and bootstrap intervals",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_rounding_sim"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.heldout_docs < 0:
        raise SystemExit("--heldout-docs must be at least 0")

    import gguf
    import torch

    from lfm_export import ggml_blocks, ggml_kquants
    from lfm_export.backends.gguf.recipes import make_recipe
    from lfm_export.calibrate import calibrate
    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.metrics import log_softmax
    from lfm_export.parity.prompts import default_prompts
    from lfm_export.precision import ggml_mix_type, held_as
    from lfm_export.quant import simulate
    from lfm_export.recipes import parse_recipe
    from lfm_export.rounding import OrderedFactor, cholesky_factor

    torch.set_num_threads(args.threads)
    lib = llama_cpp_quantizer()
    loaded = load_model(args.model)
    cfg = loaded.config
    prompts = default_prompts(cfg.vocab_size, loaded.tokenizer_file)

    def logits(model: torch.nn.Module) -> list[np.ndarray]:
        s, out = ReferenceSession(model), []
        for ids in prompts:
            s.reset()
            out.append(s.prefill(ids[None])[0])
        return out

    reference = logits(loaded.model)
    from lfm_export.parity.corpus import chunks, corpus_tokens

    assert loaded.tokenizer_file is not None, "--corpus needs a model with a tokenizer"
    ids, bos = corpus_tokens(Path(loaded.tokenizer_file).parent, args.corpus)
    pieces = chunks(ids, bos, args.ctx)

    texts = {"kl_heldout": pieces}
    heldout_info: dict = {}
    if args.heldout_docs:
        path, heldout_info = heldout_text(args.heldout_docs, args.work)
        big, bos_big = corpus_tokens(Path(loaded.tokenizer_file).parent, path)
        texts["kl_heldout_large"] = chunks(big, bos_big, args.ctx)

    def corpus_logits(model: torch.nn.Module, text: list[np.ndarray]) -> list[np.ndarray]:
        s, out = ReferenceSession(model, max_seq_len=args.ctx), []
        for piece in text:
            s.reset()
            out.append(s.prefill(piece)[0, args.ctx // 2 :])
        return out

    corpus_reference = {k: corpus_logits(loaded.model, t) for k, t in texts.items()}
    variants = args.variants.split(",")
    factors: dict[str, np.ndarray] = {}
    act_factors: dict[str, OrderedFactor] = {}
    shared: dict[tuple[int, bool], np.ndarray | OrderedFactor] = {}
    orders = {v.split("@")[0] == "gptq-act" for v in variants if v.split("@")[0].startswith("gptq")}

    def layer_done(_idx: int, stats: dict) -> None:
        for n, st in stats.items():
            if st.hessian is not None and st.tokens:
                for act_order in orders:
                    if (id(st.hessian), act_order) not in shared:
                        shared[id(st.hessian), act_order] = cholesky_factor(
                            st.hessian, args.damp, False, act_order
                        )
                    (act_factors if act_order else factors)[n] = shared[id(st.hessian), act_order]
        shared.clear()

    gptq = any(v.split("@")[0].startswith("gptq") for v in variants)
    calib = calibrate(loaded, hessian=gptq, layer_done=layer_done if gptq else None)
    importance = {n: s.mean_square for n, s in calib.linears.items()}
    recipe = parse_recipe("int4-b32" if args.mix == "q4_0" else "int4-b32-asym")
    types: dict[str, int] = {}

    def kind_of(name: str, w: np.ndarray, bits: int) -> str:
        if args.mix == "q4_0" and args.table_q8:
            return {4: "Q4_0", 8: "Q8_0"}[bits]
        experts = cfg.num_experts if cfg.is_moe else 0
        return ggml_mix_type(
            name, args.mix, w.shape[-1], list(cfg.layer_types), bool(cfg.tie_word_embeddings), experts
        )

    def theirs(w: np.ndarray, kind: str, imp: np.ndarray | None) -> np.ndarray:
        t = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[t]
        x = np.ascontiguousarray(w, np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        im = None if imp is None else np.ascontiguousarray(imp, np.float32)
        lib.ggml_quantize_init(int(t))
        lib.ggml_quantize_chunk(
            int(t),
            x.ctypes.data,
            out.ctypes.data,
            0,
            x.shape[0],
            x.shape[1],
            None if im is None else im.ctypes.data,
        )
        return gguf.quants.dequantize(out, t).astype(np.float32)

    def values_for(spec: str):  # noqa: ANN202
        variant, _, group = spec.partition("@")

        def values(w: np.ndarray, bits: int, name: str = "") -> np.ndarray:
            kind = kind_of(name, w, bits)
            types[kind] = types.get(kind, 0) + 1
            imp = importance.get(name)
            if variant.startswith("theirs") or (group and not re.search(GROUPS[group], name)):
                return theirs(w, kind, imp if variant == "theirs-imat" else None)
            factor = (
                (act_factors if variant == "gptq-act" else factors).get(name)
                if variant.startswith("gptq")
                else None
            )
            rounding = (
                variant if variant in ggml_blocks.GPTQ else "gptq" if variant.startswith("gptq") else variant
            )
            imp = imp if variant in ("imat", "gptq-act", *ggml_blocks.GPTQ) else None
            if kind in ggml_blocks.BLOCK_TYPES:
                return ggml_blocks.held_values(
                    w, ggml_blocks.BLOCK_TYPES[kind].bits, rounding, args.threads, imp, factor
                )
            kt = ggml_kquants.K_TYPES[kind]
            return ggml_kquants.held_values(w, kt, rounding, args.threads, imp, factor)

        return values

    # the activation rounding by each tensor's ggml type, as the GGUF simulation decides it
    held = {
        n: kind_of(n, t.numpy(), bits)
        for n, t in loaded.model.state_dict().items()
        if (bits := held_as(n, recipe)) is not None and t.dim() == 2
    }
    act = make_recipe(args.mix).activation_rounding(held)
    rows = []
    for variant in variants:
        types.clear()
        sim = simulate(loaded.model, recipe, act, threads=args.threads, weights=values_for(variant))
        out = logits(sim)
        held_by = {}
        for key, text in texts.items():
            held_by[key] = [
                (np.exp(log_softmax(r)) * (log_softmax(r) - log_softmax(o))).sum(-1)
                for r, o in zip(corpus_reference[key], corpus_logits(sim, text))
            ]
        kl = np.concatenate(
            [
                (np.exp(log_softmax(r)) * (log_softmax(r) - log_softmax(o))).sum(-1)
                for r, o in zip(reference, out)
            ]
        )
        pr = np.concatenate([np.exp(log_softmax(r)) for r in reference]).mean(0)
        pt = np.concatenate([np.exp(log_softmax(o)) for o in out]).mean(0)
        row = {
            "variant": variant,
            "kl_mean": float(kl.mean()),
            "kl_corpus": float((pr * (np.log(pr + 1e-30) - np.log(pt + 1e-30))).sum()),
        }
        for key, per_chunk in held_by.items():
            held = np.concatenate(per_chunk)
            row[f"{key}_mean"] = float(held.mean())
            row[f"{key}_stderr"] = float(held.std(ddof=1) / np.sqrt(held.size))
            row["heldout_positions" if key == "kl_heldout" else f"{key}_positions"] = int(held.size)
            row[f"{key}_chunk_sums"] = [float(c.sum()) for c in per_chunk]
        row |= {
            "kl_median": float(np.median(kl)),
            "kl_max": float(kl.max()),
            "positions": int(kl.size),
            "types": dict(types),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_chunk_sums")}), flush=True)
    base = next((r for r in rows if r["variant"] == "theirs"), None)
    for r in rows:
        r["kl_mean_vs_theirs"] = None if base is None else round(r["kl_mean"] / base["kl_mean"], 3)
        r["kl_corpus_vs_theirs"] = None if base is None else round(r["kl_corpus"] / base["kl_corpus"], 3)
        r["kl_heldout_vs_theirs"] = (
            None if base is None else round(r["kl_heldout_mean"] / base["kl_heldout_mean"], 3)
        )
        if base is not None and r is not base:
            for key in texts:
                r[f"{key}_paired_vs_theirs"] = paired_ratio(
                    np.array(r[f"{key}_chunk_sums"]), np.array(base[f"{key}_chunk_sums"])
                )
    result = {
        **provenance(),
        "model": args.model,
        "mix": args.mix,
        "table_q8": args.table_q8,
        "damp": args.damp,
        **heldout_info,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        paired = " | ".join(
            f"{p['ratio']} [{p['ci95'][0]}, {p['ci95'][1]}]"
            for k in texts
            if (p := r.get(f"{k}_paired_vs_theirs")) is not None
        )
        print(
            f"| {r['variant']} | {r['kl_mean']:.2e} | {r['kl_mean_vs_theirs']} | {r['kl_corpus']:.2e} "
            f"| {r['kl_corpus_vs_theirs']} | {r['kl_heldout_mean']:.2e} | {r['kl_heldout_vs_theirs']} | {paired} |"
        )


if __name__ == "__main__":
    main()
