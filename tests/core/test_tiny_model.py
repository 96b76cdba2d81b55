"""The bundled trained models `tiny` and `tiny-moe`: architecture, tokenizer, chat template and a quality floor.

Quantization parity checks compare output distributions, which only means something when the model has
peaked, meaningful ones; these tests pin that the bundled models do (on held-out text from the corpus
generator, `examples/make_corpus.py`).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lfm_export.config import LAYER_CONV
from lfm_export.loading import BUNDLED, LoadedModel, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import make_corpus  # noqa: E402

MODELS = ("tiny", "tiny-moe")
SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]  # fmt: skip
MAX_FOLDER_BYTES = 10_000_000
N_HELDOUT_DOCS = 60


@cache
def _model(name: str) -> LoadedModel:
    torch.set_num_threads(2)
    return load_model(name)


@cache
def _tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_file(str(BUNDLED[name] / "tokenizer.json"))


@cache
def _corpus() -> tuple[list[str], list[str]]:
    return make_corpus.splits(make_corpus.N_TRAIN, N_HELDOUT_DOCS)


def _render(template: str, **kw: object) -> str:
    """Render like transformers does (sandboxed, `tojson` without key sorting or HTML escaping)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(template).render(bos_token="<|startoftext|>", **kw)


@torch.no_grad()
def _greedy(lm: LoadedModel, ids: list[int], n: int) -> list[int]:
    model = lm.model
    logits, conv, keys, values = model(torch.tensor([ids]), *model.empty_state(1))
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in (2, 7):
            break
        logits, conv, keys, values = model(torch.tensor([[nxt]]), conv, keys, values)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_architecture(name: str) -> None:
    lm = _model(name)
    cfg = lm.config
    types = cfg.layer_types
    assert not lm.random and lm.weights_dtype == "float32"
    assert types[0] == LAYER_CONV, "attention must not be the first layer"
    attn = cfg.attn_layers
    assert len(attn) >= 2 and len(cfg.conv_layers) >= 2
    assert any(types[i + 1] == LAYER_CONV for i in attn if i + 1 < len(types)), (
        "conv and attention interleaved"
    )
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size % 128 == 0 and cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0
    assert cfg.tie_word_embeddings and lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 7, 0)
    if name == "tiny-moe":
        assert cfg.model_type == "lfm2_moe" and cfg.num_dense_layers in (1, 2)
        assert cfg.num_experts_per_tok < cfg.num_experts and cfg.moe_intermediate_size % 128 == 0
        assert cfg.use_expert_bias
        biases = [b for n, b in lm.model.named_buffers() if n.endswith("expert_bias")]
        assert len(biases) == cfg.num_hidden_layers - cfg.num_dense_layers
        assert all(b.dtype == torch.float32 for b in biases)
    else:
        assert cfg.model_type == "lfm2"


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_special_tokens(name: str) -> None:
    tok = _tokenizer(name)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, t
    assert tok.get_vocab_size() == _model(name).config.vocab_size
    assert tok.encode("Hello").ids[0] == 1, "like LFM2, plain encoding prepends <|startoftext|>"
    text = "<|startoftext|><|im_start|>user\nWhat does a cow say?<|im_end|>\n"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.ids[:2] == [1, 6] and 7 in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("name", MODELS)
def test_config_files(name: str) -> None:
    folder = BUNDLED[name]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, [7, 2], 0)
    assert gen["do_sample"] is True and 0 < gen["temperature"] <= 1
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == (
        "<|startoftext|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert not (folder / "chat_template.jinja").exists()
    assert _model(name).generation_config == gen


@pytest.mark.parametrize("name", MODELS)
def test_chat_template(name: str) -> None:
    template = _model(name).chat_template
    assert template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What does a cow say?"},
    ]
    assert _render(template, messages=messages, add_generation_prompt=True) == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat does a cow say?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert _render(template, messages=messages[1:2]) == "<|startoftext|><|im_start|>user\nHi!<|im_end|>\n"
    tool = {"name": "f", "parameters": {}}
    tooled = [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]
    assert _render(template, messages=tooled, tools=[tool]) == (
        '<|startoftext|><|im_start|>system\nList of tools: <|tool_list_start|>[{"name": "f", "parameters": {}}]'
        "<|tool_list_end|><|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>1<|tool_response_end|><|im_end|>\n"
    )
    # the corpus's chat documents are exactly what the template renders
    r = random.Random(make_corpus.HELDOUT_SEED)
    for _ in range(200):
        msgs, tools = make_corpus.chat_messages(r)
        assert _render(template, messages=msgs, tools=tools) == make_corpus.render_chat(msgs, tools)


@pytest.mark.parametrize("name", MODELS)
def test_quality_floor_on_heldout(name: str) -> None:
    """Peaked and mostly right next-token distributions on held-out text (median over every position)."""
    lm, tok = _model(name), _tokenizer(name)
    _, heldout = _corpus()
    top1: list[float] = []
    correct = total = 0
    with torch.no_grad():
        for doc in heldout:
            ids = tok.encode(doc, add_special_tokens=False).ids
            logits, *_ = lm.model(torch.tensor([ids[:-1]]), *lm.model.empty_state(1))
            p, arg = torch.softmax(logits[0], -1).max(-1)
            top1 += p.tolist()
            correct += int((arg == torch.tensor(ids[1:])).sum())
            total += len(ids) - 1
    assert statistics.median(top1) >= 0.3
    assert correct / total >= 0.6


@pytest.mark.parametrize("name", MODELS)
def test_greedy_text_is_corpus_like(name: str) -> None:
    lm, tok = _model(name), _tokenizer(name)
    train, _ = _corpus()
    vocab = make_corpus.vocabulary(train)
    story = _greedy(
        lm, tok.encode("<|startoftext|>Once upon a time, there was", add_special_tokens=False).ids, 60
    )
    words = make_corpus.words(tok.decode(story))
    assert len(words) >= 20
    assert sum(w in vocab for w in words) / len(words) >= 0.8, words
    prompt = make_corpus.render_chat([{"role": "user", "content": "Hello!"}], add_generation_prompt=True)
    answer = _greedy(lm, tok.encode(prompt, add_special_tokens=False).ids, 40)
    assert answer[-1] == 7, "the chat answer ends with <|im_end|>"
    words = make_corpus.words(tok.decode(answer))
    assert words and all(w in vocab for w in words), words


def test_moe_router_uses_every_expert() -> None:
    lm, tok = _model("tiny-moe"), _tokenizer("tiny-moe")
    cfg = lm.config
    _, heldout = _corpus()
    moes = [layer.feed_forward for layer in lm.model.model.layers[cfg.num_dense_layers :]]
    counts = [torch.zeros(cfg.num_experts) for _ in moes]

    def counter(c: torch.Tensor):
        def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            c.add_((mod.routing(args[0].flatten(0, 1)) > 0).sum(0))

        return hook

    hooks = [m.register_forward_hook(counter(c)) for m, c in zip(moes, counts, strict=True)]
    try:
        with torch.no_grad():
            for doc in heldout[:20]:
                ids = tok.encode(doc, add_special_tokens=False).ids
                lm.model(torch.tensor([ids]), *lm.model.empty_state(1))
    finally:
        for h in hooks:
            h.remove()
    for c in counts:
        share = c / c.sum()
        assert share.min() >= 0.02 and share.max() <= 0.5, share


@pytest.mark.parametrize("name", MODELS)
def test_asset_folder_size(name: str) -> None:
    size = sum(f.stat().st_size for f in BUNDLED[name].rglob("*") if f.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{name}: {size / 1e6:.2f} MB"
