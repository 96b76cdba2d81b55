"""Paired KL comparison of GGUF files of one model: each file's KL against the fp32 reference on the same
positions, and each file's ratio to each other file (`vs_NAME`; the `--base` file is named `--base-name`) with a 95% bootstrap
interval, on both metrics of `gguf_vs_llamacpp.py`:

- prompts: the parity prompts (216 positions of four texts), resampled in blocks of `--block` consecutive
  positions of one prompt (positions close together share their divergence, so single positions are not
  independent draws);
- held-out: `--heldout-docs N` documents of `examples/make_corpus.py`'s held-out split (`heldout_kl.heldout_text`,
  no calibration document), chunks of `--ctx` tokens from an empty state, second halves scored, resampled by
  chunk.

The ratio is of pooled means (`heldout_kl.paired_ratio`), the same resampled units for both files.

    .venv/bin/python benchmarks/gguf_kl_paired.py --model tiny --base /tmp/a/ours-q4_0-gptq \
        --files actorder=/tmp/b/ours-q4_0-gptq,llama.cpp=/tmp/a/theirs-q4_0 --heldout-docs 800 --threads 1 \
        --out benchmarks/results/gguf_kl_paired_tiny_q4_0.json

Each `--files` / `--base` entry is a folder holding `model.gguf` (and its manifest), e.g. the `ours-TYPE` /
`theirs-TYPE` folders `gguf_vs_llamacpp.py` leaves in its `--work`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from heldout_kl import heldout_text, paired_ratio
from provenance import provenance


def blocks(per_prompt: list[np.ndarray], size: int) -> np.ndarray:
    """Sums of consecutive runs of `size` positions within each prompt (the last run of a prompt shorter)."""
    return np.array([k[i : i + size].sum() for k in per_prompt for i in range(0, k.size, size)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", type=Path, required=True, help="folder of the first file")
    ap.add_argument("--base-name", default="base", help="its name in the output")
    ap.add_argument("--files", required=True, help="NAME=FOLDER,... of the other files")
    ap.add_argument("--heldout-docs", type=int, default=800)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--block", type=int, default=16, help="prompt positions per resampled block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_kl_paired"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    files = {args.base_name: args.base}
    for item in args.files.split(","):
        name, sep, folder = item.partition("=")
        if not sep or name in files:
            raise SystemExit(f"--files: NAME=FOLDER with a new NAME expected, got {item!r}")
        files[name] = Path(folder)
    for folder in files.values():
        if not (folder / "model.gguf").is_file():
            raise SystemExit(f"{folder}: no model.gguf")
    if args.heldout_docs < 1 or args.block < 1:
        raise SystemExit("--heldout-docs and --block must be at least 1")

    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.corpus import chunks, corpus_tokens
    from lfm_export.parity.metrics import log_softmax
    from lfm_export.parity.prompts import default_prompts
    from lfm_export.runtime.gguf import GgufSession

    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    assert loaded.tokenizer_file is not None, "the held-out text needs a model with a tokenizer"
    prompts = default_prompts(loaded.config.vocab_size, loaded.tokenizer_file)
    path, info = heldout_text(args.heldout_docs, args.work)
    ids, bos = corpus_tokens(Path(loaded.tokenizer_file).parent, path)
    pieces = chunks(ids, bos, args.ctx)
    ref = ReferenceSession(loaded.model)
    ref_prompts, ref_held = [], []
    for p in prompts:
        ref.reset()
        ref_prompts.append(log_softmax(ref.prefill(p[None])[0]))
    for piece in pieces:
        ref.reset()
        ref_held.append(log_softmax(ref.prefill(piece)[0, args.ctx // 2 :]))

    def kl(lr: np.ndarray, test: np.ndarray) -> np.ndarray:
        return (np.exp(lr) * (lr - log_softmax(test))).sum(-1)

    per_file = {}
    for name, folder in files.items():
        s = GgufSession(folder, threads=args.threads)
        pk = []
        for p, lr in zip(prompts, ref_prompts):
            s.reset()
            pk.append(kl(lr, s.prefill(p[None])[0]))
        hk = []
        for piece, lr in zip(pieces, ref_held):
            s.reset()
            hk.append(kl(lr, s.prefill(piece)[0, args.ctx // 2 :]))
        s.close()
        per_file[name] = (pk, hk)
        print(name, float(np.concatenate(pk).mean()), float(np.concatenate(hk).mean()), flush=True)

    rows = []
    for name, (pk, hk) in per_file.items():
        row = {
            "name": name,
            "folder": str(files[name]),
            "kl_prompts_mean": float(np.concatenate(pk).mean()),
            "prompt_positions": int(sum(k.size for k in pk)),
            "kl_heldout_large_mean": float(np.concatenate(hk).mean()),
            "heldout_positions": int(sum(k.size for k in hk)),
        }
        for other, (po, ho) in per_file.items():
            if other != name:
                row[f"vs_{other}"] = {
                    "prompts": paired_ratio(blocks(pk, args.block), blocks(po, args.block)),
                    "heldout_large": paired_ratio(
                        np.array([k.sum() for k in hk]), np.array([k.sum() for k in ho])
                    ),
                }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        **provenance(),
        "load_average_at_start": load_start,
        "model": args.model,
        "threads": args.threads,
        "prompt_block": args.block,
        "ctx": args.ctx,
        **info,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
