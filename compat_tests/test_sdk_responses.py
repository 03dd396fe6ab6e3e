"""POST /v1/responses through the official SDK, every body and event checked against the spec.

The session's `main` server covers the embedded model, the HTTP backend and a flaky mock; a
second server started here adds a mock that calls tools (`tool_arguments`), for round trips.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    API_KEY,
    EMBEDDED,
    FLAKY,
    PASSTHROUGH,
    UPSTREAM,
    error_body,
    json_body,
)
from tests.serving import ServerDidNotStart, serve

TOOLS_MODEL = "mock-tools"
DOWN_MODEL = "mock-down"
QUESTION = "Name three colours of the rainbow."
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": False,
}


@pytest.fixture(scope="module")
def tools_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    """An SDK client on a gateway whose mocks call tools, or fail before their first token."""
    config = {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60_000},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "models": [
            {
                "id": TOOLS_MODEL,
                "backend": "mock:",
                "options": {"tool_arguments": {"city": "Paris"}},
            },
            {"id": DOWN_MODEL, "backend": "mock:", "options": {"fail_with": "unavailable"}},
        ],
    }
    try:
        with (
            serve(config, tmp_path_factory.mktemp("responses-tools")) as running,
            OpenAI(base_url=running.base_url, api_key=API_KEY, max_retries=0, timeout=60) as sdk,
        ):
            yield sdk
    except ServerDidNotStart as exc:
        pytest.fail(f"tools server: {exc}")


def create(client: OpenAI, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The SDK's parsed response and the raw JSON it was parsed from, validated."""
    raw = client.responses.with_raw_response.create(**kwargs)
    assert raw.headers.get("x-request-id")
    body = json_body(raw)
    validate("Response", body)
    return raw.parse(), body


def named_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The events of a raw named-event stream: each name is its `type`, each event valid."""
    events: list[dict[str, Any]] = []
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            event = json.loads(line[len("data:") :])
            assert event["type"] == name, (name, event)
            validate("ResponseStreamEvent", event)
            events.append(event)
    assert events, "the stream sent no events"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def check_lifecycle(events: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Created and in progress first, one final event last; text deltas add up; the final
    response is returned."""
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    responses = [e["response"] for e in events if "response" in e]
    assert {r["id"] for r in responses} == {responses[0]["id"]}
    assert {r["model"] for r in responses} == {model}
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    [done] = [e["text"] for e in events if e["type"] == "response.output_text.done"]
    assert deltas == done
    final: dict[str, Any] = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == done
    return final


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM, PASSTHROUGH])
def test_non_stream(client: OpenAI, model: str) -> None:
    response, body = create(
        client, model=model, input=QUESTION, max_output_tokens=16, temperature=0
    )
    assert body["model"] == model
    assert body["status"] in ("completed", "incomplete")
    [message] = body["output"]
    assert message["type"] == "message"
    text = message["content"][0]["text"]
    assert text
    assert response.output_text == text
    usage = body["usage"]
    assert 0 < usage["output_tokens"] <= 16
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_instructions_and_message_list(client: OpenAI) -> None:
    response, body = create(
        client,
        model=UPSTREAM,
        instructions="Answer briefly.",
        input=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "input_text", "text": "what now?"}]},
        ],
    )
    assert body["instructions"] == "Answer briefly."
    assert response.output_text == "You said: what now?"


def test_max_output_tokens_is_incomplete(client: OpenAI) -> None:
    words = " ".join(f"word{i}" for i in range(30))  # the mock echoes them, a token each
    response, body = create(client, model=UPSTREAM, input=words, max_output_tokens=16)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response.incomplete_details is not None


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_stream_raw(client: OpenAI, model: str) -> None:
    with client.responses.with_streaming_response.create(
        model=model, input=QUESTION, max_output_tokens=16, stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        events = named_events(response.iter_lines())
    final = check_lifecycle(events, model)
    assert final["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_stream_sdk(client: OpenAI, model: str) -> None:
    with client.responses.create(
        model=model, input=QUESTION, max_output_tokens=16, stream=True
    ) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
    for event in events:
        validate("ResponseStreamEvent", event)
    check_lifecycle(events, model)


@pytest.mark.parametrize("model", [UPSTREAM, PASSTHROUGH])
def test_stream_helper_final_response(client: OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="hello there") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert final.status == "completed"
    assert final.output_text == "You said: hello there"
    assert final.usage is not None
    assert final.usage.output_tokens == 4


async def test_stream_helper_async(aclient: AsyncOpenAI) -> None:
    async with aclient.responses.stream(model=UPSTREAM, input="hello there") as stream:
        texts = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert "".join(texts) == final.output_text == "You said: hello there"


def test_function_tool_round_trip(tools_client: OpenAI) -> None:
    user = {"role": "user", "content": "What is the weather in Paris?"}
    first, body = create(tools_client, model=TOOLS_MODEL, input=[user], tools=[WEATHER_TOOL])
    assert body["tools"] == [WEATHER_TOOL]
    [call] = first.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert first.output_text == ""

    # The call goes back as the SDK holds it, then its result; "none" makes the mock answer.
    second, body = create(
        tools_client,
        model=TOOLS_MODEL,
        input=[
            user,
            *first.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert body["tool_choice"] == "none"
    assert second.output_text == "You said: What is the weather in Paris?"


def test_function_tool_stream(tools_client: OpenAI) -> None:
    with tools_client.responses.stream(
        model=TOOLS_MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        events = [event for event in stream]
        final = stream.get_final_response()
    for event in events:
        validate("ResponseStreamEvent", event.model_dump(mode="json", exclude_unset=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1
    assert "".join(deltas) == done.arguments
    [call] = final.output
    assert call.type == "function_call"
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_mid_stream_failure_is_an_error_event(client: OpenAI) -> None:
    with client.responses.create(
        model=FLAKY, input="one two three four five", stream=True
    ) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
    for event in events:
        validate("ResponseStreamEvent", event)
    error = events[-1]
    assert error["type"] == "error"
    assert error["code"] == "upstream_error"
    assert error["message"]
    assert not any(e["type"] == "response.completed" for e in events)


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no-such-model", input="hi")
    assert error_body(caught.value, 404)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ],
)
def test_unsupported_is_a_bad_request(client: OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=UPSTREAM, input="hi", **kwargs)
    error = error_body(caught.value, 400)
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"


def test_built_in_tools_are_left_out_with_a_warning(tools_client: OpenAI) -> None:
    """A web search offered beside a function: answered, the function called, the search left
    out and named in the warning header."""
    search = {"type": "web_search", "external_web_access": False}
    raw = tools_client.responses.with_raw_response.create(
        model=TOOLS_MODEL, input="weather?", tools=[search, WEATHER_TOOL]
    )
    assert raw.headers["x-clawbot-warning"].startswith("tools[0] (web_search) left out")
    body = json_body(raw)
    validate("Response", body)
    assert body["tools"] == [WEATHER_TOOL]
    [call] = raw.parse().output
    assert call.type == "function_call"
    assert call.name == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_first_byte_is_a_status(tools_client: OpenAI, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        tools_client.responses.create(model=DOWN_MODEL, input="hi", stream=stream)
    assert error_body(caught.value, 503)["code"] == "upstream_unavailable"
