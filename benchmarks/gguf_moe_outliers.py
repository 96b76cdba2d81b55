"""Where the corpus KL of GGUF files on an MoE model comes from: per scored position, on `quality_per_byte.py`'s
held-out chunks (the same corpus, chunks and reference), each file's worst position, every file's KL there, the
mean without each file's own worst position, and the reference model's router margins there
(`MoE.router_margin`: the last selected expert's lead over the first unselected one, over the row's spread).

    .venv/bin/python benchmarks/gguf_moe_outliers.py tiny-moe W/tiny-moe/ours-gguf-q4_k_m \\
        W/tiny-moe/llama.cpp-q4_k_m ... --json benchmarks/results/gguf_moe_outliers_tiny_moe.json

(`W`: a `quality_per_byte.py --work` folder whose GGUF folders hold our manifest.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--corpus-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import torch
    from onnx_vs_genai import checkpoint_folder
    from quality_per_byte import heldout_pieces

    from lfm_export.loading import load_model
    from lfm_export.model import MoE
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.metrics import kl_divergence
    from lfm_export.runtime.gguf import GgufSession

    torch.set_num_threads(1)
    ckpt = checkpoint_folder(args.model, args.json.parent).resolve()
    loaded = load_model(ckpt).materialized()
    pieces = heldout_pieces(ckpt, args.corpus_tokens, args.ctx)
    half = args.ctx // 2
    margins: dict[str, np.ndarray] = {}

    def hook(name: str) -> Any:
        def record(mod: MoE, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1])
            margins[name] = mod.router_margin(x).detach().numpy()

        return record

    for name, mod in loaded.model.named_modules():
        if isinstance(mod, MoE):
            mod.register_forward_hook(hook(name))
    ref = ReferenceSession(loaded.model)
    refs, ref_margins = [], []
    for piece in pieces:
        ref.reset(1)
        refs.append(ref.prefill(piece)[0])
        ref_margins.append({k: v.copy() for k, v in margins.items()})
    kls: dict[str, np.ndarray] = {}
    for folder in args.folders:
        s = GgufSession(folder, threads=1)
        rows = []
        for piece, r in zip(pieces, refs, strict=True):
            s.reset(1)
            rows.append(kl_divergence(r[half:], s.prefill(piece)[0, half:]))
        kls[folder.name] = np.stack(rows)
    files = []
    for name, k in kls.items():
        c, i = np.unravel_index(int(k.argmax()), k.shape)
        files.append(
            {
                "file": name,
                "kl_mean": float(k.mean()),
                "kl_max": float(k[c, i]),
                "worst": {"chunk": int(c), "position": int(i + half)},
                "kl_mean_without_worst": float((k.sum() - k[c, i]) / (k.size - 1)),
                "kl_at_worst_of_every_file": {n: float(v[c, i]) for n, v in kls.items()},
                "router_margin_at_worst": {m: float(v[i + half]) for m, v in ref_margins[c].items()},
            }
        )
    every = np.concatenate([np.concatenate([v[half:] for v in d.values()]) for d in ref_margins])
    out = {
        **provenance(),
        "model": args.model,
        "corpus_tokens": args.corpus_tokens,
        "ctx": args.ctx,
        "scored_positions": int(next(iter(kls.values())).size),
        "router_margin_quantiles_scored": {
            q: float(np.percentile(every, float(q))) for q in ("0.1", "1", "5", "50")
        },
        "files": files,
    }
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for f in files:
        print(
            f"{f['file']}: mean {f['kl_mean']:.3e}, max {f['kl_max']:.3f} at chunk {f['worst']['chunk']} "
            f"position {f['worst']['position']}, mean without it {f['kl_mean_without_worst']:.3e}"
        )


if __name__ == "__main__":
    main()
