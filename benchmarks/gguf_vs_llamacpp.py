"""`lfm-export gguf` against llama.cpp's own path (its `convert_hf_to_gguf.py`, then its quantizer
`llama_model_quantize`) on the same weights, run by the same llama.cpp (llama-cpp-python) with the same threads.

    .venv/bin/python benchmarks/gguf_vs_llamacpp.py --model tiny --threads 1 \
        --llama-src /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp --out benchmarks/results/gguf_vs_llamacpp.json

`--llama-src` is the `vendor/llama.cpp` folder of llama-cpp-python's sdist (`pip download llama-cpp-python==X
--no-deps --no-binary :all:`): its `convert_hf_to_gguf.py` runs in a side process with its own `gguf-py`.

1. Theirs: the checkpoint copied with the Liquid config keys its LFM2 converter reads (`block_ff_dim`,
   `block_auto_adjust_ff_dim` false, `block_multiple_of`, `block_ffn_dim_multiplier`; a transformers-written
   config lacks them), converted to f32 (`--outtype f32`; its tokenizer check, which knows LFM2's tokenizer by
   a hash of the released vocabulary, is told `lfm2`: the bundled models' vocabularies are smaller), then
   quantized by `llama_model_quantize` to each type. Wall time and peak RSS of convert + quantize.
2. Ours: `lfm-export gguf MODEL --quant TYPE --no-parity` in its own process (wall, peak RSS); a `-mse` type
   (the core quantizer's rounding search) is compared with llama.cpp's plain type.
3. Our f32 export against theirs: tensors byte for byte, metadata key by key.
4. Both files run by our shim (`GgufSession`, F32 KV cache): KL against the fp32 reference (the canonical
   model in torch) over the parity prompts (pooled mean over positions, and corpus level: the KL of the
   position-averaged distributions), over the held-out text (`--corpus`, default the bundled
   `assets/corpus/heldout.txt`, which no calibration reads: chunks of `--ctx` tokens from an empty state,
   second halves scored, as `lfm-export parity --corpus`), and with `--heldout-docs N` over a larger held-out
   text (`heldout_kl.heldout_text`: the first N documents of `examples/make_corpus.py`'s held-out split, none of
   the calibration text's, written to `--work`; `kl_heldout_large_*`), top-1 agreement; per type our row's
   ratios to llama.cpp's (`vs_llama_cpp`): prompts and corpus KL as points, each held-out text as a paired ratio
   of pooled means with its 95% bootstrap interval over chunks (`heldout_kl.paired_ratio`); llama.cpp's file
   of a type is measured once (a `-gptq` row's is the plain type's); prefill (`--prompt-len` random ids, every position's
   logits off: `prefill_last`) and decode tok/s, best of `--rounds`.
5. Decode side by side (`--decode-repeats` R > 0): both files of a type open at once in the same process, same
   threads; R rounds, each decoding `--new-tokens` tokens greedily after the same `--prompt-len` prefill in
   both files, the order alternating (ours first in even rounds, theirs first in odd ones). `--decode-blocks`
   B: B times both sessions are opened afresh (ours first in even blocks), R rounds each: a pair of sessions
   keeps its speed ratio, up to 6% off for two copies of one file, for its whole life, so one pair is one
   draw however many rounds it runs (`gguf_decode_ab.py`). Per file: every round's tok/s, median, min, max;
   per type: the ratio of medians, the median and range of the per-round ratios (ours / theirs) and each
   block's ratio of medians.

   With `--decode-threads 1,2` the side by side runs once per thread count (both sessions opened afresh with
   that many threads); the 1-minute load average is recorded before and after each.
6. `--decode-only`: steps 1, 2 and 5 only (no fp32 reference, no KL, no f32 comparison): the side by side at a
   size whose fp32 reference is too slow here, e.g. `--model random:lfm2-1.2b`. A `random:PRESET` model is
   first written as a checkpoint folder (`onnx_vs_genai.checkpoint_folder`: fp32 safetensors, the bundled
   tokenizer files, which both converters pad to the preset's vocabulary) under `--ckpt-dir`, kept between
   runs; both exporters read that folder.

Writes JSON (date, machine, commit, command, rows) to `--out` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from heldout_kl import heldout_text, paired_ratio
from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q6_k": 18}
"""llama.cpp's `LLAMA_FTYPE_MOSTLY_*` of each type."""

CONVERT = """
import sys
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", "f32", "--outfile", {dst!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "lfm2"
import runpy
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""
QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {ftype}
params.nthread = {threads}
rc = llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), params)
sys.exit(rc)
"""


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, GNU time's %M) of `cmd`, which must succeed."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t = time.perf_counter()
        r = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{r.stderr[-2000:]}")
        return wall, int(Path(rss.name).read_text().split()[-1]) * 1024


def liquid_copy(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.setdefault("block_ff_dim", cfg["intermediate_size"])
    cfg.setdefault("block_auto_adjust_ff_dim", False)
    cfg.setdefault("block_multiple_of", 256)
    cfg.setdefault("block_ffn_dim_multiplier", 1.0)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def measure(
    folder: Path, prompts: list[np.ndarray], reference: list[np.ndarray], args, heldout: list | None = None
) -> dict:
    """KL, top-1 and speed of the file in `folder`; `heldout`: `(prefix, (chunks, reference logits))` per
    held-out text, each giving `{prefix}_mean`, `_stderr`, `_positions` and `_chunk_sums` (per chunk, the KL
    summed over its scored positions: what `heldout_kl.paired_ratio` resamples)."""
    from lfm_export.parity.metrics import log_softmax
    from lfm_export.runtime.gguf import GgufSession

    s = GgufSession(folder, threads=args.threads)
    kls, top1, p_ref, p_test = [], [], [], []
    for ids, ref in zip(prompts, reference):
        s.reset()
        test = s.prefill(ids[None])[0]
        lr, lt = log_softmax(ref), log_softmax(test)
        kls.append((np.exp(lr) * (lr - lt)).sum(-1))
        top1.append(ref.argmax(-1) == test.argmax(-1))
        p_ref.append(np.exp(lr))
        p_test.append(np.exp(lt))
    pr, pt = np.concatenate(p_ref).mean(0), np.concatenate(p_test).mean(0)
    corpus = float((pr * (np.log(pr + 1e-30) - np.log(pt + 1e-30))).sum())
    held: dict = {}
    for prefix, texts in (
        heldout or {}
    ):  # as `lfm-export parity --corpus`: chunks from an empty state, second halves
        pieces, held_ref = texts
        hk = []
        for piece, ref in zip(pieces, held_ref):
            s.reset()
            lr, lt = log_softmax(ref), log_softmax(s.prefill(piece)[0, piece.shape[1] // 2 :])
            hk.append((np.exp(lr) * (lr - lt)).sum(-1))
        h = np.concatenate(hk)
        held.update(
            {
                f"{prefix}_mean": float(h.mean()),
                f"{prefix}_stderr": float(h.std(ddof=1) / np.sqrt(h.size)),
                f"{prefix}_positions": int(h.size),
                f"{prefix}_chunk_sums": [float(c.sum()) for c in hk],
            }
        )
    rng = np.random.default_rng(0)
    ids = rng.integers(16, s.vocab_size, (1, args.prompt_len))
    best_p = best_d = 0.0
    for _ in range(args.rounds):
        s.reset()
        t = time.perf_counter()
        tok = int(s.prefill_last(ids)[0].argmax())
        best_p = max(best_p, args.prompt_len / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.new_tokens):
            tok = int(s.decode(np.array([tok]))[0].argmax())
        best_d = max(best_d, args.new_tokens / (time.perf_counter() - t))
    s.close()
    k = np.concatenate(kls)
    return {
        "kl_mean": float(k.mean()),
        "kl_p99": float(np.quantile(k, 0.99)),
        "kl_corpus": corpus,
        **held,
        "top1_agreement": float(np.concatenate(top1).mean()),
        "positions": int(k.size),
        "prefill_tok_s": round(best_p, 1),
        "decode_tok_s": round(best_d, 1),
    }


def against(ours: dict, theirs: dict) -> dict:
    """Our row's KL as ratios of llama.cpp's row of the same type: the prompts' pooled mean and corpus KL (point
    values: 216 positions of four prompts) and, per held-out text, the paired ratio with its 95% bootstrap
    interval over chunks (`heldout_kl.paired_ratio`)."""
    out: dict = {
        "kl_mean": round(ours["kl_mean"] / theirs["kl_mean"], 4),
        "kl_corpus": round(ours["kl_corpus"] / theirs["kl_corpus"], 4),
    }
    for key in ours:
        if key.endswith("_chunk_sums"):
            out[key[: -len("_chunk_sums")]] = paired_ratio(np.array(ours[key]), np.array(theirs[key]))
    return out


def decode_round(s, ids: np.ndarray, new_tokens: int) -> float:
    """Decode tok/s of one round: `ids` prefilled from an empty state (untimed), then `new_tokens` greedy steps."""
    s.reset()
    tok = int(s.prefill_last(ids)[0].argmax())
    t = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(s.decode(np.array([tok]))[0].argmax())
    return new_tokens / (time.perf_counter() - t)


def side_by_side(ours: Path, theirs: Path, args, threads: int | None = None) -> dict:
    """Decode tok/s of both files, same process and `threads` (default `args.threads`): `args.decode_blocks`
    blocks, each opening both sessions afresh (ours first in even blocks, theirs first in odd ones), one
    discarded warm-up round each, then `args.decode_repeats` rounds in alternating order; the load average
    before and after.

    Two sessions of one file, opened side by side, differ by up to 6% for their whole life
    (`gguf_decode_ab.py`'s A/A runs; where their buffers land, the repacked weights, the KV cache, the mapped
    file's pages, is the likely cause), so rounds within one block are not independent; the blocks are."""
    from lfm_export.runtime.gguf import GgufSession

    threads = threads or args.threads
    load_before = round(os.getloadavg()[0], 2)
    runs: dict[str, list[float]] = {"ours": [], "theirs": []}
    block_ratios = []
    for b in range(args.decode_blocks):
        order = ("ours", "theirs") if b % 2 == 0 else ("theirs", "ours")
        paths = {"ours": ours, "theirs": theirs}
        sessions = {who: GgufSession(paths[who], threads=threads) for who in order}
        rng = np.random.default_rng(1)
        ids = rng.integers(16, sessions["ours"].vocab_size, (1, args.prompt_len))
        for s in sessions.values():  # one untimed warm-up round each
            decode_round(s, ids, args.new_tokens)
        block: dict[str, list[float]] = {"ours": [], "theirs": []}
        for r in range(args.decode_repeats):
            for who in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                block[who].append(round(decode_round(sessions[who], ids, args.new_tokens), 1))
        for s in sessions.values():
            s.close()
        for who in runs:
            runs[who] += block[who]
        block_ratios.append(round(float(np.median(block["ours"]) / np.median(block["theirs"])), 4))
    ratios = [a / b for a, b in zip(runs["ours"], runs["theirs"])]
    out: dict = {
        "threads": threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "decode_blocks": args.decode_blocks,
        "decode_repeats": args.decode_repeats,
        "order": "per block both sessions opened afresh, ours first in even blocks; one untimed warm-up round "
        "each; rounds alternating, ours first in even rounds",
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    for who, v in runs.items():
        out[who] = {"tok_s": v, "median": float(np.median(v)), "min": min(v), "max": max(v)}
    out["ratio_of_medians"] = round(out["ours"]["median"] / out["theirs"]["median"], 4)
    out["round_ratio_median"] = round(float(np.median(ratios)), 4)
    out["round_ratio_min"] = round(min(ratios), 4)
    out["round_ratio_max"] = round(max(ratios), 4)
    out["round_ratios"] = [round(r, 4) for r in ratios]
    out["block_ratios"] = block_ratios
    out["block_ratio_median"] = round(float(np.median(block_ratios)), 4)
    return out


def compare_f32(args: argparse.Namespace, env: dict[str, str], theirs_f32: Path) -> dict:
    """Our f32 export against llama.cpp's f32 conversion: tensors byte for byte, metadata key by key."""
    import gguf

    ours = args.work / "ours-f32"
    cmd = [str(BIN / "lfm-export"), "gguf", args.model, "-o", str(ours), "--quant", "f32", "--no-parity"]
    timed(cmd, {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    a, b = gguf.GGUFReader(ours / "model.gguf"), gguf.GGUFReader(theirs_f32)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = sorted(
        n
        for n in set(ta) | set(tb)
        if n not in ta or n not in tb or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
    )

    def fields(r: gguf.GGUFReader) -> dict:
        return {k: repr(f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}

    fa, fb = fields(a), fields(b)
    return {
        "f32_tensors": len(ta),
        "f32_tensors_differing": differ,
        "metadata_keys_differing": sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--types", default="q8_0,q4_0,q4_0-mse", help="ours; theirs: the type without -mse")
    ap.add_argument("--llama-src", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--decode-repeats",
        type=int,
        default=0,
        help="rounds of the side-by-side decode of both files (alternating order); 0: none",
    )
    ap.add_argument(
        "--decode-blocks",
        type=int,
        default=1,
        help="times both sessions are opened afresh for the side by side (open order alternating), "
        "--decode-repeats rounds each",
    )
    ap.add_argument(
        "--decode-threads",
        default=None,
        help="comma-separated thread counts of the side-by-side decode (default: --threads)",
    )
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="exports and the side-by-side decode only: no fp32 reference, KL or f32 comparison",
    )
    ap.add_argument(
        "--ckpt-dir",
        type=Path,
        default=Path("/tmp/gguf_vs_llamacpp_ckpt"),
        help="where a random:PRESET model's checkpoint folder is written (kept between runs)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_vs_llamacpp"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--corpus",
        type=Path,
        default=ROOT / "lfm_export" / "assets" / "corpus" / "heldout.txt",
        help="held-out text for `kl_heldout_*`: KL over chunks of --ctx tokens, second halves (parity --corpus)",
    )
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument(
        "--heldout-docs",
        type=int,
        default=0,
        help="also KL over the first N documents of make_corpus.py's held-out split (`kl_heldout_large_*`, "
        "written to --work; calibration documents left out), with paired ratios and bootstrap intervals",
    )
    args = ap.parse_args()
    if args.heldout_docs < 0:
        raise SystemExit("--heldout-docs must be at least 0")
    if args.decode_blocks < 1 or args.decode_repeats < 0:
        raise SystemExit("--decode-blocks must be at least 1 and --decode-repeats at least 0")

    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.prompts import default_prompts

    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    requested = args.model
    if args.model.startswith("random:"):  # both exporters read one checkpoint folder written from the preset
        from onnx_vs_genai import checkpoint_folder

        args.ckpt_dir.mkdir(parents=True, exist_ok=True)
        args.model = str(checkpoint_folder(args.model, args.ckpt_dir).resolve())
    prompts, reference, heldout = [], [], None
    heldout_info: dict = {}
    if args.decode_only:
        from onnx_vs_genai import checkpoint_folder

        model_path = checkpoint_folder(args.model, args.ckpt_dir)
    else:
        loaded = load_model(args.model)
        assert loaded.path is not None, "the comparison needs a checkpoint folder (a bundled model or a path)"
        model_path = loaded.path
        prompts = default_prompts(loaded.config.vocab_size, loaded.tokenizer_file)
        ref = ReferenceSession(loaded.model)
        for ids in prompts:
            ref.reset()
            reference.append(ref.prefill(ids[None])[0])
        if loaded.tokenizer_file is not None:
            from lfm_export.parity.corpus import chunks, corpus_tokens

            texts = [("kl_heldout", args.corpus)]
            if args.heldout_docs:
                path, heldout_info = heldout_text(args.heldout_docs, args.work / "heldout")
                texts.append(("kl_heldout_large", path))
            heldout = []
            for prefix, text in texts:
                ids, bos = corpus_tokens(Path(loaded.tokenizer_file).parent, text)
                pieces = chunks(ids, bos, args.ctx)
                held_ref = []
                for piece in pieces:
                    ref.reset()
                    held_ref.append(ref.prefill(piece)[0, args.ctx // 2 :])
                heldout.append((prefix, (pieces, held_ref)))

    src = liquid_copy(model_path, args.work / "hf")
    theirs_f32 = args.work / "theirs-f32.gguf"
    conv_env = {**env, "PYTHONPATH": f"{args.llama_src / 'gguf-py'}{os.pathsep}{args.llama_src}"}
    code = CONVERT.format(src=str(src), dst=str(theirs_f32))
    convert_s, convert_rss = timed([sys.executable, "-c", code], conv_env, args.llama_src)

    same = {} if args.decode_only else compare_f32(args, env, theirs_f32)
    print(json.dumps(same), flush=True)
    decode_threads = [int(t) for t in (args.decode_threads or str(args.threads)).split(",")]
    rows = []
    decode = {}
    theirs_measured: dict[str, dict] = {}
    for kind in args.types.split(","):
        ours = args.work / f"ours-{kind}"
        cmd = [str(BIN / "lfm-export"), "gguf", args.model, "-o", str(ours), "--quant", kind, "--no-parity"]
        cmd += ["--threads", str(args.threads)]
        ours_s, ours_rss = timed(
            cmd, {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
        )
        theirs = args.work / f"theirs-{kind}"
        shutil.copytree(
            ours, theirs
        )  # our manifest and tokenizer files; llama.cpp's own file in place of ours
        q = QUANTIZE.format(
            ftype=FTYPES[kind.split("-")[0]],
            threads=args.threads,
            src=str(theirs_f32),
            dst=str(theirs / "model.gguf"),
        )
        quant_s, quant_rss = timed([sys.executable, "-c", q], env)
        base = kind.split("-")[0]
        pair = []
        for who, folder, wall, rss in (
            ("lfm-export", ours, ours_s, ours_rss),
            ("llama.cpp", theirs, convert_s + quant_s, max(convert_rss, quant_rss)),
        ):
            if args.decode_only:
                measured = {}
            elif (
                who == "llama.cpp" and base in theirs_measured
            ):  # the same file as that type's: measured once
                measured = {**theirs_measured[base], "measured_with_type": theirs_measured[base]["type"]}
            else:
                measured = {"type": kind, **measure(folder, prompts, reference, args, heldout)}
                if who == "llama.cpp":
                    theirs_measured[base] = measured
            row = {
                "type": kind,
                "who": who,
                "file_bytes": (folder / "model.gguf").stat().st_size,
                "export_wall_s": round(wall, 2),
                "export_peak_rss_bytes": rss,
                **{k: v for k, v in measured.items() if k != "type"},
            }
            pair.append(row)
        if not args.decode_only:
            pair[0]["vs_llama_cpp"] = against(pair[0], pair[1])
        for row in pair:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_chunk_sums")}), flush=True)
        for t in decode_threads if args.decode_repeats else ():
            key = kind if len(decode_threads) == 1 else f"{kind}@{t}t"
            decode[key] = side_by_side(ours, theirs, args, t)
            print(json.dumps({"type": key, "decode_side_by_side": decode[key]}), flush=True)

    result = {
        **provenance(),
        "load_average_at_start": load_start,
        "model": requested,
        "checkpoint": args.model,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "f32_against_llama_cpp": same,
        **heldout_info,
        "rows": rows,
        **({"decode_side_by_side": decode} if decode else {}),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| type | who | bytes | KL mean | KL corpus | KL held-out | top-1 | prefill tok/s | decode tok/s | export s "
        "| RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if args.decode_only:
            print(
                f"| {r['type']} | {r['who']} | {r['file_bytes']} | | | | | | | {r['export_wall_s']} | "
                f"{r['export_peak_rss_bytes'] / 1e6:.0f} |"
            )
            continue
        print(
            f"| {r['type']} | {r['who']} | {r['file_bytes']} | {r['kl_mean']:.2e} | {r['kl_corpus']:.2e} | "
            f"{r.get('kl_heldout_mean', float('nan')):.2e} | "
            f"{r['top1_agreement']:.4f} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {r['export_wall_s']} | "
            f"{r['export_peak_rss_bytes'] / 1e6:.0f} |"
        )
    for r in rows:
        if "vs_llama_cpp" in r:
            v = r["vs_llama_cpp"]
            held = "; ".join(
                f"{k}: {x['ratio']}x [{x['ci95'][0]}, {x['ci95'][1]}] over {x['chunks']} chunks"
                for k, x in v.items()
                if isinstance(x, dict)
            )
            print(f"{r['type']} vs llama.cpp: prompts {v['kl_mean']}x, corpus {v['kl_corpus']}x; {held}")
    for kind, d in decode.items():
        print(
            f"decode {kind}: ours median {d['ours']['median']} [{d['ours']['min']}, {d['ours']['max']}], theirs "
            f"{d['theirs']['median']} [{d['theirs']['min']}, {d['theirs']['max']}], ratio {d['ratio_of_medians']} "
            f"(per round {d['round_ratio_min']}-{d['round_ratio_max']}; per block {d['block_ratios']})"
        )


if __name__ == "__main__":
    main()
