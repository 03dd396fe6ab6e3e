"""Anthropic's Messages API through the official `anthropic` SDK, against real processes.

Every body is also validated with the SDK's own pydantic types (strictly: the SDK itself
builds its objects leniently), the way the OpenAI tests validate against OpenAI's spec.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pydantic
import pytest
from anthropic.types import ErrorResponse, Message, MessageTokensCount, RawMessageStreamEvent

from compat_tests.support import API_KEY, EMBEDDED, Server
from tests.serving import serve

USER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def mock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway on mock models, one of them calling tools; yields its origin."""
    config = {
        "model_server": {"host": "127.0.0.1"},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "models": [
            {"id": "echo", "aliases": ["claude-haiku-4-5"], "backend": "mock:"},
            {"id": "tools", "backend": "mock:", "options": {"tool_arguments": {"city": "Paris"}}},
            {"id": "flaky", "backend": "mock:", "options": {"fail_after_tokens": 3}},
        ],
    }
    workdir: Path = tmp_path_factory.mktemp("messages")
    with serve(config, workdir) as running:
        yield running.root


@pytest.fixture(scope="module")
def sdk(mock_server: str) -> Iterator[anthropic.Anthropic]:
    """The SDK pointed at the mock gateway's root, as Claude Code's ANTHROPIC_BASE_URL is."""
    with anthropic.Anthropic(
        base_url=mock_server, api_key=API_KEY, max_retries=0, timeout=60
    ) as client:
        yield client


def create(sdk: anthropic.Anthropic, **kwargs: Any) -> Message:
    """`messages.create`, its raw JSON validated as a Message."""
    raw = sdk.messages.with_raw_response.create(**kwargs)
    assert raw.headers.get("x-request-id")
    Message.model_validate(raw.http_response.json())
    message: Message = raw.parse()
    return message


def raw_events(sdk: anthropic.Anthropic, **kwargs: Any) -> list[Any]:
    """The events of `messages.create(stream=True)`, each validated."""
    events = []
    with sdk.messages.create(stream=True, **kwargs) as stream:
        for event in stream:
            _EVENT.validate_python(event.model_dump(mode="json", exclude_unset=True))
            events.append(event)
    return events


def test_create(sdk: anthropic.Anthropic) -> None:
    message = create(sdk, model="claude-haiku-4-5", max_tokens=64, messages=USER)
    assert message.id.startswith("msg_")
    assert message.model == "echo"
    assert message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "You said: What is the weather in Paris?"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens == 8


def test_create_with_system_and_max_tokens(sdk: anthropic.Anthropic) -> None:
    message = create(
        sdk,
        model="echo",
        max_tokens=2,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=USER,
        stop_sequences=["never"],
        # Newer SDKs dropped the sampling parameters; clients of older ones still send them.
        extra_body={"temperature": 0.2, "top_k": 40},
        metadata={"user_id": "u-1"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert message.content[0].text == "You said: "  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


def test_stream_helper_and_final_message(sdk: anthropic.Anthropic) -> None:
    types = []
    with sdk.messages.stream(model="echo", max_tokens=64, messages=USER) as stream:
        for event in stream:
            types.append(event.type)
        final = stream.get_final_message()
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert "text" in types  # the helper's own event, made from text deltas
    assert final.content[0].text == "You said: What is the weather in Paris?"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 8
    assert (
        final.usage.input_tokens
        == create(sdk, model="echo", max_tokens=64, messages=USER).usage.input_tokens
    )


def test_raw_stream_events(sdk: anthropic.Anthropic) -> None:
    events = raw_events(sdk, model="echo", max_tokens=64, messages=USER)
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert events[0].message.usage.input_tokens > 0
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "You said: What is the weather in Paris?"
    assert events[-2].delta.stop_reason == "end_turn"


def test_tool_use_round_trip(sdk: anthropic.Anthropic) -> None:
    first = create(sdk, model="tools", max_tokens=64, messages=USER, tools=[WEATHER_TOOL])
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use"
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    messages = [
        *USER,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C, sunny"}],
        },
    ]
    final = create(
        sdk,
        model="tools",
        max_tokens=64,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
    )
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == "You said: What is the weather in Paris?"  # type: ignore[union-attr]


def test_streamed_tool_use(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(
        model="tools", max_tokens=64, messages=USER, tools=[WEATHER_TOOL]
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types.count("input_json") > 1  # the argument fragments, parsed as they came
    assert final.stop_reason == "tool_use"
    (call,) = final.content
    assert call.type == "tool_use"
    assert call.input == {"city": "Paris"}


def test_count_tokens(sdk: anthropic.Anthropic) -> None:
    raw = sdk.messages.with_raw_response.count_tokens(model="echo", messages=USER)
    MessageTokensCount.model_validate(raw.http_response.json())
    plain = raw.parse().input_tokens
    assert plain > 0
    with_tools = sdk.messages.count_tokens(model="echo", messages=USER, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > plain


def error_of(exc: anthropic.APIStatusError, status: int, error_type: str) -> None:
    """An SDK error: its status, and the body in Anthropic's error shape."""
    assert exc.status_code == status
    assert exc.response.headers.get("x-request-id")
    ErrorResponse.model_validate(exc.body)
    assert isinstance(exc.body, dict)
    assert exc.body["error"]["type"] == error_type


def test_authentication_error(mock_server: str) -> None:
    with anthropic.Anthropic(base_url=mock_server, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            bad.messages.create(model="echo", max_tokens=8, messages=USER)
        error_of(refused.value, 401, "authentication_error")
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.count_tokens(model="echo", messages=USER)


def test_not_found_and_bad_request(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="claude-nope", max_tokens=8, messages=USER)
    error_of(missing.value, 404, "not_found_error")
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk.messages.create(
            model="echo", max_tokens=8, messages=USER, extra_body={"temperature": 1.5}
        )
    error_of(bad.value, 400, "invalid_request_error")
    assert "temperature" in bad.value.body["error"]["message"]  # type: ignore[index]


def read_text(sdk: anthropic.Anthropic, model: str, received: list[str]) -> None:
    """Stream a message with the SDK's helper, collecting its text until the stream ends."""
    with sdk.messages.stream(model=model, max_tokens=64, messages=USER) as stream:
        received.extend(stream.text_stream)


def test_mid_stream_failure_raises(sdk: anthropic.Anthropic) -> None:
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as failed:
        read_text(sdk, "flaky", received)
    assert "".join(received) == "You said: What "
    ErrorResponse.model_validate(failed.value.body)
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_embedded_model(server: Server) -> None:
    """A real model (SmolLM2 in-process), answered and streamed."""
    with anthropic.Anthropic(
        base_url=server.origin, api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        message = create(
            client, model=EMBEDDED, max_tokens=8, messages=[{"role": "user", "content": "Hi!"}]
        )
        assert message.model == EMBEDDED
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert 0 < message.usage.output_tokens <= 8
        with client.messages.stream(
            model=EMBEDDED, max_tokens=8, messages=[{"role": "user", "content": "Hi!"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens")
        assert final.usage.output_tokens <= 8
        assert text == "".join(b.text for b in final.content if b.type == "text")
