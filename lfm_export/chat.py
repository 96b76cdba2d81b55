"""`lfm-export run OUT --chat`: a conversation on the command line (`lfm_export.runtime.conversation`).

With `--prompt` the conversation has that one user turn; without, each line read from stdin is a turn (a
terminal gets a `> ` prompt on stderr), and these lines are commands:
`/reset` (a new conversation; the system prompt and tools stay), `/save FILE` (the session's snapshot and the
messages, `.npz`), `/load FILE` (continue a saved conversation; refused for another artifact), `/quit`.
A command or turn that fails (a turn past the context, say) prints one `error:` line on stderr and the
conversation goes on without it; the exit code is then 2.

Replies stream to stdout, one per turn, followed by a newline. Tool calls in a reply are printed as a
`tool calls: [...]` JSON line; with `--tool-results FILE` (JSON) the results are fed back as a `tool` turn once,
after the first reply that calls a tool, and the model answers again. `verbose` prints, per turn on stderr,
the tokens prefilled and those reused from the session.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from lfm_export.contract.errors import UserError
from lfm_export.runtime.conversation import Conversation, Turn
from lfm_export.runtime.tool_calls import parse_reply


def read_json_file(path: Path, what: str) -> Any:
    """`path`'s JSON content; one-line `UserError` when missing or malformed."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file {path}: not valid JSON ({e})") from None


def read_tools(path: Path) -> list[dict[str, Any]]:
    """A JSON list of tool definitions (objects with a `name`), as `--tools` takes it."""
    tools = read_json_file(path, "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
    ):
        raise UserError(f"tools file {path}: expected a JSON list of tool objects, each with a string 'name'")
    return tools


class ChatLoop:
    """Drives a `Conversation` from lines of text (module docstring); `failed` counts commands that failed."""

    def __init__(
        self,
        conversation: Conversation,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        verbose: bool = False,
        tool_results: Any = None,
    ) -> None:
        self.conv, self.out, self.err, self.verbose = conversation, out, err, verbose
        self.tool_results = tool_results
        self.failed = 0

    def run(self, lines: Iterable[str], interactive: bool = False) -> None:
        if interactive:
            self._prompt()
        for raw in lines:
            line = raw.rstrip("\r\n")
            if line.strip():
                if line.strip() in ("/quit", "/exit"):
                    return
                if line.startswith("/"):
                    self.command(line.strip())
                else:
                    self.turn(line)
            if interactive:
                self._prompt()

    def turn(self, text: str, role: str = "user") -> None:
        try:
            reply = self.conv.send(text, role=role)
        except UserError as e:  # the context is full, a template error: the conversation goes on without it
            self.failed += 1
            self.err.write(f"error: {e}\n")
            self.err.flush()
            return
        self._stream(reply)
        parsed = parse_reply(reply.text)
        for e in parsed.errors:
            self.err.write(f"warning: {e} (the reply text is kept as written)\n")
        if parsed.calls:
            self.out.write("tool calls: " + json.dumps([c.to_json() for c in parsed.calls]) + "\n")
            self.out.flush()
            if self.tool_results is not None:
                results, self.tool_results = self.tool_results, None
                content = results if isinstance(results, str) else json.dumps(results, ensure_ascii=False)
                self.turn(content, role="tool")

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name == "/reset":
                self.conv.reset()
                self._note("conversation reset")
            elif name in ("/save", "/load"):
                if not arg:
                    raise UserError(f"{name} needs a file name")
                if name == "/save":
                    path = self.conv.save(Path(arg))
                    self._note(f"saved {self.conv.session.position} tokens to {path}")
                else:
                    self.conv.load(Path(arg))
                    self._note(
                        f"loaded {self.conv.session.position} tokens, {len(self.conv.messages)} messages"
                    )
            else:
                raise UserError(f"unknown command {name}; commands: /reset, /save FILE, /load FILE, /quit")
        except UserError as e:
            self.failed += 1
            self.err.write(f"error: {e}\n")
            self.err.flush()

    def _stream(self, reply: Turn) -> None:
        for piece in reply:
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        if self.verbose:
            i = reply.info
            self._note(
                f"turn {sum(m['role'] == 'assistant' for m in self.conv.messages)}: prefilled {i.prefilled} tokens, reused {i.reused} held, "
                f"{reply.stats.new_tokens} generated ({reply.stats.stop_reason}), "
                f"session holds {self.conv.session.position}"
            )

    def _note(self, text: str) -> None:
        self.err.write(f"[{text}]\n")
        self.err.flush()

    def _prompt(self) -> None:
        self.err.write("> ")
        self.err.flush()
