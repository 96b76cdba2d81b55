"""Tokenizer for the runtime: `tokenizers` (tokenizer.json) plus special tokens, streaming detokenization and
the chat template, with no dependency on transformers or torch."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError

LFM2_CHAT_TEMPLATE = """\
{%- set ns = namespace(system="", tools=[]) -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set ns.system = messages[0]["content"] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- for tool in tools -%}
        {%- set ns.tools = ns.tools + [tool if tool is string else tool | tojson] -%}
    {%- endfor -%}
    {%- set listing = "List of tools: <|tool_list_start|>[" + ns.tools | join(", ") + "]<|tool_list_end|>" -%}
    {%- set ns.system = (ns.system + "\\n" if ns.system else "") + listing -%}
{%- endif -%}
{{- bos_token if bos_token else "<|startoftext|>" -}}
{%- if ns.system -%}
    {{- "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set content = message["content"] if message["content"] is string else message["content"] | tojson -%}
    {{- "<|im_start|>" + message["role"] + "\\n" + content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""
"""LFM2's ChatML-like template (LFM2 model card format), the last resort when a folder ships no template of its
own: `Tokenizer.template_source` is then "fallback" and an export's manifest records it (`chat_template`),
with this text's sha256. Tools are listed in the system turn between `<|tool_list_start|>` /
`<|tool_list_end|>`; a tool turn's content is not wrapped (a model's own template may differ: prefer it)."""

FALLBACK = "fallback"


def template_sha256(source: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()


def chat_template_entry(folder: str | Path) -> dict[str, Any]:
    """What the runtime renders chats with for the artifact `folder`: `source` ("chat_template.jinja",
    "tokenizer_config.json", "fallback", or None without a tokenizer) and the template's sha256."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return {"source": None}
    tcfg = _read_json(folder / "tokenizer_config.json")
    text, source = _read_template(folder, tcfg)
    if text is None:
        text, source = LFM2_CHAT_TEMPLATE, FALLBACK
    return {"source": source, "sha256": template_sha256(text)}


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

    `eos_token_ids` is the union of every end-of-sequence id the folder declares (generation_config.json,
    tokenizer_config.json, config.json): generation stops at any of them.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        pad_token: str | None = None,
        add_bos_token: bool = True,
        chat_template: str | None = None,
        template_source: str = "given",
    ) -> None:
        self._tok = tokenizer
        self.bos_token = bos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        ids = list(eos_token_ids)
        for tok in eos_tokens:
            tid = tokenizer.token_to_id(tok)
            if tid is not None:
                ids.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.eos_token = next(iter(eos_tokens), None) or (
            tokenizer.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        )
        self.pad_token = pad_token
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.chat_template = chat_template
        self.template_source = template_source if chat_template else FALLBACK
        """Where `chat_template` came from; "fallback" when the folder has none (`LFM2_CHAT_TEMPLATE`)."""
        self._compiled: Any = None

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` and the special tokens / template from the configs beside it."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise UserError(f"{folder}: no tokenizer.json")
        from tokenizers import Tokenizer as HfTokenizer

        try:
            tok = HfTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{tok_file}: cannot be read by tokenizers ({e})") from None
        tcfg = {
            **_read_json(folder / "special_tokens_map.json"),
            **_read_json(folder / "tokenizer_config.json"),
        }
        gen = _read_json(folder / "generation_config.json")
        mcfg = _read_json(folder / "config.json")

        bos = _token_str(tcfg.get("bos_token"))
        if bos is None:
            bos_id = gen.get("bos_token_id", mcfg.get("bos_token_id"))
            bos = tok.id_to_token(bos_id) if isinstance(bos_id, int) else None
        eos_ids = _id_list(gen.get("eos_token_id")) + _id_list(mcfg.get("eos_token_id"))
        eos_tok = _token_str(tcfg.get("eos_token"))
        template, source = _read_template(folder, tcfg)
        return cls(
            tok,
            bos_token=bos,
            eos_tokens=[eos_tok] if eos_tok else [],
            eos_token_ids=eos_ids,
            pad_token=_token_str(tcfg.get("pad_token")),
            add_bos_token=bool(tcfg.get("add_bos_token", True)),
            chat_template=template,
            template_source=source or FALLBACK,
        )

    # ---- basics ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def backend(self) -> Any:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it (`<|im_start|>`) become their ids.

        `add_bos`: True makes the ids start with bos (never doubled: chat-template output already has it),
        False adds nothing, None follows tokenizer_config.json's `add_bos_token` (default True).
        """
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        want = self.add_bos_token if add_bos is None else add_bos
        if want and self.bos_token_id is not None and not (ids and ids[0] == self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the folder's chat template (LFM2's when it ships none) in a sandbox."""
        import jinja2

        if isinstance(messages, (str, bytes)) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages
        ):
            raise UserError("chat messages must be a list of objects with a string 'role'")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template or LFM2_CHAT_TEMPLATE)
        data = _plain({"messages": list(messages), "tools": list(tools) if tools else None, **kwargs})
        try:
            return self._compiled.render(
                **data,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
            )
        except jinja2.TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_bos=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text, emitting only complete characters: `tokenizers`'
    `decoders.DecodeStream` over the tokenizer's own decoder pipeline.

    A token that ends inside a multi-byte UTF-8 character (byte-level BPE pieces, byte-fallback `<0xNN>`
    tokens) emits nothing until the character is complete; the concatenated output equals `decode(all_ids)`.
    `flush` emits what is still held (an incomplete character as U+FFFD), from a full decode of the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted = 0
        """Tokens whose text is out (the rest are pending)."""
        self.text = ""
        """Everything emitted so far."""

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        try:
            piece = self._stream.step(self._tok.backend, int(token_id))
        except Exception as e:  # tokenizers raises a bare Exception for ids outside its vocabulary
            raise UserError(f"cannot decode token id {token_id} ({e})") from None
        if not piece:
            return ""
        self._emitted = len(self._ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """Emit whatever is pending, incomplete characters included (as U+FFFD)."""
        from tokenizers.decoders import DecodeStream

        full = self._tok.decode(self._ids, self._skip)
        if full.startswith(self.text):
            delta = full[len(self.text) :]
        else:  # byte fallback turns every byte of a run that ends incomplete into U+FFFD: the pending ones alone
            delta = self._tok.decode(self._ids[self._emitted :], self._skip)
        self.text += delta
        self._emitted = len(self._ids)
        self._stream = DecodeStream(skip_special_tokens=self._skip)  # later tokens start afresh
        return delta


# ---- helpers ----------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_template(folder: Path, tcfg: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(template text, the file it came from); (None, None) when the folder has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), jinja.name
    tmpl = tcfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, Mapping)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tmpl, str):
        return tmpl, "tokenizer_config.json"
    return None, None


def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """JSON-like copy of template inputs, so the sandboxed template only ever sees plain data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"
