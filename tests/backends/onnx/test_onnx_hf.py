"""`lfm-export onnx` on checkpoints transformers wrote itself (not in this repo), as a new user would run it:
export at fp32 and int4, `lfm-export parity OUT --json` passes, and onnxruntime-genai's greedy tokens on the
fp32 folder equal transformers' own greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

CONTEXT = "128"  # keeps the near_max_seq_len parity scenario short


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "name,quant",
    [
        # fp32 of the two odd layouts is in `make test-slow`: the default suite keeps one dense and one MoE
        # checkpoint (int4, which runs the same loading and export path plus the quantizer)
        pytest.param("dense_odd", "fp32", marks=pytest.mark.slow),
        ("dense_attn_first_hd32", "int4"),
        pytest.param("moe_dense_first", "fp32", marks=pytest.mark.slow),
        # MoE in the default suite: test_parity_gates (hf-moe), the genai greedy test
        pytest.param("moe_b32", "int4", marks=pytest.mark.slow),
    ],
)
def test_export_and_parity_on_transformers_checkpoints(hf_checkpoints, tmp_path: Path, name: str, quant: str):
    out = tmp_path / name
    r = cli(
        "onnx",
        str(hf_checkpoints[name]),
        "-o",
        str(out),
        "--quant",
        quant,
        "--max-seq-len",
        CONTEXT,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["parity"]
    assert summary["passed"] is True and summary["exactness"]["passed"] and summary["quality"]["passed"]
    assert summary["exactness"]["against"] == ("reference" if quant == "fp32" else "simulated")
    md = (out / "parity" / "parity.md").read_text()
    assert f"- artifact: {name}\n" in md and ".tmp-" not in md  # the final folder, not the temporary one
    r = cli("parity", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is True
    ran = {s["name"] for s in report["scenarios"] if s["status"] == "ok"}
    assert {"prefill", "decode", "chunked_prefill", "batch2", "near_max_seq_len", "pooled"} <= ran


def test_genai_greedy_equals_transformers_greedy(tmp_path: Path):
    """A checkpoint transformers writes here with larger random weights (initializer_range 0.1): at the
    default 0.02 a random LFM2 greedily repeats its last token, which would prove little."""
    og = pytest.importorskip("onnxruntime_genai")
    import transformers
    from conftest import HF_SHAPES, genai_greedy

    torch.manual_seed(0)
    kwargs = dict(HF_SHAPES["dense_odd"][0], initializer_range=0.1)
    hf = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(**kwargs)).eval()
    folder = tmp_path / "ckpt"
    hf.save_pretrained(folder)
    out = tmp_path / "genai"
    r = cli("onnx", str(folder), "-o", str(out), "--max-seq-len", CONTEXT, "--no-parity", "--no-card")
    assert r.returncode == 0, r.stderr
    assert not (out / "README.md").exists()  # --no-card

    prompt, new = [1, 17, 42, 99, 3, 250, 7, 8], 16
    with torch.no_grad():
        ids = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            pad_token_id=0,
        )
    want = ids[0, len(prompt) :].tolist()

    got = genai_greedy(og, out, prompt, new)
    assert got == want
    assert len(want) >= 8 and len(set(want)) > 4  # a real sequence, not one token repeated
