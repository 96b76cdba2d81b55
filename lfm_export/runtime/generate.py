"""Streaming text generation over any `Session`: prefill, then decode token by token, yielding text.

Context policy: the prompt plus the new tokens must fit in `session.max_seq_len`. When they do not,
`max_new_tokens` is clamped to the room left (`stats.stop_reason` is then "context" if generation runs into
it); only a prompt that leaves no room for a single new token raises `ContextLimitError`, before any model call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lfm_export.contract.errors import ContextLimitError, UserError
from lfm_export.contract.session import Session

from .prefill import prefill_for_generation
from .sampler import GenerationConfig, Sampler
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    """Tokens sampled, the stopping eos included."""
    prefill_s: float = 0.0
    """Prompt prefill, until the first token is sampled."""
    decode_s: float = 0.0
    decode_steps: int = 0
    """`decode` calls (the first new token comes from the prefill logits, so this is new_tokens - 1 or less)."""
    max_new_tokens: int = 0
    """After clamping to the context."""
    stop_reason: str = ""
    """"eos", "stop_string", "max_new_tokens" or "context"."""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class Generation:
    """Iterator over text pieces; `stats`, `token_ids` and `text` fill in as it runs."""

    def __init__(
        self,
        session: Session,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        stop_strings: Sequence[str] = (),
        seed: int | None = 0,
        prefill_chunk: int | None = None,
        skip_special_tokens: bool = False,
        resume: bool = False,
    ) -> None:
        self.prompt_ids = [int(t) for t in prompt_ids]
        if not self.prompt_ids:
            raise UserError("the prompt is empty: nothing to generate from")
        bad = [t for t in self.prompt_ids if not 0 <= t < session.vocab_size]
        if bad:
            raise UserError(
                f"prompt token id {bad[0]} is outside the model's vocabulary (0..{session.vocab_size - 1})"
            )
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise UserError(f"prefill chunk must be positive, got {prefill_chunk}")
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.eos = frozenset(config.eos_token_ids or tokenizer.eos_token_ids)
        self.sampler = Sampler(config, seed)
        self.prefill_chunk = prefill_chunk
        self.skip_special_tokens = skip_special_tokens
        self.resume = resume
        """True: `prompt_ids` follow what the session holds (no reset; a conversation's next turn)."""
        self.token_ids: list[int] = []
        self.text = ""
        n = len(self.prompt_ids)
        held = session.position if resume else 0
        budget = config.max_new_tokens
        limit = session.max_seq_len
        if limit is not None:
            if held + n >= limit:
                raise ContextLimitError(
                    f"the prompt has {held + n} tokens and the {session.name} session holds {limit}: "
                    "no room for a new token; shorten the prompt or export with a larger --max-seq-len"
                )
            budget = min(budget, limit - held - n)
        self.stats = GenerationStats(prompt_tokens=n, max_new_tokens=budget)
        self._clamped = budget < config.max_new_tokens
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _run(self) -> Iterator[str]:
        st = self.stats
        if st.max_new_tokens == 0:
            st.stop_reason = "max_new_tokens"
            return
        sess = self.session
        detok = self.tokenizer.detokenizer(self.skip_special_tokens)
        seen = np.zeros(sess.vocab_size, dtype=bool)
        seen[self.prompt_ids] = True
        stops = _StopMatcher(self.stop_strings)
        penalised = self.config.repetition_penalty != 1.0

        t0 = time.perf_counter()
        if not self.resume:
            sess.reset(1)
        prompt = np.asarray([self.prompt_ids], dtype=np.int64)
        last = prefill_for_generation(sess, prompt, self.prefill_chunk)[0]
        token = self.sampler.sample(last, np.flatnonzero(seen) if penalised else None)
        st.prefill_s = time.perf_counter() - t0

        while True:
            self.token_ids.append(token)
            st.new_tokens += 1
            if token in self.eos:
                st.stop_reason = "eos"
                break
            seen[token] = True
            out, hit = stops.feed(detok.add(token))
            if out:
                self.text += out
                yield out
            if hit:
                st.stop_reason = "stop_string"
                return
            if st.new_tokens >= st.max_new_tokens:
                st.stop_reason = "context" if self._clamped else "max_new_tokens"
                break
            t1 = time.perf_counter()
            last = sess.decode(np.asarray([token], dtype=np.int64))[0]
            token = self.sampler.sample(last, np.flatnonzero(seen) if penalised else None)
            st.decode_s += time.perf_counter() - t1
            st.decode_steps += 1
        out, hit = stops.feed(detok.flush())
        out += "" if hit else stops.flush()
        if hit:
            st.stop_reason = "stop_string"
        if out:
            self.text += out
            yield out


def stream_generate(
    session: Session,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    stop_strings: Sequence[str] = (),
    seed: int | None = 0,
    prefill_chunk: int | None = None,
    skip_special_tokens: bool = False,
) -> Generation:
    """Generate from `prompt_ids`, yielding text as it is decoded (see the module docstring for the context
    policy). Stops on an eos id (`config.eos_token_ids`, else the tokenizer's), on a stop string (never yielded,
    even split across tokens) or after `max_new_tokens`. The returned object carries `stats` and `token_ids`."""
    return Generation(
        session, tokenizer, prompt_ids, config, stop_strings, seed, prefill_chunk, skip_special_tokens
    )


def generate_text(
    session: Session,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    stop_strings: Sequence[str] = (),
    seed: int | None = 0,
) -> tuple[str, GenerationStats]:
    """`stream_generate`, run to the end: (text, stats)."""
    gen = stream_generate(session, tokenizer, prompt_ids, config, stop_strings, seed)
    for _ in gen:
        pass
    return gen.text, gen.stats


class _StopMatcher:
    """Holds back text that could be the start of a stop string; reports the first full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
