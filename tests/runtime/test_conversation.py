"""`Conversation` over the reference session of the bundled `tiny` (trained on ChatML chats with a weather tool):
each turn prefills only what the session does not hold, and its reply equals a fresh session's on the whole
rendered conversation; save / load, reset and prefix reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_export.contract.errors import UserError
from lfm_export.contract.snapshot import SnapshotError
from lfm_export.loading import load_model
from lfm_export.parity import ReferenceSession
from lfm_export.runtime.conversation import Conversation
from lfm_export.runtime.generate import Generation
from lfm_export.runtime.sampler import GenerationConfig
from lfm_export.runtime.tokenizer import Tokenizer

CONFIG = GenerationConfig(do_sample=False, max_new_tokens=24)
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    loaded = load_model("tiny")
    return loaded.model, Tokenizer.from_folder(loaded.path)


def fresh_reply(model, tok: Tokenizer, messages: list[dict], tools=None) -> str:
    """The reply of a new session to the whole conversation rendered at once."""
    gen = Generation(ReferenceSession(model), tok, tok.encode_chat(messages, True, tools), CONFIG)
    return "".join(gen)


def test_turns_prefill_only_new_tokens_and_equal_a_fresh_session(tiny) -> None:
    model, tok = tiny
    session = ReferenceSession(model, max_seq_len=2048)
    conv = Conversation(session, tok, CONFIG, system="Be brief.")
    first = conv.send("Hi")
    pieces = list(first)
    assert len(pieces) > 1 and "".join(pieces) == first.text  # streamed
    second = conv.send("What does a cow say?")
    second.result()
    assert (
        second.info.reused == first.info.prompt_tokens + len(first.token_ids) - 1
    )  # all but the eos it sampled
    assert second.info.prefilled == second.info.prompt_tokens - second.info.reused
    assert second.info.prefilled < 20  # the reply's end-of-turn, the new user turn and the assistant header
    system = [{"role": "system", "content": "Be brief."}]
    assert second.text == fresh_reply(model, tok, system + conv.messages[:-1])
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]


def test_a_departing_render_goes_back_to_the_last_prompt(tiny) -> None:
    """An app that edits the last reply: the session returns to the last prompt's end, not to the start."""
    model, tok = tiny
    conv = Conversation(ReferenceSession(model, max_seq_len=2048), tok, CONFIG)
    first = conv.send("Hi")
    first.result()
    conv.messages[-1]["content"] = "Hello there."
    turn = conv.send("What color is the sky?")
    turn.result()
    assert turn.info.reused == first.info.prompt_tokens
    assert turn.text == fresh_reply(model, tok, conv.messages[:-1])


def test_save_load_reset_and_a_shared_prefix(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    session = ReferenceSession(model, max_seq_len=2048)
    conv = Conversation(session, tok, CONFIG, system="You are a helpful assistant.")
    conv.send("Hi").result()
    path = conv.save(tmp_path / "conv.npz")
    held = session.position
    conv.reset()
    assert session.position == 0 and conv.messages == [] and conv.system == "You are a helpful assistant."
    conv.load(path)
    assert session.position == held and len(conv.messages) == 2
    turn = conv.send("What does a dog say?")
    turn.result()
    assert turn.info.reused == held
    with pytest.raises(SnapshotError, match="does not exist"):
        conv.load(tmp_path / "missing.npz")

    # a system prompt prefilled once, reused by a new conversation
    session.reset(1)
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    session.prefill(np.asarray([tok.encode_chat(system, add_generation_prompt=False)]))
    prefix = session.snapshot()
    other = Conversation(ReferenceSession(model), tok, CONFIG, system=system[0]["content"], prefix=prefix)
    reply = other.send("What does a dog say?")
    assert reply.info.reused == prefix.position
    assert reply.result() == fresh_reply(model, tok, system + other.messages[:-1])


def test_a_tool_call_and_its_result(tiny) -> None:
    """The bundled model learned the weather tool: it calls it, and answers from the tool turn."""
    from lfm_export.runtime.tool_calls import parse_reply

    model, tok = tiny
    conv = Conversation(ReferenceSession(model, max_seq_len=2048), tok, CONFIG, tools=[WEATHER])
    call = parse_reply(conv.send("What is the weather in Paris?").result())
    assert call.errors == [] and [c.name for c in call.calls] == ["get_weather"]
    answer = conv.send('{"weather": "sunny"}', role="tool")
    answer.result()
    assert answer.info.reused > 0 and "<|tool_response_start|>" in tok.decode(
        tok.encode_chat(conv.messages[:-1])
    )
    assert answer.text == fresh_reply(model, tok, conv.messages[:-1], [WEATHER])


def test_run_refuses_chat_options_without_chat_and_a_missing_prompt(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lfm_export.cli import app
    from lfm_export.loading import ASSETS

    (tmp_path / "tokenizer.json").write_bytes((ASSETS / "tiny" / "tokenizer.json").read_bytes())
    runner = CliRunner()
    for args, message in (
        (["--tools", "t.json", "--prompt", "x"], "--tools needs --chat"),
        (["--system", "s"], "--system needs --chat"),
        ([], "run needs --prompt (or --chat for a conversation)"),
    ):
        r = runner.invoke(app, ["run", str(tmp_path), *args])
        assert r.exit_code != 0 and isinstance(r.exception, UserError) and str(r.exception) == message


def test_a_turn_past_the_context_is_refused_and_not_kept(tiny) -> None:
    from lfm_export.contract.errors import ContextLimitError

    model, tok = tiny
    conv = Conversation(ReferenceSession(model, max_seq_len=40), tok, CONFIG)
    conv.send("Hi").result()
    held = conv.session.position
    with pytest.raises(ContextLimitError):
        conv.send("Tell me a long story about a fox, a cow and a dog in the forest.")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    turn = conv.send("Hi")  # the conversation goes on
    turn.result()
    assert turn.info.reused == held and conv.messages[-2]["content"] == "Hi"


def test_the_chat_loop_reports_a_failed_turn_and_goes_on(tiny) -> None:
    import io

    from lfm_export.chat import ChatLoop

    model, tok = tiny
    out, err = io.StringIO(), io.StringIO()
    loop = ChatLoop(
        Conversation(ReferenceSession(model, max_seq_len=40), tok, CONFIG), out, err, verbose=True
    )
    loop.run(
        ["Hi\n", "Tell me a long story about a fox, a cow and a dog in the forest.\n", "/nope\n", "Hi\n"]
    )
    assert loop.failed == 2 and len(out.getvalue().splitlines()) == 2
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 2 and "no room for a new token" in errors[0] and "unknown command /nope" in errors[1]
    )
    assert err.getvalue().count("[turn ") == 2
