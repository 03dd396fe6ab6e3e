"""Anthropic's Messages API: the bridge's conversions, and the routes on mock backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from app.api.anthropic.bridge import (
    estimate_input_tokens,
    message_events,
    server_tools,
    stop_reason,
    to_chat_messages,
    to_chat_request,
    to_message,
    tool_input,
)
from app.api.anthropic.protocol import MessagesRequest
from app.api.errors import anthropic_error_event
from app.api.hosted_tools import LeftOut
from app.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    UnsupportedParameter,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from app.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChunkChoice,
    ChunkDelta,
    FunctionCall,
    ImagePart,
    NamedFunction,
    NamedToolChoice,
    ResponseMessage,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from tests.conftest import MASTER_KEY, AppClient, away_from_minute_boundary, make_config

KEY = {"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def request(**fields: Any) -> MessagesRequest:
    body: dict[str, Any] = {
        "model": "mock",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    body.update(fields)
    return msgspec.convert(body, MessagesRequest)


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "mock",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    out.update(fields)
    return out


def named_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a named-event SSE body; every event's `type` must be its name."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: "), block
        assert data_line.startswith("data: "), block
        name, data = name_line[len("event: ") :], json.loads(data_line[len("data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


def assert_anthropic_error(response: Any, status: int, error_type: str) -> str:
    """Check an Anthropic-shaped error response; returns its message."""
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error"
    assert set(payload["error"]) == {"type", "message"}
    assert payload["error"]["type"] == error_type
    assert response.headers["x-request-id"].startswith("req_")
    message: str = payload["error"]["message"]
    return message


# ---- requests to chat


def test_system_string_and_blocks() -> None:
    assert to_chat_messages(request(system="be brief"))[0] == ChatMessage(
        role="system", content="be brief"
    )
    blocks = [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}]
    blocks.append({"type": "text", "text": "two"})
    messages = to_chat_messages(request(system=blocks))
    assert messages[0] == ChatMessage(role="system", content="one\n\ntwo")
    assert messages[1] == ChatMessage(role="user", content="hello there")


def test_user_images_become_image_parts() -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
    ]
    (user,) = to_chat_messages(request(messages=[{"role": "user", "content": content}]))
    assert isinstance(user.content, list)
    assert user.content[0] == TextPart("what is this?")
    assert isinstance(user.content[1], ImagePart)
    assert user.content[1].image_url.url == "data:image/png;base64,QUJD"
    assert isinstance(user.content[2], ImagePart)
    assert user.content[2].image_url.url == "https://example.com/a.jpg"


def test_file_images_are_refused() -> None:
    source = {"type": "file", "file_id": "file_1"}
    req = request(messages=[{"role": "user", "content": [{"type": "image", "source": source}]}])
    with pytest.raises(UnsupportedParameter) as refused:
        to_chat_messages(req)
    assert refused.value.param == "messages[0].content[0].source"


def test_tool_use_and_tool_results_become_chat_tool_messages_in_order() -> None:
    messages = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two cities", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": "P"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"c": "R"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and be quick"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "data"}],
                    "is_error": True,
                },
            ],
        },
    ]
    chat = to_chat_messages(request(messages=messages))
    assert [m.role for m in chat] == ["user", "assistant", "tool", "tool", "user"]
    assistant = chat[1]
    assert assistant.content == "Checking."
    assert assistant.reasoning_content == "two cities"
    assert assistant.tool_calls == [
        ToolCall(id="toolu_1", function=FunctionCall(name="get_weather", arguments='{"c":"P"}')),
        ToolCall(id="toolu_2", function=FunctionCall(name="get_weather", arguments='{"c":"R"}')),
    ]
    assert chat[2] == ChatMessage(role="tool", tool_call_id="toolu_1", content="sunny")
    assert chat[3] == ChatMessage(role="tool", tool_call_id="toolu_2", content="Error: no\ndata")
    assert chat[4] == ChatMessage(role="user", content="and be quick")


def test_tool_only_assistant_turn_has_no_content() -> None:
    block = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [block]}]
    assistant = to_chat_messages(request(messages=messages))[1]
    assert assistant.content is None
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.arguments == "{}"


def test_tool_result_images_follow_in_a_user_message() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/shot.png"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}
    tool, user = to_chat_messages(request(messages=[{"role": "user", "content": [result]}]))
    assert tool == ChatMessage(role="tool", tool_call_id="toolu_1", content="")
    assert isinstance(user.content, list)
    assert isinstance(user.content[0], ImagePart)


@pytest.mark.parametrize(
    ("role", "block"),
    [
        ("user", {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        ("assistant", {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}),
    ],
)
def test_blocks_in_the_wrong_role_are_refused(role: str, block: dict[str, Any]) -> None:
    req = request(messages=[{"role": role, "content": [{"type": "text", "text": "a"}, block]}])
    with pytest.raises(InvalidRequest) as refused:
        to_chat_messages(req)
    assert refused.value.param == "messages[0].content[1]"
    assert block["type"] in refused.value.message


def test_request_fields_map_onto_chat() -> None:
    chat = to_chat_request(
        request(
            stop_sequences=["END"],
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            metadata={"user_id": "u-1"},
            stream=True,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    )
    assert chat.model == "mock"
    assert chat.max_tokens == 64
    assert chat.stop == ["END"]
    assert (chat.temperature, chat.top_p, chat.top_k) == (0.5, 0.9, 40)
    assert chat.user == "u-1"
    assert chat.stream is True
    assert chat.tools is None
    assert chat.tool_choice is None


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "none"}, "none", None),
        (
            {"type": "tool", "name": "get_weather"},
            NamedToolChoice(type="function", function=NamedFunction("get_weather")),
            None,
        ),
    ],
)
def test_tools_and_tool_choice(
    choice: dict[str, Any], expected: Any, parallel: bool | None
) -> None:
    chat = to_chat_request(request(tools=[WEATHER_TOOL], tool_choice=choice))
    assert chat.tools is not None
    function = chat.tools[0].function
    assert (function.name, function.description) == ("get_weather", "Current weather of a city")
    assert function.parameters == WEATHER_TOOL["input_schema"]
    assert chat.tool_choice == expected
    assert chat.parallel_tool_calls is parallel


SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


def test_server_tools_are_left_out() -> None:
    chat = to_chat_request(request(tools=[SEARCH_TOOL], tool_choice={"type": "auto"}))
    assert chat.tools is None
    assert chat.tool_choice is None
    req = request(tools=[SEARCH_TOOL, {**WEATHER_TOOL, "type": "custom"}])
    chat = to_chat_request(req)
    assert chat.tools is not None
    assert [t.function.name for t in chat.tools] == ["get_weather"]
    assert server_tools(req.tools) == [LeftOut("tools[0]", "web_search_20250305")]


@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        ([SEARCH_TOOL, WEATHER_TOOL], {"type": "tool", "name": "web_search"}),
        ([SEARCH_TOOL], {"type": "any"}),
    ],
)
def test_forcing_a_server_tool_is_refused(tools: list[Any], choice: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        to_chat_request(request(tools=tools, tool_choice=choice))
    assert caught.value.param == "tool_choice"
    assert "web_search" in caught.value.message


def test_input_token_estimate_counts_messages_tool_calls_and_tools() -> None:
    plain = to_chat_request(request())
    with_tools = to_chat_request(request(tools=[WEATHER_TOOL]))
    base = estimate_input_tokens(plain.messages, plain.tools)
    assert base > 0
    assert estimate_input_tokens(with_tools.messages, with_tools.tools) > base
    call = ChatMessage(
        role="assistant",
        tool_calls=[ToolCall(id="t", function=FunctionCall(name="f", arguments='{"a": 1}'))],
    )
    assert estimate_input_tokens([*plain.messages, call], None) > base + 4


# ---- chat to responses


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_stop_reasons(finish: str | None, expected: str) -> None:
    assert stop_reason(finish) == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Paris"}', {"city": "Paris"}),
        ("", {}),
        ('{"city": "Par', {"_raw": '{"city": "Par'}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
)
def test_tool_input_parses_arguments(arguments: str, expected: dict[str, Any]) -> None:
    assert tool_input(arguments) == expected


def completion(message: ResponseMessage, finish: Any, usage: Usage | None = None) -> ChatCompletion:
    result = ChatCompletion(
        id="chatcmpl-1",
        created=0,
        model="mock",
        choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
    )
    if usage is not None:
        result.usage = usage
    return result


def test_message_from_a_completion_with_reasoning_text_and_tool_calls() -> None:
    calls = [
        ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"c":"P"}')),
        ToolCall(id="", function=FunctionCall(name="broken", arguments="{nope")),
    ]
    answer = ResponseMessage(content="Let me look.", tool_calls=calls, reasoning_content="hmm")
    usage = Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12)
    message = msgspec.to_builtins(to_message(completion(answer, "tool_calls", usage), lambda: 99))
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", "mock")
    thinking, text, call, broken = message["content"]
    assert thinking == {"type": "thinking", "thinking": "hmm", "signature": ""}
    assert text == {"type": "text", "text": "Let me look."}
    assert call == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"c": "P"}}
    assert broken["id"].startswith("toolu_")
    assert broken["input"] == {"_raw": "{nope"}
    assert message["stop_reason"] == "tool_use"
    assert message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 5}


def test_message_without_usage_uses_the_estimate() -> None:
    message = to_message(completion(ResponseMessage(content=""), "length"), lambda: 42)
    assert message.content == []
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (42, 0)


def test_tool_round_trip_keeps_ids_and_arguments() -> None:
    call = ToolCall(id="call_9", function=FunctionCall(name="get_weather", arguments='{"c":"P"}'))
    answer = to_message(
        completion(ResponseMessage(content=None, tool_calls=[call]), "tool_calls"), lambda: 1
    )
    assistant = {"role": "assistant", "content": msgspec.to_builtins(answer.content)}
    result = {"type": "tool_result", "tool_use_id": "call_9", "content": "sunny"}
    messages = [
        {"role": "user", "content": "weather?"},
        assistant,
        {"role": "user", "content": [result]},
    ]
    chat = to_chat_messages(request(messages=messages))
    assert chat[1].tool_calls == [call]
    assert chat[2] == ChatMessage(role="tool", tool_call_id="call_9", content="sunny")


# ---- chat streams to events


def chunk(delta: ChunkDelta, finish: Any = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="c",
        created=0,
        model="mock",
        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
    )


def usage_chunk(prompt: int, completion: int) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="c",
        created=0,
        model="mock",
        choices=[],
        usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
    )


async def collect(chunks: list[ChatCompletionChunk], estimate: int = 11) -> list[tuple[str, Any]]:
    async def source() -> AsyncIterator[ChatCompletionChunk]:
        for c in chunks:
            yield c

    events = message_events(source(), "fallback", lambda: estimate)
    return [(name, msgspec.to_builtins(item)) async for name, item in events]


async def test_stream_events_reasoning_text_then_tool_calls() -> None:
    def call(index: int, **fields: Any) -> ChunkDelta:
        return ChunkDelta(tool_calls=[ToolCallDelta(index=index, **fields)])

    events = await collect(
        [
            chunk(ChunkDelta(role="assistant", content="")),
            chunk(ChunkDelta(reasoning_content="think")),
            chunk(ChunkDelta(content="Hello ")),
            chunk(ChunkDelta(content="world")),
            chunk(call(0, id="call_a", type="function", function={"name": "f", "arguments": ""})),
            chunk(call(0, function={"arguments": '{"x":'})),
            chunk(call(0, function={"arguments": " 1}"})),
            chunk(call(1, id="call_b", type="function", function={"name": "g", "arguments": "{}"})),
            chunk(ChunkDelta(), "tool_calls"),
            usage_chunk(5, 9),
        ]
    )
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",  # 0 thinking
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 1 text
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 2 tool f
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 3 tool g
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["model"] == "mock"
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 11, "output_tokens": 0}
    blocks = [e["content_block"] for n, e in events if n == "content_block_start"]
    assert [e["index"] for n, e in events if n == "content_block_start"] == [0, 1, 2, 3]
    assert blocks == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_a", "name": "f", "input": {}},
        {"type": "tool_use", "id": "call_b", "name": "g", "input": {}},
    ]

    def joined(index: int, key: str) -> str:
        return "".join(
            e["delta"][key] for n, e in events if n == "content_block_delta" and e["index"] == index
        )

    assert joined(0, "thinking") == "think"
    assert joined(1, "text") == "Hello world"
    assert json.loads(joined(2, "partial_json")) == {"x": 1}
    assert json.loads(joined(3, "partial_json")) == {}
    assert [e["index"] for n, e in events if n == "content_block_stop"] == [0, 1, 2, 3]
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 9, "input_tokens": 5},
    }
    assert events[-1][1] == {"type": "message_stop"}


async def test_stream_fragment_of_an_earlier_call_goes_to_its_block() -> None:
    def call(index: int, **fields: Any) -> ChunkDelta:
        return ChunkDelta(tool_calls=[ToolCallDelta(index=index, **fields)])

    events = await collect(
        [
            chunk(call(0, id="a", function={"name": "f"})),
            chunk(call(1, id="b", function={"name": "g"})),
            chunk(call(0, function={"arguments": "{}"})),
            chunk(ChunkDelta(), "tool_calls"),
        ]
    )
    deltas = [e for n, e in events if n == "content_block_delta"]
    assert deltas == [
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "{}"},
        }
    ]


async def test_empty_stream_still_starts_and_stops() -> None:
    events = await collect([])
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0][1]["message"]["model"] == "fallback"
    assert events[1][1]["usage"] == {"output_tokens": 0}


async def test_failure_before_the_first_chunk_precedes_message_start() -> None:
    async def failing() -> AsyncIterator[ChatCompletionChunk]:
        raise UpstreamTimeout("slow")
        yield  # pragma: no cover

    events = message_events(failing(), "mock", lambda: 1)
    with pytest.raises(UpstreamTimeout):
        await anext(events)


# ---- error shapes


@pytest.mark.parametrize(
    ("exc", "error_type"),
    [
        (InvalidRequest("bad"), "invalid_request_error"),
        (AuthenticationFailed("who"), "authentication_error"),
        (PermissionDenied("no"), "permission_error"),
        (ModelNotFound("where"), "not_found_error"),
        (PayloadTooLarge("big"), "request_too_large"),
        (RateLimited("slow down", retry_after=2), "rate_limit_error"),
        (UpstreamError("broke"), "api_error"),
        (UpstreamStatusError("500", upstream_status=500), "api_error"),
        (UpstreamStatusError("429", upstream_status=429), "rate_limit_error"),
        (ServiceUnavailable("busy"), "overloaded_error"),
        (UpstreamTimeout("slow"), "timeout_error"),
        (GatewayError("oops"), "api_error"),
    ],
)
def test_error_event_types(exc: GatewayError, error_type: str) -> None:
    name, payload = anthropic_error_event(exc)
    assert name == "error"
    assert msgspec.to_builtins(payload) == {
        "type": "error",
        "error": {"type": error_type, "message": exc.message},
    }


def test_unknown_exceptions_are_api_errors_without_details() -> None:
    _, payload = anthropic_error_event(RuntimeError("secret detail"))
    assert payload.error.type == "api_error"
    assert "secret" not in payload.error.message


# ---- routes


def models(**extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": "mock", "aliases": ["claude-sonnet-4-5"], "backend": "mock:"},
        {"id": "tools", "backend": "mock:", "options": {"tool_arguments": {"city": "Paris"}}},
        {"id": "broken", "backend": "mock:", "options": {"fail_after_tokens": 2}},
        {"id": "down", "backend": "mock:", "options": {"fail_with": "unavailable"}},
        *({"id": name, "backend": "mock:", **fields} for name, fields in extra.items()),
    ]


@pytest.fixture
async def client(
    make_client: Callable[..., AppClient],
) -> AsyncIterator[AppClient]:
    async with make_client(make_config(models())) as c:
        yield c


async def test_message(client: AppClient) -> None:
    r = await client.post("/v1/messages", json=body(), headers=KEY)
    assert r.status_code == 200, r.text
    message = r.json()
    assert message["id"].startswith("msg_")
    assert message["model"] == "mock"
    assert message["content"] == [{"type": "text", "text": "You said: hello there"}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 2, "output_tokens": 4}
    assert r.headers["x-request-id"].startswith("req_")


async def test_alias_and_bearer_key(client: AppClient) -> None:
    auth = {"authorization": f"Bearer {MASTER_KEY}"}
    r = await client.post("/v1/messages", json=body(model="claude-sonnet-4-5"), headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "mock"


async def test_max_tokens_limits_the_answer(client: AppClient) -> None:
    r = await client.post("/v1/messages", json=body(max_tokens=2), headers=KEY)
    assert r.json()["content"] == [{"type": "text", "text": "You said: "}]
    assert r.json()["stop_reason"] == "max_tokens"


async def test_stream(client: AppClient) -> None:
    r = await client.post("/v1/messages", json=body(stream=True), headers=KEY)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = named_events(r.text)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    text = "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta")
    assert text == "You said: hello there"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 4, "input_tokens": 2}


async def test_tool_use_round_trip(client: AppClient) -> None:
    first = body(
        model="tools", tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "Paris?"}]
    )
    r = await client.post("/v1/messages", json=first, headers=KEY)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["stop_reason"] == "tool_use"
    (call,) = answer["content"]
    assert call["type"] == "tool_use"
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"})
    result = {"type": "tool_result", "tool_use_id": call["id"], "content": "18C, sunny"}
    second = {
        **first,
        "tool_choice": {"type": "none"},
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": answer["content"]},
            {"role": "user", "content": [result]},
        ],
    }
    r = await client.post("/v1/messages", json=second, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.json()["content"] == [{"type": "text", "text": "You said: Paris?"}]
    assert r.json()["stop_reason"] == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_server_tools_left_out_are_named_in_a_header(client: AppClient, stream: bool) -> None:
    payload = body(model="tools", tools=[SEARCH_TOOL, WEATHER_TOOL], stream=stream)
    r = await client.post("/v1/messages", json=payload, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.headers["x-clawbot-warning"].startswith("tools[0] (web_search_20250305) left out")
    forced = body(tools=[SEARCH_TOOL], tool_choice={"type": "any"})
    r = await client.post("/v1/messages", json=forced, headers=KEY)
    assert "web_search" in assert_anthropic_error(r, 400, "invalid_request_error")


async def test_stream_tool_use(client: AppClient) -> None:
    r = await client.post(
        "/v1/messages", json=body(model="tools", tools=[WEATHER_TOOL], stream=True), headers=KEY
    )
    events = named_events(r.text)
    (start,) = [e for n, e in events if n == "content_block_start"]
    assert start["content_block"]["name"] == "get_weather"
    assert start["content_block"]["input"] == {}
    fragments = [e["delta"]["partial_json"] for n, e in events if n == "content_block_delta"]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "sk-wrong"}])
async def test_authentication_error(client: AppClient, headers: dict[str, str]) -> None:
    r = await client.post("/v1/messages", json=body(), headers=headers)
    assert_anthropic_error(r, 401, "authentication_error")


async def test_unknown_model(client: AppClient) -> None:
    r = await client.post("/v1/messages", json=body(model="claude-nope"), headers=KEY)
    assert "claude-nope" in assert_anthropic_error(r, 404, "not_found_error")


async def test_max_tokens_is_required(client: AppClient) -> None:
    payload = body()
    del payload["max_tokens"]
    r = await client.post("/v1/messages", json=payload, headers=KEY)
    assert "max_tokens" in assert_anthropic_error(r, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": 1.5}, "temperature"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ],
)
async def test_malformed_fields_are_named(
    client: AppClient, fields: dict[str, Any], named: str
) -> None:
    r = await client.post("/v1/messages", json=body(**fields), headers=KEY)
    assert named in assert_anthropic_error(r, 400, "invalid_request_error")


async def test_invalid_json_body(client: AppClient) -> None:
    r = await client.post("/v1/messages", content=b"{nope", headers=KEY)
    assert_anthropic_error(r, 400, "invalid_request_error")


async def test_unknown_fields_and_beta_headers_are_accepted(client: AppClient) -> None:
    text = {"type": "text", "text": "hello there", "cache_control": {"type": "ephemeral"}}
    r = await client.post(
        "/v1/messages?beta=true",  # as Claude Code calls it
        json=body(
            messages=[{"role": "user", "content": [text]}],
            thinking={"type": "enabled", "budget_tokens": 1024},
            service_tier="auto",
            some_future_field={"x": 1},
        ),
        headers={**KEY, "anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "You said: hello there"


async def test_images_on_a_model_without_vision(client: AppClient) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    r = await client.post(
        "/v1/messages", json=body(messages=[{"role": "user", "content": [image]}]), headers=KEY
    )
    assert "images" in assert_anthropic_error(r, 400, "invalid_request_error")


async def test_mid_stream_failure_is_an_error_event(client: AppClient) -> None:
    r = await client.post("/v1/messages", json=body(model="broken", stream=True), headers=KEY)
    assert r.status_code == 200
    events = named_events(r.text)
    assert events[0][0] == "message_start"
    assert "message_stop" not in [name for name, _ in events]
    name, error = events[-1]
    assert name == "error"
    assert error == {
        "type": "error",
        "error": {"type": "api_error", "message": "mock backend failed mid-generation"},
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_the_first_event_is_an_error_status(
    client: AppClient, stream: bool
) -> None:
    r = await client.post("/v1/messages", json=body(model="down", stream=stream), headers=KEY)
    assert_anthropic_error(r, 503, "overloaded_error")
    assert r.headers["retry-after"]


async def test_count_tokens(client: AppClient) -> None:
    payload = {"model": "mock", "system": "be brief", "messages": body()["messages"]}
    r = await client.post("/v1/messages/count_tokens", json=payload, headers=KEY)
    assert r.status_code == 200, r.text
    plain = r.json()["input_tokens"]
    assert plain > 0
    r = await client.post(
        "/v1/messages/count_tokens", json={**payload, "tools": [WEATHER_TOOL]}, headers=KEY
    )
    assert r.json()["input_tokens"] > plain
    # The count is what the stream's message_start reports.
    r = await client.post(
        "/v1/messages", json={**payload, "max_tokens": 8, "stream": True}, headers=KEY
    )
    assert named_events(r.text)[0][1]["message"]["usage"]["input_tokens"] == plain


async def test_count_tokens_is_authenticated(client: AppClient) -> None:
    payload = {"model": "mock", "messages": body()["messages"]}
    r = await client.post("/v1/messages/count_tokens", json=payload)
    assert_anthropic_error(r, 401, "authentication_error")
    r = await client.post("/v1/messages/count_tokens", json={**payload, "model": "x"}, headers=KEY)
    assert_anthropic_error(r, 404, "not_found_error")


async def test_body_too_large(make_client: Callable[..., AppClient]) -> None:
    async with make_client(make_config(models(), max_body_bytes=1024)) as c:
        r = await c.post("/v1/messages", json=body(system="x" * 4096), headers=KEY)
        assert_anthropic_error(r, 413, "request_too_large")


async def test_rate_limited(make_client: Callable[..., AppClient]) -> None:
    config = make_config(models(limited={"limits": {"requests_per_minute": 1}}))
    await away_from_minute_boundary()
    async with make_client(config) as c:
        r = await c.post("/v1/messages", json=body(model="limited"), headers=KEY)
        assert r.status_code == 200
        r = await c.post("/v1/messages", json=body(model="limited"), headers=KEY)
        assert_anthropic_error(r, 429, "rate_limit_error")
        assert int(r.headers["retry-after"]) >= 1


async def test_other_routes_keep_openai_errors(client: AppClient) -> None:
    chat = {"model": "mock", "messages": body()["messages"]}
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "type" not in r.json()
