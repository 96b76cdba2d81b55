"""LFM2 tool calls: the model writes `<|tool_call_start|>[name(arg=value, ...), ...]<|tool_call_end|>` (a Python
list of calls, as the LFM2 / LFM2.5 model cards document) and the app gets JSON calls.

The call list is parsed with `ast.parse` and only literal nodes are accepted (strings, numbers, booleans,
None, lists, tuples, dicts of literals, and negative numbers): nothing is ever evaluated or executed. Arguments
are keywords; a positional argument, a call that is not `name(...)` (`os.system(...)`, `f()(...)`), an
expression as a value, or text that is not a list is a `ToolCallError` naming what was wrong.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

from lfm_export.contract.errors import UserError

CALL_START = "<|tool_call_start|>"
CALL_END = "<|tool_call_end|>"


class ToolCallError(UserError, ValueError):
    """A tool-call block that is not a list of `name(keyword=literal, ...)` calls."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class ParsedReply:
    """A reply split into its text (tool-call blocks removed) and its calls; `errors` holds one line per
    malformed block, whose text stays in `text` as the model wrote it."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_calls(source: str) -> list[ToolCall]:
    """The calls of one block's content (`[name(a=1), other(b="x")]`); `ToolCallError` if malformed."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolCallError(f"tool call is not a Python call list ({e.msg} at column {e.offset})") from None
    body = tree.body
    if isinstance(body, ast.Call):  # a bare call without the list brackets: accepted as a list of one
        body = ast.List(elts=[body], ctx=ast.Load())
    if not isinstance(body, ast.List):
        raise ToolCallError(f"tool call must be a list of calls, got {type(body).__name__}")
    calls = []
    for node in body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ToolCallError(f"tool call entry must be name(arg=value, ...), got {ast.unparse(node)!r}")
        if node.args:
            raise ToolCallError(f"tool call {node.func.id}: arguments must be named (arg=value)")
        args: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ToolCallError(f"tool call {node.func.id}: **kwargs is not allowed")
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise ToolCallError(
                    f"tool call {node.func.id}: argument {kw.arg} is not a literal ({ast.unparse(kw.value)!r})"
                ) from None
        calls.append(ToolCall(node.func.id, _jsonable(args, node.func.id)))
    return calls


def parse_reply(text: str) -> ParsedReply:
    """Every `<|tool_call_start|>...<|tool_call_end|>` block of `text` parsed; the rest is the reply text. A
    block without its end marker, or one that does not parse, is kept in the text and reported in `errors`."""
    out = ParsedReply(text="")
    rest = text
    while True:
        start = rest.find(CALL_START)
        if start < 0:
            out.text += rest
            return out
        out.text += rest[:start]
        end = rest.find(CALL_END, start + len(CALL_START))
        if end < 0:
            out.errors.append("tool call block has no <|tool_call_end|>")
            out.text += rest[start:]
            return out
        block = rest[start + len(CALL_START) : end]
        try:
            out.calls.extend(parse_calls(block))
        except ToolCallError as e:
            out.errors.append(str(e))
            out.text += rest[start : end + len(CALL_END)]
        rest = rest[end + len(CALL_END) :]


def format_calls(calls: list[ToolCall]) -> str:
    """The block the model writes for `calls` (what an assistant message with these calls holds)."""
    parts = [f"{c.name}({', '.join(f'{k}={_py_literal(v)}' for k, v in c.arguments.items())})" for c in calls]
    return f"{CALL_START}[{', '.join(parts)}]{CALL_END}"


def _py_literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _jsonable(value: Any, name: str) -> Any:
    """Literal values as JSON types (tuples become lists); sets, bytes and complex numbers are refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and value != value:
            raise ToolCallError(f"tool call {name}: NaN is not a JSON value")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ToolCallError(f"tool call {name}: dict keys must be strings")
        return {k: _jsonable(v, name) for k, v in value.items()}
    raise ToolCallError(f"tool call {name}: {type(value).__name__} is not a JSON value")
