"""Weight bytes and KL of artifact folders exported before, by `quality_per_byte.py`'s own measurements (`sizes`,
`quality`: the same corpus, chunks and reference), for a point measured apart from a full run.

    .venv/bin/python benchmarks/quality_per_byte_points.py MODEL FOLDER... --json FILE

Each point keeps its folder's export record (`manifest.json`: recipe, budget, commit-independent) beside the
numbers; the peers are not run (compare with their points in the frontier, same definitions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--corpus-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import torch
    from onnx_vs_genai import checkpoint_folder
    from quality_per_byte import heldout_pieces, quality, sizes

    from lfm_export.loading import load_model

    torch.set_num_threads(args.threads)
    ckpt = checkpoint_folder(args.model, args.json.parent).resolve()
    loaded = load_model(ckpt).materialized()
    pieces = heldout_pieces(ckpt, args.corpus_tokens, args.ctx)
    out = {
        **provenance(),
        "model": args.model,
        "corpus_tokens": args.corpus_tokens,
        "ctx": args.ctx,
        "points": [],
    }
    for folder in args.folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        kind = manifest["backend"]
        p = {"folder": str(folder), "session": kind, "backend": kind, "recipe": manifest["recipe"]["name"]}
        p.update(sizes(folder))
        quality(p, loaded, pieces, args)
        p["budget"] = manifest.get("budget")
        p["parity_verdict"] = (manifest.get("parity") or {}).get("verdict")
        p["tool"] = manifest.get("tool")
        p["precision_mix"] = manifest["recipe"].get("mix")
        out["points"].append(p)
        c = p["corpus"]
        print(
            f"{folder}: {p['weight_bytes']:,} B, corpus KL {c['kl_mean']:.5f} ± {c['kl_se']:.5f}", flush=True
        )
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
