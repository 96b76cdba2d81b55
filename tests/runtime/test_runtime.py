"""The torch-free runtime: sampler semantics, tokenizer and streaming detokenization, chat templates and the
streaming generator, run over a real (table-backed) `Session` and a tokenizer trained here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfm_export.contract.errors import ContextLimitError, UserError
from lfm_export.contract.session import Session, SessionBase, SessionError
from lfm_export.runtime.generate import generate_text, stream_generate
from lfm_export.runtime.sampler import GenerationConfig, Sampler
from lfm_export.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.unit

SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe.",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u6587\u672c\u3002",
    "Emoji \U0001f389\U0001f680\u2728 and symbols \u20ac \u00a3 \u00a5.",
    "the the the hello hello world world stop STOP halt",
] * 4
MULTILINGUAL = "Hello w\u00f6rld \u65e5\u672c\u8a9e \U0001f389 caf\u00e9 \u4e2d\u6587!"


def train_tokenizer(folder: Path, vocab_size: int = 300, template: str | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained in-process, saved as a Hugging Face style folder."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tcfg = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    if template is not None:
        tcfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "temperature": 0.3}))
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


class TableSession(SessionBase):
    """A real `Session` on the shared session base: next-token logits read from a numpy table, by the last
    token (bigram) or by the absolute position (a scripted continuation)."""

    name = "table"

    def __init__(self, table: np.ndarray, by: str = "token", max_seq_len: int | None = None) -> None:
        self.table = table.astype(np.float32)
        self.by = by
        self.vocab_size = table.shape[1]
        self.max_seq_len = max_seq_len
        self.calls = 0
        self.reset()

    def _reset_state(self, batch_size: int) -> None:
        self._last = np.zeros(batch_size, dtype=np.int64)

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        b, t = ids.shape
        if self.by == "token":
            out = self.table[ids]
        else:
            rows = np.minimum(np.arange(self.position, self.position + t), len(self.table) - 1)
            out = np.broadcast_to(self.table[rows], (b, t, self.vocab_size)).copy()
        self._last = ids[:, -1]
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"last": self._last.copy()}


def scripted(
    prompt_len: int, continuation: list[int], vocab: int, max_seq_len: int | None = None
) -> TableSession:
    """A session whose greedy continuation of any `prompt_len`-token prompt is `continuation`."""
    table = np.zeros((prompt_len + len(continuation), vocab), dtype=np.float32)
    for i, t in enumerate(continuation):
        table[prompt_len - 1 + i, t] = 10.0
    return TableSession(table, by="position", max_seq_len=max_seq_len)


def test_table_session_is_a_session() -> None:
    assert isinstance(TableSession(np.zeros((4, 4))), Session)


class BatchOneHidden(TableSession):
    """What a static-cache runtime (ExecuTorch, Core ML, MLX) looks like: batch 1 only, state not exposed."""

    supports_batch = False

    def state(self) -> None:
        return SessionBase.state(self)


def test_session_base_checks_calls_and_keeps_position_on_failure() -> None:
    sess = BatchOneHidden(np.eye(5, dtype=np.float32), max_seq_len=6)
    assert isinstance(sess, Session) and sess.state() is None and sess.batch_size == 1
    with pytest.raises(SessionError, match="batch 1 only, got batch 2"):
        sess.reset(2)
    with pytest.raises(SessionError, match="batch size must be >= 1"):
        sess.reset(0)
    np.testing.assert_array_equal(sess.prefill(np.array([[1, 4]])), np.eye(5)[None, [1, 4]])
    for bad, message in [
        (np.array([1, 2]), r"shaped \[batch, tokens\], got \[2\]"),
        (np.zeros((1, 0), dtype=np.int64), r"got \[1, 0\]"),
        (np.array([[1.0, 2.0]]), "float64"),
        (np.array([[1], [2]]), "prefill got batch 2, the session was reset for batch 1"),
        (np.array([[0, 5]]), r"token ids must be in 0..4, got 0..5"),
        (np.array([[-1]]), r"got -1..-1"),
    ]:
        with pytest.raises(SessionError, match=message):
            sess.prefill(bad)
    with pytest.raises(SessionError, match="one token per row"):
        sess.decode(np.array([[1]]))
    with pytest.raises(ContextLimitError, match="2 tokens held \\+ 5 new exceeds max_seq_len 6"):
        sess.prefill(np.zeros((1, 5), dtype=np.int64))
    assert sess.position == 2 and sess.calls == 1  # refused calls never reach the runtime
    np.testing.assert_array_equal(sess.decode(np.array([3], dtype=np.int32)), np.eye(5)[[3]])
    assert sess.position == 3
    assert issubclass(SessionError, UserError) and not issubclass(ContextLimitError, SessionError)


def test_session_base_position_only_moves_when_the_runtime_returns() -> None:
    class Fails(TableSession):
        def _prefill(self, ids: np.ndarray) -> np.ndarray:
            raise RuntimeError("kernel missing")

    sess = Fails(np.eye(4, dtype=np.float32))
    with pytest.raises(RuntimeError):
        sess.prefill(np.array([[1, 2]]))
    assert sess.position == 0
    sess.reset(3)
    assert (sess.batch_size, sess.position) == (3, 0) and sess._last.shape == (3,)


# ---- sampler ------------------------------------------------------------------------------------------
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS)


def kept(cfg: GenerationConfig, logits: np.ndarray = LOGITS) -> set[int]:
    return set(np.flatnonzero(Sampler(cfg).probs(logits) > 0).tolist())


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=50)
        assert Sampler(GenerationConfig(do_sample=False, temperature=2.0)).sample(logits) == int(
            np.argmax(logits)
        )
        assert Sampler(GenerationConfig(do_sample=True, temperature=0.0), seed=3).sample(logits) == int(
            np.argmax(logits)
        )


def test_top_k_keeps_the_k_largest() -> None:
    logits = np.random.default_rng(0).normal(size=100)
    for k in (1, 5, 37):
        got = kept(GenerationConfig(do_sample=True, top_k=k), logits)
        assert got == set(np.argsort(-logits)[:k].tolist())
    assert len(kept(GenerationConfig(do_sample=True, top_k=0), logits)) == 100


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert kept(GenerationConfig(do_sample=True, top_p=0.4)) == {0}
    assert kept(GenerationConfig(do_sample=True, top_p=0.75)) == {0, 1}
    assert kept(GenerationConfig(do_sample=True, top_p=0.85)) == {0, 1, 2}
    assert kept(GenerationConfig(do_sample=True, top_p=1.0)) == {0, 1, 2, 3}
    p = Sampler(GenerationConfig(do_sample=True, top_p=0.75)).probs(LOGITS)
    np.testing.assert_allclose(p[:2], [0.5 / 0.8, 0.3 / 0.8])


def test_min_p_cuts_relative_to_the_top_probability() -> None:
    assert kept(GenerationConfig(do_sample=True, min_p=0.35)) == {0, 1}  # threshold 0.175
    assert kept(GenerationConfig(do_sample=True, min_p=0.25)) == {0, 1, 2}  # threshold 0.125
    assert kept(GenerationConfig(do_sample=True, min_p=0.05)) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5])
    out = Sampler(GenerationConfig(repetition_penalty=2.0)).process(logits, seen=[0, 1, 1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    greedy = Sampler(GenerationConfig(repetition_penalty=2.0))
    assert greedy.sample(np.array([2.0, 1.5]), seen=[0]) == 1
    assert greedy.sample(np.array([2.0, 1.5]), seen=[]) == 0


def test_processing_order_penalty_temperature_topk_topp_minp() -> None:
    logits = np.random.default_rng(5).normal(size=64) * 3
    seen = [3, 7, 7, 11]
    cfg = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3
    )
    x = logits.copy()
    x[[3, 7, 11]] = np.where(x[[3, 7, 11]] > 0, x[[3, 7, 11]] / 1.3, x[[3, 7, 11]] * 1.3)
    x = x / 0.7
    x[np.argsort(-x)[20:]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    x[order[(np.cumsum(p[order]) - p[order]) >= 0.9]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    x[p < 0.05 * p.max()] = -np.inf
    want = np.exp(x - x.max())
    want /= want.sum()
    np.testing.assert_allclose(Sampler(cfg).probs(logits, seen), want, atol=1e-12)
    hot = kept(GenerationConfig(do_sample=True, temperature=5.0, top_p=0.5), logits)
    cold = kept(GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5), logits)
    assert len(hot) > len(cold)


def test_sampling_is_seeded_and_follows_the_distribution() -> None:
    cfg = GenerationConfig(do_sample=True, temperature=1.0)
    draws = [Sampler(cfg, seed=11).sample(LOGITS) for _ in range(3)]
    assert len(set(draws)) == 1
    a = Sampler(cfg, seed=42)
    b = Sampler(cfg, seed=42)
    seq_a = [a.sample(LOGITS) for _ in range(200)]
    assert seq_a == [b.sample(LOGITS) for _ in range(200)]
    c = Sampler(cfg, seed=43)
    assert seq_a != [c.sample(LOGITS) for _ in range(200)]
    s = Sampler(cfg, seed=0)
    counts = np.bincount([s.sample(LOGITS) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, PROBS, atol=0.015)
    assert Sampler(GenerationConfig(do_sample=True, top_k=2), seed=0).sample(LOGITS) in (0, 1)


def test_generation_config_from_dict_and_folder(tmp_path: Path) -> None:
    cfg = GenerationConfig.from_dict(
        {
            "temperature": 0.3,
            "min_p": 0.15,
            "eos_token_id": 7,
            "do_sample": True,
            "unknown_key": 1,
            "top_k": None,
        }
    )
    assert (cfg.temperature, cfg.min_p, cfg.eos_token_ids, cfg.top_k) == (0.3, 0.15, (7,), 0)
    assert GenerationConfig.from_dict({"eos_token_id": [7, 2]}).eos_token_ids == (7, 2)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"repetition_penalty": 1.05, "max_new_tokens": 9})
    )
    got = GenerationConfig.from_folder(tmp_path, max_new_tokens=None, top_k=50)
    assert (got.repetition_penalty, got.max_new_tokens, got.top_k) == (1.05, 9, 50)
    assert GenerationConfig.from_folder(tmp_path / "absent") == GenerationConfig()
    for bad in (
        {"temperature": -1},
        {"top_p": 0.0},
        {"min_p": 1.5},
        {"repetition_penalty": 0},
        {"top_k": -2},
    ):
        with pytest.raises(UserError, match=next(iter(bad))):
            GenerationConfig.from_dict(bad)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(UserError, match="generation_config.json"):
        GenerationConfig.from_folder(tmp_path)


# ---- tokenizer ---------------------------------------------------------------------------------------
def test_tokenizer_reads_special_tokens(tok: Tokenizer) -> None:
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == SPECIALS.index("<|startoftext|>")
    assert tok.eos_token_ids == (2, SPECIALS.index("<|im_end|>"))  # generation_config first, then tokenizer
    assert tok.vocab_size == 300


def test_tokenizer_round_trip(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == MULTILINGUAL
    assert tok.decode(ids, skip_special_tokens=True) == MULTILINGUAL
    assert tok.encode(MULTILINGUAL, add_bos=False) == ids[1:]
    assert tok.encode("<|startoftext|>hi", add_bos=True).count(tok.bos_token_id) == 1
    assert tok.encode("<|im_start|>user", add_bos=False)[0] == SPECIALS.index("<|im_start|>")


def test_streaming_detokenization_emits_only_complete_characters(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs a character split across tokens"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTILINGUAL == detok.text
    assert sum(1 for p in pieces if p) < len(ids)  # some tokens were held back
    cut = IncrementalDetokenizer(tok)
    emoji = tok.encode("\U0001f389", add_bos=False)
    assert len(emoji) > 1
    assert [cut.add(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert cut.flush().startswith("\ufffd")  # incomplete bytes only come out on flush


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback: characters outside its vocabulary become `<0xNN>` tokens,
    one per UTF-8 byte, decoded by `ByteFallback` + `Fuse`."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    for piece in ("\u2581", "a", "b", "c", "\u2581a", "ab"):
        vocab[piece] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=[("\u2581", "a"), ("a", "b")], byte_fallback=True)
    hf = HfTokenizer(bpe)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(hf)


@pytest.mark.unit
def test_streaming_detokenization_of_byte_fallback_tokens() -> None:
    tok = byte_fallback_tokenizer()
    text = "ab \u00e9\U0001f389 c"
    ids = tok.encode(text, add_bos=False)
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[3:9] == ["<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(i) for i in ids]
    assert out[3:9] == ["", "\u00e9", "", "", "", "\U0001f389"]  # each character once its last byte arrives
    assert "".join(out) + detok.flush() == text == detok.text
    cut = IncrementalDetokenizer(tok)
    assert [cut.add(i) for i in ids[:8]] == ["a", "b", " ", "", "\u00e9", "", "", ""]
    assert cut.flush() == "\ufffd" * 3  # the three bytes of an incomplete character, on flush only


def test_chat_template_fallback_is_lfm2_chatml(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9"}]
    assert tok.apply_chat_template(msgs) == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi \u00e9<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs[1:], add_generation_prompt=False) == (
        "<|startoftext|><|im_start|>user\nHi \u00e9<|im_end|>\n"
    )
    tool = {"name": "get_status", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}
    with_tools = tok.apply_chat_template(msgs[1:], tools=[tool])
    assert with_tools.startswith(
        '<|startoftext|><|im_start|>system\nList of tools: <|tool_list_start|>[{"name": "get_status", '
    )
    assert with_tools.endswith(
        "]<|tool_list_end|><|im_end|>\n<|im_start|>user\nHi \u00e9<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == tok.apply_chat_template(msgs)


def test_chat_template_from_folder(tmp_path: Path) -> None:
    tmpl = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ tools | tojson }}"
    )
    t = train_tokenizer(tmp_path / "cfg", template=tmpl)
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"a": "\u00e9"}]) == (
        '[user]x<|im_end|>[assistant][{"a": "\u00e9"}]'
    )
    with pytest.raises(UserError, match="bad role system"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    (tmp_path / "cfg" / "chat_template.jinja").write_text("{{ messages[0].content | upper }}")
    assert (
        Tokenizer.from_folder(tmp_path / "cfg").apply_chat_template([{"role": "user", "content": "ok"}])
        == "OK"
    )
    (tmp_path / "cfg" / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError):  # the sandbox refuses attribute escapes
        Tokenizer.from_folder(tmp_path / "cfg").apply_chat_template([{"role": "user", "content": "ok"}])
    with pytest.raises(UserError, match="role"):
        t.apply_chat_template(["not a message"])  # type: ignore[list-item]


def test_tokenizer_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# ---- generation --------------------------------------------------------------------------------------
def test_stop_string_split_across_tokens_is_never_yielded(tok: Tokenizer) -> None:
    target = "hello world STOP halt"
    cont = tok.encode(target, add_bos=False)
    assert not any("STOP" in tok.decode([i]) for i in cont), "STOP must span several tokens"
    prompt = tok.encode("the", add_bos=True)
    sess = scripted(len(prompt), cont, tok.vocab_size)
    gen = stream_generate(
        sess, tok, prompt, GenerationConfig(max_new_tokens=50), stop_strings=["STOP", "zzz"]
    )
    pieces = list(gen)
    assert "".join(pieces) == "hello world " == gen.text
    assert not any("S" in p for p in pieces)
    assert gen.stats.stop_reason == "stop_string"
    assert gen.stats.new_tokens < len(cont)
    # without the stop string the whole script comes out, then max_new_tokens stops it
    full = stream_generate(sess, tok, prompt, GenerationConfig(max_new_tokens=len(cont)))
    assert "".join(full) == target and full.stats.stop_reason == "max_new_tokens"
    # a partial match that never completes is released at the end
    part = stream_generate(
        sess, tok, prompt, GenerationConfig(max_new_tokens=len(cont)), stop_strings=["haltX"]
    )
    assert "".join(part) == target


def test_eos_stops_and_is_not_yielded(tok: Tokenizer) -> None:
    eos = tok.token_to_id("<|im_end|>")
    cont = tok.encode("caf\u00e9 \u65e5\u672c", add_bos=False) + [eos] + tok.encode("more", add_bos=False)
    prompt = tok.encode("hi")
    gen = stream_generate(
        scripted(len(prompt), cont, tok.vocab_size), tok, prompt, GenerationConfig(max_new_tokens=40)
    )
    assert "".join(gen) == "caf\u00e9 \u65e5\u672c"
    assert gen.stats.stop_reason == "eos" and gen.token_ids[-1] == eos
    assert gen.stats.new_tokens == len(gen.token_ids) == cont.index(eos) + 1
    assert gen.stats.decode_steps == gen.stats.new_tokens - 1
    # config eos ids replace the tokenizer's
    other = stream_generate(
        scripted(len(prompt), cont, tok.vocab_size),
        tok,
        prompt,
        GenerationConfig(max_new_tokens=40, eos_token_ids=(cont[0],)),
    )
    assert list(other) == [] and other.stats.stop_reason == "eos"


def test_context_limit_clamps_then_errors_before_running(tok: Tokenizer) -> None:
    cont = tok.encode("hello world the quick brown fox", add_bos=False)
    prompt = tok.encode("the")
    sess = scripted(len(prompt), cont, tok.vocab_size, max_seq_len=len(prompt) + 3)
    gen = stream_generate(sess, tok, prompt, GenerationConfig(max_new_tokens=100))
    list(gen)
    assert gen.stats.max_new_tokens == 3 and len(gen.token_ids) == 3 and gen.stats.stop_reason == "context"
    assert sess.position == len(prompt) + 2  # the last sampled token is never fed back
    full = scripted(len(prompt), cont, tok.vocab_size, max_seq_len=len(prompt))
    with pytest.raises(ContextLimitError, match=f"prompt has {len(prompt)} tokens"):
        stream_generate(full, tok, prompt, GenerationConfig(max_new_tokens=5))
    assert full.calls == 0
    with pytest.raises(UserError, match="empty"):
        stream_generate(sess, tok, [], GenerationConfig())
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        stream_generate(sess, tok, [tok.vocab_size + 5], GenerationConfig())


def test_generation_matches_a_manual_loop_and_is_seeded(tok: Tokenizer) -> None:
    rng = np.random.default_rng(7)
    table = rng.normal(size=(tok.vocab_size, tok.vocab_size)).astype(np.float32) * 3
    eos = list(tok.eos_token_ids)
    table[:, eos] = -30.0  # never stop early
    sess = TableSession(table)
    prompt = tok.encode("hello world")
    cfg = GenerationConfig(
        max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40, repetition_penalty=1.2
    )
    gen = stream_generate(sess, tok, prompt, cfg, seed=5)
    text = "".join(gen)
    sampler = Sampler(cfg, seed=5)
    sess.reset()
    seen = list(prompt)
    logits = sess.prefill(np.array([prompt]))[0, -1]
    ids = []
    for _ in range(12):
        t = sampler.sample(logits, seen)
        ids.append(t)
        seen.append(t)
        logits = sess.decode(np.array([t]))[0]
    assert gen.token_ids == ids
    assert text == tok.decode(ids)
    again, stats = generate_text(sess, tok, prompt, cfg, seed=5)
    assert again == text and stats.new_tokens == 12 and stats.prompt_tokens == len(prompt)
    assert stats.decode_steps == 11 and stats.decode_tokens_per_s > 0 and stats.prefill_s > 0
    assert generate_text(sess, tok, prompt, cfg, seed=6)[0] != text
    chunked = stream_generate(sess, tok, prompt, cfg, seed=5, prefill_chunk=1)
    assert "".join(chunked) == text


def test_runtime_imports_without_torch() -> None:
    code = (
        "import lfm_export, lfm_export.runtime, lfm_export.runtime.onnx, lfm_export.runtime.sampler, "
        "lfm_export.runtime.generate, lfm_export.runtime.tokenizer, lfm_export.contract.manifest; import sys; "
        "from lfm_export.runtime import OnnxSession, stream_generate, Tokenizer, GenerationConfig; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported eagerly'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
