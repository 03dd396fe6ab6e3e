"""Constants and assertions shared by the compat tests."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from compat_tests.openapi_schema import validate

API_KEY = "sk-test-master"
MAX_BODY_BYTES = 65_536

EMBEDDED = "smollm2"
EMBEDDED_ALIAS = "gpt-4o-mini"
UPSTREAM = "mock-upstream"
PASSTHROUGH = "echo"
FLAKY = "flaky"
FLAKY_UPSTREAM = "flaky-upstream"


@dataclass(frozen=True, slots=True)
class Server:
    """A running `clawbot serve` process."""

    name: str
    base_url: str
    """`http://127.0.0.1:PORT/v1`."""
    origin: str
    """`http://127.0.0.1:PORT`."""
    log: Path


def json_body(raw: Any) -> dict[str, Any]:
    """The JSON the server sent, from a `with_raw_response` result."""
    body: dict[str, Any] = raw.http_response.json()
    return body


def sse_payloads(lines: Iterable[str]) -> list[str]:
    """The `data:` payloads of an SSE stream, in order, `[DONE]` included."""
    return [line[5:].strip() for line in lines if line.startswith("data:")]


def _events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON events of a stream that must end with exactly one `[DONE]`."""
    payloads = sse_payloads(lines)
    assert payloads, "the stream sent no events"
    assert payloads[-1] == "[DONE]", payloads[-3:]
    assert payloads.count("[DONE]") == 1, payloads
    return [json.loads(p) for p in payloads[:-1]]


def chat_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The chunks of a chat stream, each validated as CreateChatCompletionStreamResponse."""
    events = _events(lines)
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
    return events


def validate_completion_event(event: dict[str, Any]) -> None:
    """Validate a streamed completion event as CreateCompletionResponse.

    The spec uses that schema for stream events too but, unlike for chat chunks, does not say
    that `finish_reason` is null until the last event nor that `usage` may be null, which is
    what OpenAI's API sends. Those two nulls are checked here, then set aside for the schema.
    """
    shaped = copy.deepcopy(event)
    if "usage" in shaped and shaped["usage"] is None:
        del shaped["usage"]
    for choice in shaped.get("choices", []):
        if isinstance(choice, dict) and choice.get("finish_reason", "") is None:
            choice["finish_reason"] = "stop"
    validate("CreateCompletionResponse", shaped)


def completion_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The events of a completion stream, each validated with `validate_completion_event`."""
    events = _events(lines)
    for event in events:
        validate_completion_event(event)
    return events


def chat_text(events: Iterable[dict[str, Any]]) -> str:
    """Content concatenated from the deltas of chat chunks."""
    return "".join(
        choice["delta"].get("content") or "" for event in events for choice in event["choices"]
    )


def completion_text(events: Iterable[dict[str, Any]]) -> str:
    """Text concatenated from streamed completion events."""
    return "".join(choice["text"] for event in events for choice in event["choices"])


def finish_reasons(events: Iterable[dict[str, Any]]) -> list[str]:
    """The non-null finish reasons of a stream's events."""
    return [
        choice["finish_reason"]
        for event in events
        for choice in event["choices"]
        if choice.get("finish_reason") is not None
    ]


def error_body(exc: openai.APIStatusError, status: int) -> dict[str, Any]:
    """The raw `error` object of an SDK error, checked: status, ErrorResponse, x-request-id."""
    response = exc.response
    assert exc.status_code == status, response.text
    assert response.headers.get("x-request-id"), dict(response.headers)
    body = response.json()
    validate("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    assert exc.message == error["message"] or error["message"] in exc.message
    assert exc.code == error["code"]
    assert exc.param == error["param"]
    assert exc.type == error["type"]
    return error
