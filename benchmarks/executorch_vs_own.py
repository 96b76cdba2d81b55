"""Our ExecuTorch export against ExecuTorch's own LFM2 export of the same weights, run by one harness.

    .venv/bin/python benchmarks/executorch_vs_own.py --preset lfm2-350m --out out/bench-et

1. ours: `lfm-export executorch random:PRESET --quant int4-bG-a8[-mse] --max-seq-len C --max-prefill P
   --head-bits H --no-parity` for each G of `--group-size`, rounding of `--rounding` and H of `--head-bits`
   (folders `ours-gG[-mse]-hH`; ExecuTorch's own 8da4w recipe uses groups of 128 and optimised scales, ours
   defaults to 32 and plain rounding; a child process each: wall time and peak RSS
   of its largest process; P defaults to the prompt length, so both programs prefill the prompt in one call:
   theirs takes up to its whole context per call);
2. theirs: the same weights (the canonical model's state dict, HF names) converted with ExecuTorch's
   `examples/models/lfm2/convert_weights.lfm_2_to_meta` and saved as a `.pth`, a params JSON for the preset,
   then `python -m executorch.extension.llm.export.export_llm --config lfm2_xnnpack_q8da4w.yaml ...` (its
   8da4w recipe; wall time and peak RSS the same way);
3. both `.pte` run here, one after the other, through `executorch.runtime` with the same threadpool size
   (`--threads`): a seeded random prompt of `--prompt-len` tokens prefilled in chunks of each program's
   `get_max_seq_len`, then `--new-tokens` decode steps fed the fp32 reference's greedy tokens (so both
   programs see the same sequence); tokens/s of each phase;
4. quality: KL(fp32 reference || program) over the last prompt position and every decode position (their
   program returns the last position's logits only), mean and max.

Prints a Markdown table (with the load average before and after) and writes `results.json` in `--out`. Heavy (ExecuTorch's export of LFM2-350M takes
minutes and GBs): run it alone, e.g. under `flock /tmp/lfm-heavy.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
MODEL_CLASS = {"lfm2-350m": "lfm2_350m", "lfm2-1.2b": "lfm2_1_2b", "lfm2-700m": "lfm2_700m"}

_MEASURE = """
import resource, subprocess, sys, time
t = time.monotonic()
rc = subprocess.run(sys.argv[1:]).returncode
print("MEASURED", rc, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` in a fresh process; its wall seconds and peak RSS (largest child, bytes)."""
    with open(log, "w") as f:
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=f, text=True, env=env
        ).stdout
    line = [x for x in out.splitlines() if x.startswith("MEASURED")][-1].split()
    if int(line[1]) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {line[1]}); see {log}")
    return {"export_s": float(line[2]), "peak_rss_bytes": int(line[3])}


def params_json(cfg: Any) -> dict[str, Any]:
    """ExecuTorch's LFM2 ModelArgs for `cfg` (keys in the shared reference notes)."""
    return {
        "dim": cfg.hidden_size,
        "hidden_dim": cfg.intermediate_size,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "n_layers": cfg.num_hidden_layers,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "use_hf_rope": True,
        "use_qk_norm": True,
        "qk_norm_before_rope": True,
        "layer_types": ["full_attention" if t == "full_attention" else "conv" for t in cfg.layer_types],
    }


def export_theirs(model: Any, preset: str, context: int, out: Path) -> dict[str, Any]:
    import executorch
    import torch
    from executorch.examples.models.lfm2.convert_weights import lfm_2_to_meta

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: theirs re-ties
    if not (out / "theirs.pth").exists():
        torch.save(lfm_2_to_meta(state), out / "theirs.pth")
    del state
    (out / "theirs_params.json").write_text(json.dumps(params_json(model.config)))
    yaml = Path(executorch.__path__[0]) / "examples/models/lfm2/config/lfm2_xnnpack_q8da4w.yaml"
    cmd = [
        sys.executable,
        "-m",
        "executorch.extension.llm.export.export_llm",
        "--config",
        str(yaml),
        f"+base.model_class={MODEL_CLASS[preset]}",
        f"+base.params={out / 'theirs_params.json'}",
        f"+base.checkpoint={out / 'theirs.pth'}",
        f"+export.max_seq_length={context}",
        f"+export.max_context_length={context}",
        f"+export.output_name={out / 'theirs.pte'}",
    ]
    result = measured(cmd, out / "theirs_export.log")
    (out / "theirs.pth").unlink()
    return result


def ours_name(group: int, rounding: str, head_bits: int) -> str:
    return f"ours-g{group}{'-mse' if rounding == 'mse' else ''}-h{head_bits}"


def export_ours(
    preset: str, context: int, max_prefill: int, group: int, rounding: str, head_bits: int, out: Path
) -> dict[str, Any]:
    name = ours_name(group, rounding, head_bits)
    folder = out / name
    cmd = [
        str(Path(sys.executable).parent / "lfm-export"),
        "executorch",
        f"random:{preset}",
        "-o",
        str(folder),
    ]
    quant = f"int4-b{group}-a8{'-mse' if rounding == 'mse' else ''}"
    cmd += ["--quant", quant, "--max-seq-len", str(context), "--max-prefill", str(max_prefill)]
    cmd += ["--head-bits", str(head_bits), "--no-parity", "--force", "--json"]
    return measured(cmd, out / f"{name}_export.log")


def run_program(path: Path, prompt: list[int], feed: list[int], threads: int) -> dict[str, Any]:
    """Prefill `prompt`, then decode feeding `feed`; tokens/s and the log-probs after the prompt and after each
    fed token but the last (`[1 + len(feed) - 1, vocab]`)."""
    import executorch.kernels.quantized  # noqa: F401
    import numpy as np
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    program = Runtime.get().load_program(str(path))
    chunk = int(program.load_method("get_max_seq_len").execute([])[0])
    forward = program.load_method("forward")

    def last(logits: torch.Tensor) -> np.ndarray:
        x = logits.detach().float().reshape(-1, logits.shape[-1])[-1]
        return torch.log_softmax(x, -1).numpy()

    t = time.perf_counter()
    for s in range(0, len(prompt), chunk):
        out = forward.execute([torch.tensor([prompt[s : s + chunk]]), torch.tensor([s])])[0]
    prefill_s = time.perf_counter() - t
    logps = [last(out)]
    decode_s = 0.0
    for i, tok in enumerate(feed[:-1]):
        t = time.perf_counter()
        out = forward.execute([torch.tensor([[tok]]), torch.tensor([len(prompt) + i])])[0]
        decode_s += time.perf_counter() - t
        logps.append(last(out))
    return {
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": (len(feed) - 1) / decode_s,
        "pte_bytes": path.stat().st_size,
        "logp": np.stack(logps),
    }


def reference(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], Any]:
    """The fp32 canonical model's greedy continuation and its log-probs at the same positions."""
    import torch

    conv, keys, values = model.empty_state(1)
    ids = torch.tensor([prompt])
    feed, logps = [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, conv, keys, values = model(ids, conv, keys, values)
            lp = torch.log_softmax(logits[0, -1].float(), -1)
            logps.append(lp.numpy())
            feed.append(int(lp.argmax()))
            ids = torch.tensor([[feed[-1]]])
    import numpy as np

    return feed, np.stack(logps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lfm2-350m", choices=sorted(MODEL_CLASS))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-prefill",
        type=int,
        default=512,
        help="our program's most tokens per call (theirs takes the whole context: max_seq_length)",
    )
    ap.add_argument(
        "--head-bits",
        type=int,
        nargs="+",
        default=[8, 4],
        help="one export of ours per lm_head width (--head-bits), all run in the same process",
    )
    ap.add_argument(
        "--group-size",
        type=int,
        nargs="+",
        default=[32, 128],
        help="one export of ours per int4 group size (--group-size; ExecuTorch's own 8da4w uses 128)",
    )
    ap.add_argument(
        "--rounding",
        nargs="+",
        default=["nearest"],
        choices=["nearest", "mse"],
        help="one export of ours per weight rounding (mse: the -mse recipe, each block's scale searched)",
    )
    ap.add_argument("--out", type=Path, default=Path("out/bench-et"))
    ap.add_argument("--reuse", action="store_true", help="keep .pte files already in --out")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    from lfm_export.loading import load_model

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    exports: dict[str, Any] = {}
    load = {"load_average_start": os.getloadavg()}
    variants = [(g, r, b) for g in args.group_size for r in args.rounding for b in args.head_bits]
    for g, r, bits in variants:
        if not (args.reuse and (out / ours_name(g, r, bits) / "model.pte").exists()):
            exports[ours_name(g, r, bits)] = export_ours(
                args.preset, args.context, args.max_prefill, g, r, bits, out
            )
    model = load_model(f"random:{args.preset}").materialized().model.eval()
    if not (args.reuse and (out / "theirs.pte").exists()):
        exports["theirs"] = export_theirs(model, args.preset, args.context, out)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(16, model.config.vocab_size, args.prompt_len)]
    feed, ref = reference(model, prompt, args.new_tokens)
    del model
    rows = {}
    programs = [(ours_name(*v), out / ours_name(*v) / "model.pte") for v in variants]
    for name, path in [*programs, ("theirs", out / "theirs.pte")]:
        r = run_program(path, prompt, feed, args.threads)
        p = np.exp(ref)
        kl = (p * (ref - r.pop("logp"))).sum(-1)
        rows[name] = {**r, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), **exports.get(name, {})}
    meta = {"preset": args.preset, "context": args.context, "prompt_len": args.prompt_len}
    meta |= {"max_prefill_ours": args.max_prefill}
    meta |= {"new_tokens": args.new_tokens, "threads": args.threads}
    meta |= {**load, "load_average_end": os.getloadavg()}
    (out / "results.json").write_text(json.dumps({**meta, "results": rows}, indent=2))
    print(
        f"random:{args.preset}, int4 -a8 (8da4w family), {args.threads} threads, {args.prompt_len}-token prompt, context "
        f"{args.context}, {args.new_tokens} new tokens; load average {load['load_average_start']} -> "
        f"{meta['load_average_end']}"
    )
    print(
        "| program | .pte MB | prefill tok/s | decode tok/s | KL mean / max vs fp32 | export s | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        exp = f"{r['export_s']:.0f} | {r['peak_rss_bytes'] / 1e9:.2f}" if "export_s" in r else "- | -"
        print(
            f"| {name} | {r['pte_bytes'] / 1e6:.0f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['kl_mean']:.2e} / {r['kl_max']:.2e} | {exp} |"
        )


if __name__ == "__main__":
    main()
