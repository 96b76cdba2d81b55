"""The ExecuTorch backend's `fp16` recipe: the whole model in float16 on XNNPACK's fp16 kernels, judged against
the canonical model run in fp16 by torch (the `fp16-native` gate).

A whole `tiny` fp16 export lowers for about 85 s on one shared core (measured 2026-11-30), so the exports are
marked slow; the default suite checks the pieces: the recipe's wiring to the simulation and gate, the refusals,
the half-precision copy of the model, and one fp16 block run by the real ExecuTorch runtime on XNNPACK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

from lfm_export.backends.executorch import simulation  # noqa: E402
from lfm_export.backends.executorch.half import half_model  # noqa: E402
from lfm_export.backends.executorch.recipes import ExecuTorchRecipe, make_recipe  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.parity.thresholds import gate_for  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402

CONTEXT, PREFILL = 64, 16


def test_fp16_is_simulated_in_fp16_and_judged_by_the_native_gate() -> None:
    recipe = make_recipe("fp16", max_seq_len=CONTEXT)
    d = recipe.to_dict()
    assert ExecuTorchRecipe.from_dict(d) == recipe
    sim, activations = simulation(d)
    assert (sim.dtype, sim.quantized, activations) == ("fp16", False, "native")
    assert gate_for(sim.name, activations).name == "fp16-native"
    assert simulation(make_recipe("fp32").to_dict())[1] == "float"  # fp32 unchanged


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "bf16"], "no bf16 export"),
        (["--quant", "fp16", "--delegate", "portable"], "use --delegate xnnpack"),
        (["--quant", "fp16", "--embedding-quant", "8"], "--embedding-quant 8 needs a quantized recipe"),
    ],
)
def test_bf16_and_fp16_off_xnnpack_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from lfm_export.cli import app
    from lfm_export.contract.errors import UserError

    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["executorch", "tiny", "-o", str(out), *args])
    assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    assert "\n" not in str(result.exception)
    assert not list(tmp_path.iterdir())


def test_half_model_casts_every_parameter_once_and_leaves_the_model_alone() -> None:
    model = load_model("tiny-moe").model
    half = half_model(model)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert half.lm_head.weight is half.model.embed_tokens.weight  # tied stays tied: one fp16 table
    moe = next(m for m in half.modules() if hasattr(m, "expert_bias"))
    assert moe.expert_bias.dtype == torch.float32  # routing ranks experts in fp32
    w = model.model.layers[0].feed_forward.w1.weight
    assert torch.equal(half.model.layers[0].feed_forward.w1.weight, w.half())


def test_an_fp16_mlp_runs_whole_on_xnnpack_as_torch_computes_it_in_fp16(tmp_path: Path) -> None:
    """The canonical MLP in fp16, swapped as the export swaps it (`half_layers`), lowered to XNNPACK with
    nothing left outside the delegate (the canonical `F.silu` left two casts there): output float16, within
    fp16 rounding of torch's fp16 canonical MLP, and clearly off the fp32 result."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from lfm_export.backends.executorch.half import HalfMLP, half_layers
    from lfm_export.model import MLP
    from lfm_export.trace import apply_swaps

    torch.manual_seed(0)
    mlp32 = MLP(128, 256).eval()
    mlp16 = half_model(mlp32)
    swapped = apply_swaps(nn.Sequential(mlp16), [half_layers])
    assert isinstance(swapped[0], HalfMLP) and swapped[0].w1.weight is mlp16.w1.weight
    x = torch.randn(1, 5, 128).half()
    edge = to_edge_transform_and_lower(torch.export.export(swapped, (x,)), partitioner=[XnnpackPartitioner()])
    left = [
        str(n.target)
        for n in edge.exported_program().graph.nodes
        if n.op == "call_function" and "delegate" not in str(n.target) and "getitem" not in str(n.target)
    ]
    assert not left, left
    pte = tmp_path / "mlp.pte"
    pte.write_bytes(edge.to_executorch().buffer)
    out = Runtime.get().load_program(str(pte)).load_method("forward").execute([x])[0]
    assert out.dtype == torch.float16
    with torch.no_grad():
        ref16 = mlp16(x).float()
        ref32 = mlp32(x.float())
    scale = float(ref32.abs().max())
    assert float((out.float() - ref16).abs().max()) < 4e-3 * scale
    assert float((out.float() - ref32).abs().max()) > 1e-5 * scale  # fp16 is visible


def _export(model: str, out: Path) -> Any:
    torch.set_num_threads(2)
    return export_artifact(
        "executorch",
        model,
        out,
        make_recipe("fp16", max_seq_len=CONTEXT, max_prefill=PREFILL),
        threads=2,
        progress=Progress(quiet=True),
    )


def _other_weights_fail(out: Path, model: str, scale: float) -> dict[str, Any]:
    """`out` checked against `model` with layer 0's (dense) w2 scaled by `scale`: exactness must fail."""
    other = load_model(model)
    with torch.no_grad():
        other.model.model.layers[0].feed_forward.w2.weight.mul_(scale)
    result = check_artifact(out, other, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    summary = result.summary()
    assert not result.passed and not summary["exactness"]["passed"], summary
    return summary


PROMPT = "Once upon a time, there was a little dog named Max. Max liked to run in the big green park"


def _runner_text(folder: Path, new: int = 24) -> str:
    """Greedy text of ExecuTorch's own LLM runner from `folder`'s model.pte."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (custom_sdpa / update_cache)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pieces: list[str] = []
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
    runner.generate(
        PROMPT,
        GenerationConfig(echo=False, max_new_tokens=new, temperature=0.0, num_bos=1),
        token_callback=pieces.append,
    )
    return "".join(pieces)


def _shim_text(folder: Path, new: int = 24) -> str:
    from lfm_export.runtime.executorch import ExecuTorchSession
    from lfm_export.runtime.generate import generate_text
    from lfm_export.runtime.sampler import GenerationConfig
    from lfm_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    ids = tok.encode(PROMPT, add_bos=True)
    text, _ = generate_text(
        ExecuTorchSession(folder, threads=2), tok, ids, GenerationConfig(max_new_tokens=new, do_sample=False)
    )
    return text


@pytest.mark.slow
def test_tiny_fp16_export_is_half_the_size_and_passes_the_native_gate(tmp_path: Path) -> None:
    """Measured 2026-11-30 (context 64): model.pte 3.67 MB against fp32's 7.18 MB; exactness logit max rel
    1.6e-3, pooled median 3.7e-4 (limit 1.5e-3); w2 of layer 0 scaled by 1.05: median 7.6e-3."""
    outcome = _export("tiny", tmp_path / "tiny-fp16")
    m = outcome.manifest
    p = m["parity"]
    assert outcome.passed and p["gate"] == "fp16-native" and p["exactness"]["against"] == "simulated", p
    assert p["quality"]["pooled"]["kl_mean"] < 1e-3
    assert m["recipe"]["dtype"] == "fp16" and m["weights"]["linears"] == "float16"
    assert {s["dtype"] for s in m["signature"]["held"]} == {"float16"}
    # the sizes say the tied table is held twice (gather and lm_head); fp32 stores 4 bytes per value,
    # 7.18 MB for these 1.77 M values (1.01x); fp16 2 bytes (3.66 MB, 1.03x)
    model = load_model("tiny").model
    values = sum(t.numel() for t in model.parameters()) + model.lm_head.weight.numel()
    size = (outcome.out / "model.pte").stat().st_size
    assert 2 * values < size < 1.1 * 2 * values
    from typer.testing import CliRunner

    from lfm_export.cli import app

    r = CliRunner().invoke(
        app, ["bench", str(outcome.out), "--prompt-len", "24", "--new-tokens", "8", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decode_tok_s"] > 0
    assert _runner_text(outcome.out) == _shim_text(outcome.out)  # ExecuTorch's runner reads fp16 logits too
    broken = _other_weights_fail(outcome.out, "tiny", 1.05)
    assert broken["exactness"]["pooled"]["logit_median_rel"] > 1.5e-3


@pytest.mark.slow
def test_tiny_moe_fp16_export_passes_the_native_gate_and_other_weights_fail(tmp_path: Path) -> None:
    outcome = _export("tiny-moe", tmp_path / "tiny-moe-fp16")
    p = outcome.manifest["parity"]
    assert outcome.passed and p["gate"] == "fp16-native", p
    assert outcome.manifest["weights"]["experts"].startswith("sparse form")
    _other_weights_fail(outcome.out, "tiny-moe", 1.05)
