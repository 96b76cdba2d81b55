"""`lfm-export` command line. Results go to stdout (`--json` for machines), progress to stderr.

Exit codes: 0 success / parity passed, 1 parity or check failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm_export.errors import UserError

app = typer.Typer(
    name="lfm-export",
    help="Export, quantize and parity-check Liquid AI LFM2 / LFM2.5 models for edge runtimes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"verbose": False}

ModelArg = Annotated[
    str, typer.Argument(help="Checkpoint folder, a bundled model (tiny, tiny-moe) or random:PRESET.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch / the runtime.")]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["verbose"] = verbose


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _prompt_ids(loaded: Any, text: str) -> list[int]:
    """Token ids of `text` with the model's tokenizer; seeded pseudo-random ids when it has none."""
    if loaded.tokenizer_file is not None:
        from lfm_export.runtime.tokenizer import Tokenizer

        return Tokenizer.from_folder(loaded.path).encode(text, add_bos=True)
    import numpy as np

    rng = np.random.default_rng(0)
    return [loaded.config.bos_token_id, *rng.integers(16, loaded.config.vocab_size, size=15).tolist()]


# ---- presets ----------------------------------------------------------------------------------------
@app.command()
def presets(as_json: JsonOpt = False) -> None:
    """List the built-in architectures (use as random:NAME) with parameter counts computed from the config."""
    from lfm_export.presets import PRESETS

    rows = []
    for p in PRESETS.values():
        c = p.config
        rows.append(
            {
                "name": p.name,
                "params": p.params,
                "active_params": p.active_params,
                "published": p.published_label,
                "published_params": p.published_params,
                "model_type": c.model_type,
                "hidden_size": c.hidden_size,
                "layers": c.num_hidden_layers,
                "attention_layers": c.attn_layers,
                "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads,
                "ffn": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "experts": f"{c.num_experts} x {c.moe_intermediate_size}, top-{c.num_experts_per_tok}"
                if c.is_moe
                else "",
                "unconfirmed": list(p.unconfirmed),
                "aliases": list(p.aliases),
                "notes": p.notes,
            }
        )
    if as_json:
        _emit(rows, True, "")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        "preset",
        "params",
        "active",
        "published",
        "layers (attn idx)",
        "heads/kv",
        "ffn",
        "vocab",
        "unconfirmed",
    )
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['params']:,}",
            f"{r['active_params']:,}",
            r["published"],
            f"{r['layers']} ({','.join(map(str, r['attention_layers']))})",
            f"{r['heads']}/{r['kv_heads']}",
            r["experts"] or str(r["ffn"]),
            str(r["vocab_size"]),
            ", ".join(r["unconfirmed"]) or "-",
        )
    Console().print(t)


# ---- check ------------------------------------------------------------------------------------------------
@app.command()
def check(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Prompt text (tokenized with the model's tokenizer).")] = (
        "Once upon a time, a little fox lived in the forest."
    ),
    steps: Annotated[int, typer.Option(help="Greedy decode steps with state carried.")] = 32,
    tolerance: Annotated[float, typer.Option(help="Max abs logit error allowed.")] = 1e-4,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Compare the canonical model with transformers' Lfm2ForCausalLM / Lfm2MoeForCausalLM on MODEL (fp32)."""
    from lfm_export.check import run_check
    from lfm_export.loading import load_model
    from lfm_export.progress import Progress

    _threads(threads)
    progress = Progress(quiet=as_json)
    with progress.step(f"Loading {model}"):
        loaded = load_model(model)
    with progress.step("Running canonical model and transformers"):
        result = run_check(loaded, _prompt_ids(loaded, prompt), steps, tolerance)
    verdict = "PASS" if result.passed else "FAIL"
    parts = ", ".join(f"{k} {v:.2e}" for k, v in result.parts.items())
    _emit(
        result.to_dict(),
        as_json,
        f"{verdict}: max abs logit error {result.max_abs_error:.3e} (tolerance {tolerance:g}; {parts}); "
        f"greedy tokens {'match' if result.greedy_match else 'DIFFER'}",
    )
    raise typer.Exit(0 if result.passed else 1)


# ---- generate -------------------------------------------------------------------------------------------
@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user turn with the chat template.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    greedy: Annotated[
        bool, typer.Option(help="Greedy decoding instead of generation_config.json sampling.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: ThreadsOpt = 2,
) -> None:
    """Stream text from the reference (PyTorch) model."""
    from lfm_export.loading import load_model
    from lfm_export.parity.reference import ReferenceSession

    _threads(threads)
    loaded = load_model(model)
    if loaded.path is None or loaded.tokenizer_file is None:
        raise UserError(f"{model} has no tokenizer.json; generate needs one")
    session = ReferenceSession(loaded.model, max_seq_len=loaded.config.max_position_embeddings)
    _stream(session, loaded.path, prompt, chat, max_new_tokens, greedy, seed)


def _stream(
    session: Any, folder: Path, prompt: str, chat: bool, max_new: int, greedy: bool, seed: int
) -> None:
    from lfm_export.runtime.generate import stream_generate
    from lfm_export.runtime.sampler import GenerationConfig
    from lfm_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    cfg = GenerationConfig.from_folder(folder).replace(
        max_new_tokens=max_new, do_sample=False if greedy else None
    )
    if chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
    else:
        ids = tok.encode(prompt, add_bos=True)
        typer.echo(prompt, nl=False)
    for piece in stream_generate(session, tok, ids, cfg, seed=seed):
        typer.echo(piece, nl=False)
        sys.stdout.flush()
    typer.echo()


# ---- export: onnx ------------------------------------------------------------------------------------------
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output artifact folder (must not exist unless --force).")
]


def _report_export(outcome: Any, as_json: bool) -> None:
    m = outcome.manifest
    p = m.get("parity", {})
    data = {
        "out": str(outcome.out),
        "backend": m["backend"],
        "recipe": m["recipe"],
        "total_bytes": m["total_bytes"],
        "ops": m.get("ops"),
        "parity": p,
        "timings_s": m.get("timings_s"),
    }
    text = [f"wrote {outcome.out} ({m['total_bytes'] / 1e6:.2f} MB, {m['recipe'].get('name')})"]
    if outcome.parity is not None:
        text.append(outcome.parity.verdict_line())
        text.append(f"reports: {outcome.out}/parity/parity.md, parity.json")
    _emit(data, as_json, "\n".join(text))
    if outcome.passed is False:
        raise typer.Exit(1)


@app.command()
def onnx(
    model: ModelArg,
    out: OutOpt,
    quant: Annotated[str, typer.Option(help="fp32 | fp16 | int8 | int4")] = "fp32",
    block_size: Annotated[int, typer.Option(help="Quantization block size: 32 | 64 | 128.")] = 32,
    ops: Annotated[
        str, typer.Option(help="ort (onnxruntime contrib ops) | portable (standard ONNX ops only).")
    ] = "ort",
    asymmetric: Annotated[bool, typer.Option(help="Asymmetric (zero-point) int quantization.")] = False,
    accuracy_level: Annotated[
        int, typer.Option(help="MatMulNBits accuracy_level (0-4; 4 = int8 compute).")
    ] = 4,
    max_seq_len: Annotated[
        int, typer.Option(help="Context the artifact declares (defaults to the model's).")
    ] = 0,
    no_parity: Annotated[
        bool, typer.Option("--no-parity", help="Skip the parity gate after export.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL to ONNX (onnxruntime-genai compatible folder), then check parity through the ONNX runtime shim."""
    from lfm_export.backends.onnx.recipes import make_recipe
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    recipe = make_recipe(
        quant=quant,
        block_size=block_size,
        ops=ops,
        symmetric=not asymmetric,
        accuracy_level=accuracy_level,
        max_seq_len=max_seq_len or None,
    )
    _threads(threads)
    outcome = export_artifact(
        "onnx",
        model,
        out,
        recipe,
        force=force,
        parity=not no_parity,
        threads=threads,
        progress=Progress(quiet=as_json),
    )
    _report_export(outcome, as_json)


# ---- artifact commands -------------------------------------------------------------------------------------
ArtifactArg = Annotated[Path, typer.Argument(help="An artifact folder written by lfm-export.")]


@app.command()
def parity(
    artifact: ArtifactArg,
    model: Annotated[
        str, typer.Option(help="Reference model (defaults to the one recorded in the manifest).")
    ] = "",
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Re-check an artifact's numerical parity against the fp32 reference model; exit 1 if the gate fails."""
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    loaded = load_model(model) if model else None
    result = check_artifact(artifact, loaded, threads=threads, progress=Progress(quiet=as_json))
    _emit(
        result.to_json(),
        as_json,
        result.verdict_line() + f"\nreports: {artifact}/parity/parity.md, parity.json",
    )
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def run(
    artifact: ArtifactArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user turn with the chat template.")
    ] = False,
    greedy: Annotated[
        bool, typer.Option(help="Greedy decoding instead of generation_config.json sampling.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: ThreadsOpt = 2,
) -> None:
    """Stream text from an artifact through its runtime shim (no PyTorch needed for ONNX)."""
    from lfm_export.pipeline import open_session

    if not (artifact / "tokenizer.json").is_file():
        raise UserError(f"{artifact} has no tokenizer.json; run needs one")
    _stream(open_session(artifact, threads=threads), artifact, prompt, chat, max_new_tokens, greedy, seed)


@app.command()
def bench(
    artifact: ArtifactArg,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens to prefill.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode.")] = 128,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Measure load time, prefill and decode tokens/s, peak RSS and size of an artifact."""
    from lfm_export.bench import bench_artifact

    r = bench_artifact(artifact, prompt_len, new_tokens, threads)
    _emit(
        r,
        as_json,
        (
            f"{r['backend']} {r['recipe']}: load {r['load_s']:.2f}s, prefill {r['prefill_tok_s']:.1f} tok/s "
            f"({prompt_len} tokens), decode {r['decode_tok_s']:.1f} tok/s ({new_tokens} tokens), "
            f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, size {(r['artifact_bytes'] or 0) / 1e6:.1f} MB, "
            f"{threads} threads"
        ),
    )


# ---- inspect ---------------------------------------------------------------------------------------------
@app.command()
def inspect(
    target: Annotated[
        str, typer.Argument(help="An artifact folder, or a model (folder, tiny, random:PRESET).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Show an artifact's manifest and I/O signature, or a model's config and I/O signature."""
    from lfm_export.signature import IOSignature, build_signature

    path = Path(target)
    if (path / "manifest.json").is_file():
        from lfm_export.manifest import read_manifest

        manifest = read_manifest(path)
        sig = IOSignature.from_dict(manifest["signature"])
        info = manifest
    else:
        from lfm_export.config import Lfm2Config
        from lfm_export.loading import BUNDLED
        from lfm_export.presets import get_preset

        if target.startswith("random:"):
            cfg = get_preset(target.split(":", 1)[1]).config
        else:
            folder = BUNDLED.get(target, path)
            if not folder.is_dir():
                raise UserError(
                    f"{target}: not an artifact folder, a model folder, a bundled model or random:PRESET"
                )
            cfg = Lfm2Config.from_file(folder / "config.json")
        sig = build_signature(cfg)
        info = {"model": target, "config": cfg.to_dict(), "signature": sig.to_dict()}
    if as_json:
        _emit(info, True, "")
        return
    lines = []
    if "backend" in info:
        m = info["model"]
        lines += [
            f"artifact  {path}",
            f"backend   {info['backend']}  recipe {info['recipe'].get('name', info['recipe'])}",
            f"model     {m.get('source')}{'  (RANDOM WEIGHTS)' if m.get('random_weights') else ''}",
            f"parity    {_parity_line(info.get('parity', {}))}",
            f"size      {info.get('total_bytes', 0) / 1e6:.2f} MB in {len(info.get('files', []))} files",
        ]
        if info.get("ops"):
            lines.append("ops       " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    else:
        c = info["config"]
        lines.append(
            f"model     {target}: {c['model_type']}, hidden {c['hidden_size']}, {len(c['layer_types'])} layers, "
            f"vocab {c['vocab_size']}"
        )
    lines.append(
        f"signature ({sig.form} KV{', max_seq_len ' + str(sig.max_seq_len) if sig.max_seq_len else ''})"
    )
    for direction, specs in (("in ", sig.inputs), ("out", sig.outputs)):
        for s in specs:
            lines.append(f"  {direction} {s.name:<28} {s.dtype:<8} [{', '.join(map(str, s.shape))}]")
    typer.echo("\n".join(lines))


def _parity_line(p: dict[str, Any]) -> str:
    if "passed" not in p:
        return p.get("status", "not run")
    return f"{'PASSED' if p['passed'] else 'FAILED'} ({p.get('recipe', '')})"


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (usage errors: typer's own)."""
    try:
        app()
    except UserError as e:
        if _state["verbose"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line unless --verbose
        if _state["verbose"]:
            traceback.print_exc()
        typer.echo(
            f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
