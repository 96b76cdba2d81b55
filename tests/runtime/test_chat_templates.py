"""Chat templates rendered by the runtime's `Tokenizer` (jinja2, no transformers) against transformers'
`apply_chat_template` on the same tokenizer.json: the same text and the same token ids, for the bundled models'
templates and the LFM2 / LFM2.5 templates written from the model cards (tests/fixtures/chat_templates)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from lfm_export.loading import ASSETS
from lfm_export.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
TOOL = {
    "name": "get_candidate_status",
    "description": "Retrieves the current status of a candidate in the recruitment process",
    "parameters": {
        "type": "object",
        "properties": {
            "candidate_id": {"type": "string", "description": "Unique identifier for the candidate"}
        },
        "required": ["candidate_id"],
    },
}
CALL = '<|tool_call_start|>[get_candidate_status(candidate_id="12345")]<|tool_call_end|>Checking the status.'
RESULT = {"candidate_id": "12345", "status": "Interview Scheduled"}
CONVERSATIONS = {
    "system": (
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}],
        None,
    ),
    "multi_turn": (
        [
            {"role": "user", "content": "Hi, I am Ana."},
            {"role": "assistant", "content": "Hello Ana! \u00bfQu\u00e9 tal?"},
            {"role": "user", "content": "What did I say? \U0001f389"},
        ],
        None,
    ),
    "tools": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the current status of candidate ID 12345?"},
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": json.dumps(RESULT)},
        ],
        [TOOL],
    ),
    "tools_no_system": (
        [{"role": "user", "content": "Status of 7?"}],
        [TOOL, {"name": "noop", "parameters": {"type": "object", "properties": {}}}],
    ),
    "think": (
        [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "<think>Two and two make four.</think>\n4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "<think>Three and three.</think>\n6"},
        ],
        None,
    ),
}


def templates() -> dict[str, str]:
    out = {p.stem: p.read_text() for p in sorted(FIXTURES.glob("*.jinja"))}
    for model in ("tiny", "tiny-moe"):
        out[model] = json.loads(((ASSETS / model) / "tokenizer_config.json").read_text())["chat_template"]
    return out


TEMPLATES = templates()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, object]]:
    """Per template: our Tokenizer over a folder holding tiny's tokenizer.json and the template, and
    transformers' fast tokenizer over the same file."""
    root = tmp_path_factory.mktemp("templates")
    tiny = ASSETS / "tiny"
    out = {}
    for name, source in TEMPLATES.items():
        folder = root / name
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
        cfg = json.loads((tiny / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "chat_template.jinja").write_text(source)
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token=cfg["bos_token"],
            eos_token=cfg["eos_token"],
            pad_token=cfg["pad_token"],
        )
        hf.chat_template = source
        out[name] = (Tokenizer.from_folder(folder), hf)
    return out


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_rendering_equals_transformers_token_for_token(tokenizers, template: str, conversation: str) -> None:
    ours, hf = tokenizers[template]
    messages, tools = CONVERSATIONS[conversation]
    for generation_prompt in (True, False):
        want_text = hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )
        want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt)
        want_ids = list(want["input_ids"] if isinstance(want, Mapping) else want)
        assert ours.apply_chat_template(messages, generation_prompt, tools) == want_text
        assert ours.encode_chat(messages, generation_prompt, tools) == want_ids
    assert want_text.startswith("<|startoftext|>") and want_ids.count(ours.bos_token_id) == 1


def test_the_fixtures_render_the_cards_examples(tokenizers) -> None:
    """The model cards' tool-use examples, as the fixtures render them."""
    messages, tools = CONVERSATIONS["tools"]
    lfm2 = tokenizers["lfm2"][0].apply_chat_template(messages, True, tools)
    assert "List of tools: <|tool_list_start|>[" + json.dumps(TOOL) + "]<|tool_list_end|><|im_end|>" in lfm2
    assert "<|im_start|>tool\n<|tool_response_start|>" + json.dumps(RESULT) + "<|tool_response_end|>" in lfm2
    lfm25 = tokenizers["lfm2.5"][0].apply_chat_template(messages, True, tools)
    assert "Be brief.\nList of tools: [" + json.dumps(TOOL) + "]<|im_end|>" in lfm25
    assert "<|im_start|>tool\n" + json.dumps(RESULT) + "<|im_end|>" in lfm25
    think = tokenizers["lfm2.5"][0].apply_chat_template(CONVERSATIONS["think"][0], False)
    assert "Two and two" not in think and "<|im_start|>assistant\n4<|im_end|>" in think
    assert "<think>Three and three.</think>\n6" in think


@pytest.mark.unit
def test_the_template_source_is_recorded_and_the_fallback_is_hashed(tmp_path: Path) -> None:
    from lfm_export.runtime.tokenizer import LFM2_CHAT_TEMPLATE, chat_template_entry, template_sha256

    (tmp_path / "tokenizer.json").write_bytes((ASSETS / "tiny" / "tokenizer.json").read_bytes())
    assert chat_template_entry(tmp_path) == {
        "source": "fallback",
        "sha256": template_sha256(LFM2_CHAT_TEMPLATE),
    }
    assert Tokenizer.from_folder(tmp_path).template_source == "fallback"
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["lfm2"])
    entry = chat_template_entry(tmp_path)
    assert entry["source"] == "chat_template.jinja" and entry["sha256"] == template_sha256(TEMPLATES["lfm2"])
    assert chat_template_entry(tmp_path / "missing") == {"source": None}
