"""The model card: rendered from a manifest for every registered backend, with Hugging Face front matter."""

import copy

import pytest
import yaml

from lfm_export.backends import all_backends
from lfm_export.card import render_card, write_card
from lfm_export.manifest import file_entries

MANIFEST = {
    "schema_version": 1,
    "created": "2026-12-07T03:31:42+00:00",
    "tool": {"name": "lfm-export", "versions": {"lfm-export": "0.1.0"}},
    "model": {
        "source": "tiny",
        "name": "tiny",
        "random_weights": False,
        "model_type": "lfm2",
        "weights_dtype": "float32",
        "config_sha256": "c5c8" * 16,
        "weights_sha256": "7a73" * 16,
    },
    "backend": "?",
    "recipe": {"name": "int4-b32", "bits": 4, "block_size": 32, "keep_float": ["norms", "rotary tables"]},
    "max_seq_len": 128,
    "files": [
        {"path": "model.bin", "bytes": 1000, "sha256": "ab" * 32},
        {"path": "parity/parity.json", "bytes": 20, "sha256": "cd" * 32},
    ],
    "total_bytes": 1020,
    "parity": {
        "passed": False,
        "verdict": "FAILED: exactness passed; quality FAILED (gate int4)",
        "scenarios": {"prefill": "ok", "decode": "ok"},
        "exactness": {"passed": True, "against": "simulated", "gate": "int4", "pooled": {"kl_mean": 2.5e-5}},
        "quality": {
            "passed": False,
            "against": "reference",
            "gate": "int4",
            "pooled": {"kl_mean": 0.0427, "top1_agreement": 0.8834, "top1_decisive": 0.9868},
        },
        "failures": ["quality: pooled: kl_mean = 4.27e-02 (limit <= 1.00e-02) FAIL"],
    },
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.mark.unit
@pytest.mark.parametrize("backend", sorted(all_backends()))
def test_card_renders_for_every_backend(backend):
    record = all_backends()[backend]
    manifest = copy.deepcopy(MANIFEST)
    manifest["backend"] = backend
    card = render_card(manifest, folder_name="out/art")
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == record.runner.library
    assert {"lfm2", backend, "int4-b32"} <= set(meta["tags"])
    assert meta["lfm_export"] == {
        "backend": backend,
        "recipe": "int4-b32",
        "source": "tiny",
        "weights_sha256": "7a73" * 16,
        "parity": "failed",
        "total_bytes": 1020,
    }
    assert "7a73" * 16 in card and "c5c8" * 16 in card  # the source's hashes
    assert "| quality | reference | int4 | NO | 4.27e-02 | - | 0.8834 | 0.9868 |" in card
    assert "quality: pooled: kl_mean = 4.27e-02 (limit <= 1.00e-02) FAIL" in card
    assert "1020 bytes" not in card and "0.00 MB in 2 files" in card
    assert f"With {record.runner.name}:" in card
    assert '"out/art' in card and "{folder}" not in card  # the runner's snippet names the folder
    if record.session is not None:
        assert "lfm-export run out/art --prompt" in card


@pytest.mark.unit
def test_card_of_random_weights_and_no_parity_says_so(tmp_path):
    manifest = copy.deepcopy(MANIFEST)
    manifest.update(backend="onnx", parity={"status": "not run"})
    manifest["model"].update(random_weights=True, weights_sha256=None, source="random:lfm2-350m")
    card = render_card(manifest)
    assert "RANDOM WEIGHTS" in card and "Parity was not run" in card
    assert _front_matter(card)["lfm_export"]["parity"] == "not run"


@pytest.mark.unit
def test_card_is_not_listed_in_the_manifest(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    manifest = copy.deepcopy(MANIFEST)
    manifest["backend"] = "onnx"
    write_card(tmp_path, manifest)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README.md").write_text("a file of the model's own")
    assert (tmp_path / "README.md").read_text() == render_card(manifest, folder_name=tmp_path.name)
    assert [f["path"] for f in file_entries(tmp_path)] == ["model.bin", "sub/README.md"]
