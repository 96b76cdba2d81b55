"""LFM2 tool-call parsing on fixture replies (tests/fixtures/tool_calls.json): well-formed blocks become JSON
calls and round-trip through `format_calls`; malformed ones give a clear error and keep their text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_export.runtime.tool_calls import ToolCallError, format_calls, parse_calls, parse_reply

FIXTURES = json.loads((Path(__file__).parent.parent / "fixtures" / "tool_calls.json").read_text())


@pytest.mark.unit
@pytest.mark.parametrize("case", FIXTURES["good"], ids=lambda c: c["reply"][19:40])
def test_well_formed_calls_parse_and_round_trip(case) -> None:
    parsed = parse_reply(case["reply"])
    assert parsed.errors == []
    assert [c.to_json() for c in parsed.calls] == case["calls"]
    assert parsed.text == case["text"]
    again = parse_reply(format_calls(parsed.calls))
    assert [c.to_json() for c in again.calls] == case["calls"] and again.text == ""


@pytest.mark.unit
@pytest.mark.parametrize("case", FIXTURES["malformed"], ids=lambda c: c["error"][:24])
def test_malformed_calls_are_a_clear_error_and_the_text_is_kept(case) -> None:
    parsed = parse_reply(case["reply"])
    assert parsed.calls == [] and len(parsed.errors) == 1
    assert case["error"] in parsed.errors[0]
    assert parsed.text == case["reply"]  # nothing of what the model wrote is lost


@pytest.mark.unit
def test_nothing_is_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    src = f'[f(x=__import__("pathlib").Path({str(marker)!r}).touch())]'
    with pytest.raises(ToolCallError, match="not a literal"):
        parse_calls(src)
    assert not marker.exists()
