"""A backend failing mid-stream: an SSE error event, then `[DONE]`; the SDK raises APIError."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    FLAKY,
    FLAKY_UPSTREAM,
    error_body,
    sse_payloads,
    validate_completion_event,
)

# Both mocks fail after three word tokens: in-process, and relayed from the upstream gateway.
MODELS = [FLAKY, FLAKY_UPSTREAM]
USER = [{"role": "user", "content": "one two three four five"}]
BEFORE_FAILURE = "You said: one "


def failed_stream(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The events before the error event, and the error event, of a stream that fails."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]", payloads
    *chunks, error = (json.loads(p) for p in payloads[:-1])
    validate("ErrorResponse", error)
    assert error["error"]["message"]
    assert error["error"]["type"] == "api_error"
    assert all("error" not in chunk for chunk in chunks)
    return chunks, error


@pytest.mark.parametrize("model", MODELS)
def test_chat_error_event_then_done(http: httpx.Client, model: str) -> None:
    chunks, _ = failed_stream(
        http, "/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": 16}
    )
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == BEFORE_FAILURE
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


@pytest.mark.parametrize("model", MODELS)
def test_completion_error_event_then_done(http: httpx.Client, model: str) -> None:
    chunks, _ = failed_stream(
        http, "/v1/completions", {"model": model, "prompt": "one two three", "max_tokens": 16}
    )
    for chunk in chunks:
        validate_completion_event(chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "You said: one "


def read_chat(stream: Stream[ChatCompletionChunk], received: list[str]) -> None:
    """Validate each chunk of an SDK stream, collecting its content until the stream ends."""
    with stream:
        for chunk in stream:
            validate(
                "CreateChatCompletionStreamResponse",
                chunk.model_dump(mode="json", exclude_unset=True),
            )
            received.append(chunk.choices[0].delta.content or "")


async def read_completion(stream: AsyncStream[Completion], received: list[str]) -> None:
    """Collect the text of an async SDK completion stream until it ends."""
    async with stream:
        async for event in stream:
            received.append(event.choices[0].text)


@pytest.mark.parametrize("model", MODELS)
def test_sdk_raises_api_error(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(model=model, messages=USER, max_tokens=16, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        read_chat(stream, received)
    assert not isinstance(caught.value, openai.APIStatusError)
    assert "".join(received) == BEFORE_FAILURE
    assert isinstance(caught.value.body, dict)
    validate("ErrorResponse", {"error": caught.value.body})
    assert caught.value.message == caught.value.body["message"]
    assert caught.value.code == caught.value.body["code"]


@pytest.mark.parametrize("model", MODELS)
async def test_async_sdk_raises_api_error(aclient: AsyncOpenAI, model: str) -> None:
    stream = await aclient.completions.create(
        model=model, prompt="one two three", max_tokens=16, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        await read_completion(stream, received)
    assert not isinstance(caught.value, openai.APIStatusError)
    assert "".join(received) == "You said: one "
    validate("ErrorResponse", {"error": caught.value.body})


@pytest.mark.parametrize("model", MODELS)
def test_failure_without_streaming_is_a_server_error(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model, messages=USER, max_tokens=16)
    assert error_body(caught.value, 502)["type"] == "api_error"
