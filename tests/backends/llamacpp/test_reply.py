"""Planning an in-process request's output and shaping the reply (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from app.errors import InvalidRequest
from app.protocol import ChatCompletionRequest, ChunkDelta
from backends.llamacpp.reply import ReplyShaper, plan_output

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def request(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return msgspec.convert(body, ChatCompletionRequest)


def test_plain_request_has_no_grammar() -> None:
    plan = plan_output(request())
    assert plan.grammar is None
    assert plan.mode == "text"


def test_response_formats_get_grammars() -> None:
    assert "root" in (plan_output(request(response_format={"type": "json_object"})).grammar or "")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}
    plan = plan_output(request(response_format=fmt))
    assert plan.grammar
    assert plan.mode == "text"


def test_tools_add_instructions_to_the_system_prompt() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    plan = plan_output(request(messages=messages, tools=[TOOL]))
    assert plan.mode == "auto"
    assert plan.messages[0].role == "system"
    assert plan.messages[0].text().startswith("Be brief.\n\nYou can call these tools:")
    forced = plan_output(request(tools=[TOOL], tool_choice="required"))
    assert forced.mode == "call"
    assert forced.messages[0].role == "system"
    assert plan_output(request(tools=[TOOL], tool_choice="none")).mode == "text"


def test_earlier_calls_are_shown_in_the_grammar_format() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    plan = plan_output(request(messages=messages, tools=[TOOL]))
    shown = plan.messages[2]
    assert shown.tool_calls is None
    assert json.loads(shown.text()) == {"name": "get_weather", "arguments": {"city": "Oslo"}}


def test_auto_with_a_response_format_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        plan_output(request(tools=[TOOL], response_format={"type": "json_object"}))
    assert caught.value.param == "response_format"


def feed_all(shaper: ReplyShaper, text: str, step: int = 4) -> list[ChunkDelta]:
    deltas = []
    for start in range(0, len(text), step):
        deltas += shaper.feed(text[start : start + step])
    return deltas + shaper.finish()


def test_auto_text_streams_as_content() -> None:
    shaper = ReplyShaper("auto")
    deltas = feed_all(shaper, "Hello there, friend")
    assert "".join(d.content for d in deltas) == "Hello there, friend"  # type: ignore[misc]
    assert shaper.finish_reason("stop") == "stop"
    assert shaper.message().content == "Hello there, friend"


def test_a_call_streams_its_head_then_argument_fragments() -> None:
    shaper = ReplyShaper("auto")
    deltas = feed_all(shaper, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    calls = [d.tool_calls[0] for d in deltas]  # type: ignore[index]
    head = calls[0]
    assert (head.index, head.type, head.function) == (
        0,
        "function",
        {"name": "get_weather", "arguments": ""},
    )
    assert head.id == shaper.call_id
    rest = calls[1:]
    assert all(c.index == 0 and c.id is msgspec.UNSET for c in rest)
    arguments = "".join(c.function["arguments"] for c in rest)  # type: ignore[index]
    assert json.loads(arguments) == {"city": "Paris"}
    assert shaper.finish_reason("stop") == "tool_calls"
    message = shaper.message()
    assert message.content is None
    assert message.tool_calls[0].function.arguments == arguments  # type: ignore[index]


def test_a_call_cut_before_its_name_becomes_text() -> None:
    shaper = ReplyShaper("call")
    deltas = feed_all(shaper, '{"na')
    assert deltas[-1].content == '{"na'
    assert shaper.finish_reason("length") == "length"
    assert shaper.message().content == '{"na'
