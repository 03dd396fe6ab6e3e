"""POST /v1/completions through the official SDK, every body checked against OpenAI's spec."""

from __future__ import annotations

from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    EMBEDDED,
    PASSTHROUGH,
    UPSTREAM,
    completion_events,
    completion_text,
    finish_reasons,
    json_body,
    validate_completion_event,
)

MODELS = [EMBEDDED, UPSTREAM, PASSTHROUGH]
PROMPT = "Once upon a time"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1234}


def complete(client: OpenAI, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The SDK's parsed completion and the raw JSON it was parsed from, validated."""
    raw = client.completions.with_raw_response.create(**kwargs)
    assert raw.headers.get("x-request-id")
    body = json_body(raw)
    validate("CreateCompletionResponse", body)
    return raw.parse(), body


def complete_stream(client: OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    """The raw events of a streamed completion, each validated (they share the response schema)."""
    with client.completions.with_streaming_response.create(stream=True, **kwargs) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return completion_events(response.iter_lines())


def check_usage(usage: dict[str, int], max_tokens: int) -> None:
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("model", MODELS)
def test_string_prompt(client: OpenAI, model: str) -> None:
    completion, body = complete(client, model=model, prompt=PROMPT, max_tokens=8)
    assert body["object"] == "text_completion"
    assert body["model"] == model
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["text"]
    assert choice["finish_reason"] in ("stop", "length")
    check_usage(body["usage"], 8)
    assert completion.choices[0].text == choice["text"]


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_max_tokens_gives_length(client: OpenAI, model: str) -> None:
    _, body = complete(client, model=model, prompt=PROMPT, max_tokens=2)
    assert body["choices"][0]["finish_reason"] == "length"
    check_usage(body["usage"], 2)


@pytest.mark.parametrize("model", MODELS)
def test_list_of_prompts(client: OpenAI, model: str) -> None:
    prompts = ["The sky is", "My favourite food is"]
    _, body = complete(client, model=model, prompt=prompts, max_tokens=6)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["text"] for c in choices)
    check_usage(body["usage"], 12)
    if model != EMBEDDED:
        assert [c["text"] for c in choices] == [f"You said: {p}" for p in prompts]


@pytest.mark.parametrize("model", MODELS)
def test_stream(client: OpenAI, model: str) -> None:
    events = complete_stream(
        client, model=model, prompt=PROMPT, max_tokens=8, stream_options={"include_usage": True}
    )
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert {e["model"] for e in events} == {model}
    assert completion_text(events)
    assert len(finish_reasons(events)) == 1
    *_, last = events
    assert last["choices"] == []
    check_usage(last["usage"], 8)


@pytest.mark.parametrize("model", MODELS)
def test_stream_sdk(client: OpenAI, model: str) -> None:
    with client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
    for event in events:
        validate_completion_event(event)
    assert completion_text(events)
    assert finish_reasons(events)[-1] in ("stop", "length")


async def test_async(aclient: AsyncOpenAI) -> None:
    for model in MODELS:
        raw = await aclient.completions.with_raw_response.create(
            model=model, prompt=PROMPT, max_tokens=6
        )
        body = json_body(raw)
        validate("CreateCompletionResponse", body)
        assert body["choices"][0]["text"]
        async with await aclient.completions.create(
            model=model, prompt=PROMPT, max_tokens=6, stream=True
        ) as stream:
            events = [event.model_dump(mode="json", exclude_unset=True) async for event in stream]
        for event in events:
            validate_completion_event(event)
        assert completion_text(events)


def test_stream_matches_non_stream_when_greedy(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": EMBEDDED, "prompt": PROMPT, "max_tokens": 8, **GREEDY}
    _, body = complete(client, **kwargs)
    assert completion_text(complete_stream(client, **kwargs)) == body["choices"][0]["text"]


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_echo(client: OpenAI, model: str) -> None:
    _, body = complete(client, model=model, prompt=PROMPT, max_tokens=4, echo=True)
    text = body["choices"][0]["text"]
    assert text.startswith(PROMPT)
    assert len(text) > len(PROMPT)


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_echo_when_streaming(client: OpenAI, model: str) -> None:
    events = complete_stream(client, model=model, prompt=PROMPT, max_tokens=4, echo=True)
    text = completion_text(events)
    assert text.startswith(PROMPT)
    assert len(text) > len(PROMPT)


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_logprobs(client: OpenAI, model: str) -> None:
    _, body = complete(client, model=model, prompt=PROMPT, max_tokens=5, logprobs=1, **GREEDY)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    tokens = logprobs["tokens"]
    assert len(tokens) == body["usage"]["completion_tokens"]
    assert "".join(tokens) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(tokens)
    assert len(logprobs["text_offset"]) == len(tokens)
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert len(logprobs["top_logprobs"]) == len(tokens)
    for token, top in zip(tokens, logprobs["top_logprobs"], strict=True):
        # The sampled token is always reported, so up to logprobs + 1 entries.
        assert 1 <= len(top) <= 2
        assert all(lp <= 0 for lp in top.values())
        assert token in top or len(top) == 1


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_logprobs_text_offsets(client: OpenAI, model: str) -> None:
    _, body = complete(client, model=model, prompt=PROMPT, max_tokens=5, logprobs=1, **GREEDY)
    logprobs = body["choices"][0]["logprobs"]
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    # Offsets count characters, either into the returned text or (as OpenAI does) into the
    # prompt followed by the completion.
    assert offsets[0] in (0, len(PROMPT))
    for offset, following, token in zip(offsets, offsets[1:], tokens, strict=False):
        assert following - offset == len(token)


def test_logprobs_when_streaming(client: OpenAI) -> None:
    events = complete_stream(
        client,
        model=EMBEDDED,
        prompt=PROMPT,
        max_tokens=5,
        logprobs=1,
        stream_options={"include_usage": True},
    )
    tokens = [
        token
        for event in events
        for choice in event["choices"]
        for token in (choice.get("logprobs") or {}).get("tokens", [])
    ]
    assert len(tokens) == events[-1]["usage"]["completion_tokens"]
    assert "".join(tokens) == completion_text(events)


def test_logprobs_keep_characters_split_over_tokens(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": EMBEDDED,
        "prompt": "My favourite emoji is",
        "max_tokens": 8,
        **GREEDY,
    }
    _, plain = complete(client, **kwargs)
    text = plain["choices"][0]["text"]
    if text.isascii():
        pytest.skip(f"the model no longer answers with a multi-token character: {text!r}")
    _, body = complete(client, logprobs=1, **kwargs)
    assert body["choices"][0]["text"] == text
    assert len(body["choices"][0]["logprobs"]["tokens"]) == body["usage"]["completion_tokens"]
