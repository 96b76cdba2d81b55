"""`Conversation`: several chat turns over one `Session`, each turn prefilling only the tokens the session does
not hold yet.

Every turn renders the whole conversation with the artifact's chat template and compares the token ids with
those the session holds (`session.tokens()`): the new turn's tokens follow the longest common prefix. Where the
render departs from what the session holds (the model's own reply tokenizes otherwise as text, or a template
drops earlier content such as past `<think>` blocks), the session goes back to the snapshot taken at the end of
the previous turn's prompt (or to the start) and prefills from there. `Turn.prefilled` says how many tokens a
turn fed, `Turn.reused` how many it found held.

A conversation is saved as a session snapshot with its messages (`save` / `load`); a new conversation can start
from a snapshot taken after a shared prefix (`Conversation(..., prefix=snap)`), so the system prompt is
prefilled once for many conversations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.session import Session
from lfm_export.contract.snapshot import Snapshot, SnapshotError

from .generate import Generation, GenerationStats
from .sampler import GenerationConfig
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TurnInfo:
    prompt_tokens: int
    """Tokens of the whole conversation rendered for this turn."""
    reused: int
    """Of those, held by the session already."""
    prefilled: int
    """Fed to the session by this turn (`prompt_tokens - reused`)."""


class Turn:
    """One reply, streamed: iterate for text pieces. When the iteration ends, the reply is appended to the
    conversation as an assistant message. `text`, `stats` and `info` fill in as it runs."""

    def __init__(self, conversation: Conversation, generation: Generation, info: TurnInfo) -> None:
        self._conv, self._gen, self.info = conversation, generation, info
        self._it = self._run()

    @property
    def text(self) -> str:
        return self._gen.text

    @property
    def stats(self) -> GenerationStats:
        return self._gen.stats

    @property
    def token_ids(self) -> list[int]:
        return list(self._gen.token_ids)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def result(self) -> str:
        """Run the reply to its end; its text."""
        for _ in self:
            pass
        return self.text

    def _run(self) -> Iterator[str]:
        session, end = self._conv.session, self.info.prompt_tokens
        for piece in self._gen:
            if session.position == end:  # the first piece comes before any decode: mark the prompt's end
                self._conv._mark = session.snapshot()
            yield piece
        self._conv._finish(self)


class Conversation:
    """A chat over `session` with `tokenizer`'s template: `send(text)` streams the reply (a `Turn`).

    `system` and `tools` (JSON tool definitions, as the template lists them) stay across `reset`. `config`
    defaults to greedy decoding of up to 256 tokens with the tokenizer's end-of-turn ids.
    """

    def __init__(
        self,
        session: Session,
        tokenizer: Tokenizer,
        config: GenerationConfig | None = None,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        seed: int | None = 0,
        prefix: Snapshot | None = None,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig(do_sample=False, max_new_tokens=256)
        self.system = system
        self.tools = list(tools) if tools else None
        self.seed = seed
        self.messages: list[dict[str, Any]] = []
        self.turns: list[Turn] = []
        self._mark: Snapshot | None = None
        """The session at the end of the last turn's prompt (where a departing render goes back to)."""
        self._pending: Turn | None = None
        self.reset()
        if prefix is not None:
            session.restore(prefix)
            self._mark = prefix

    # ---- turns -------------------------------------------------------------------------------------------
    def send(self, content: Any, role: str = "user") -> Turn:
        """Add a `role` message (user, or tool for a tool's result) and stream the assistant's reply."""
        if self._pending is not None:
            raise UserError("the previous reply is still streaming; finish it (Turn.result()) first")
        if role not in ROLES[1:] or role == "assistant":
            raise UserError(f"send takes a user or tool message, got role {role!r}")
        self.messages.append({"role": role, "content": content})
        try:
            ids = self.tokenizer.encode_chat(self._rendered(), add_generation_prompt=True, tools=self.tools)
            info = self._feed_to(ids)
            new = ids[info.reused :]
            gen = Generation(self.session, self.tokenizer, new, self.config, seed=self.seed, resume=True)
        except BaseException:  # a turn that cannot run (context full, template error) is not added
            self.messages.pop()
            raise
        turn = Turn(self, gen, info)
        self._pending = turn
        return turn

    def add(self, role: str, content: Any) -> None:
        """Append a message without generating (an assistant reply given by the app, a tool result)."""
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        self.messages.append({"role": role, "content": content})

    def reset(self) -> None:
        """Forget the messages (the system prompt and tools stay); the session starts empty."""
        self.messages = []
        self.turns = []
        self._pending = None
        self._mark = None
        self.session.reset(1)

    # ---- disk --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """The session's snapshot with this conversation's messages, system prompt and tools (`.npz`)."""
        if self._pending is not None:
            raise UserError("a reply is still streaming; finish it before saving")
        snap = self.session.snapshot()
        extra = {"conversation": {"system": self.system, "tools": self.tools, "messages": self.messages}}
        return Snapshot(snap.session, snap.artifact_id, snap.position, snap.tokens, snap.state, extra).save(
            path
        )

    def load(self, path: str | Path) -> None:
        """Continue the conversation `save` wrote (refused for another artifact or session)."""
        snap = Snapshot.load(path)
        data = snap.extra.get("conversation")
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise SnapshotError(f"{path}: a session snapshot without a conversation")
        self.session.restore(snap)
        self.system, self.tools = data.get("system"), data.get("tools")
        self.messages = [dict(m) for m in data["messages"]]
        self.turns, self._pending, self._mark = [], None, snap

    # ---- internals -------------------------------------------------------------------------------------------
    def _rendered(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _feed_to(self, ids: list[int]) -> TurnInfo:
        """Bring the session to the longest prefix of `ids` it can reach without recomputing more than it
        must: what it holds, else the last turn's mark, else nothing."""
        held = self.session.tokens()[0].tolist()
        common = _common_prefix(held, ids)
        if common < len(held):
            mark = self._mark
            if (
                mark is not None
                and mark.position <= common
                and mark.tokens[0].tolist() == ids[: mark.position]
            ):
                self.session.restore(mark)
                common = mark.position
            else:
                self.session.reset(1)
                common = 0
        if common == len(ids):  # the session already holds the whole prompt: re-feed its last token
            self.session.restore(self._back_one(ids))
            common -= 1
        return TurnInfo(prompt_tokens=len(ids), reused=common, prefilled=len(ids) - common)

    def _back_one(self, ids: list[int]) -> Snapshot:
        """The session holding `ids[:-1]` (generation needs the logits of the prompt's last token)."""
        self.session.reset(1)
        if len(ids) > 1:
            self.session.prefill(np.asarray([ids[:-1]], dtype=np.int64))
        return self.session.snapshot()

    def _finish(self, turn: Turn) -> None:
        """The reply's text becomes an assistant message; the prompt's end is the next mark."""
        self._pending = None
        self.messages.append({"role": "assistant", "content": turn.text})
        self.turns.append(turn)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
