"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), read from the model's
`tokenizer.json` / `tokenizer_config.json`, so llama.cpp tokenizes, detokenizes and renders chats by itself.

Facts from llama.cpp (`src/llama-vocab.cpp`, `convert_hf_to_gguf.py`): a byte-level BPE vocabulary is
`tokenizer.ggml.model = "gpt2"` with the token strings in id order, their types (1 normal, 3 control for the
special added tokens, 4 user-defined for the other added tokens, 5 unused for the `[PAD{id}]` ids that pad the
vocabulary to the model's `vocab_size`: llama.cpp's tokenizer matches a user-defined token's text anywhere in
the input, special or not, so a padding id typed as user-defined would turn the text `[PAD2050]` into id 2050)
and the merges as `"a b"` strings; the
pre-tokenizer is named, not described: `lfm2` selects the LLaMA-3 split regex (and llama.cpp's
`ignore_merges`), which is the one LFM2's tokenizers use. A tokenizer with another split regex is refused
rather than written with a pre-tokenizer that would split text differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UnsupportedError

LFM2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
"""The split regex of LFM2's `tokenizer.json` (and LLaMA-3's), which llama.cpp's `lfm2` pre-tokenizer applies."""
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_vocab(folder: Path, vocab_size: int, chat_template: str | None = None) -> Vocab:
    """The vocabulary of `folder/tokenizer.json` padded to `vocab_size` (`[PAD{id}]` tokens of type unused, as
    llama.cpp's converter pads; an id beyond it is refused), its special tokens and flags from
    `tokenizer_config.json`."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError(
            f"{folder}: no tokenizer.json; a GGUF file carries the tokenizer, so it needs one"
        )
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: a {model.get('type')} tokenizer; the GGUF backend writes BPE ones")
    split = _split_regex(tok.get("pre_tokenizer"))
    if split != LFM2_SPLIT:
        raise UnsupportedError(
            f"{path}: its pre-tokenizer is not LFM2's byte-level split (llama.cpp's `lfm2`); llama.cpp would "
            "tokenize differently"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise UnsupportedError(f"{path}: token id {size - 1} is outside the model's vocab_size {vocab_size}")
    size = vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config = _config(folder)

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        bos=token_id("bos_token"),
        eos=token_id("eos_token"),
        pad=token_id("pad_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=chat_template or _template(folder, config),
    )


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _split_regex(pre: dict[str, Any] | None) -> str | None:
    """The regex of the `Split` step of a `Sequence` [Split, ByteLevel(use_regex false)] pre-tokenizer."""
    if not pre or pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True):
        return None
    return (steps[0].get("pattern") or {}).get("Regex")


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """The `tokenizer.*` keys on a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("lfm2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id)):
        if value is not None:
            add(value)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
