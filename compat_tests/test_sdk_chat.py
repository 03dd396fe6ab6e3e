"""POST /v1/chat/completions through the official SDK, every body checked against OpenAI's spec."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    EMBEDDED,
    EMBEDDED_ALIAS,
    PASSTHROUGH,
    UPSTREAM,
    chat_events,
    chat_text,
    error_body,
    finish_reasons,
    json_body,
)

MODELS = [EMBEDDED, UPSTREAM, PASSTHROUGH]
USER = [{"role": "user", "content": "Name three colours of the rainbow."}]
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1234}


def chat(client: OpenAI, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The SDK's parsed completion and the raw JSON it was parsed from, validated."""
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    assert raw.headers.get("x-request-id")
    body = json_body(raw)
    validate("CreateChatCompletionResponse", body)
    return raw.parse(), body


def chat_stream(client: OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    """The raw chunks of a streamed chat completion, each validated."""
    with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-request-id")
        return chat_events(response.iter_lines())


def check_chunks(chunks: list[dict[str, Any]], model: str) -> None:
    """One completion's chunks: same id and model, role first, exactly one finish reason."""
    assert chunks
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["model"] for c in chunks} == {model}
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len(finish_reasons(chunks)) == 1
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("model", MODELS)
def test_non_stream(client: OpenAI, model: str) -> None:
    completion, body = chat(client, model=model, messages=USER, max_tokens=16)
    assert body["model"] == model
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert completion.choices[0].message.content == choice["message"]["content"]
    assert completion.usage is not None
    assert completion.usage.total_tokens == usage["total_tokens"]


def test_alias_answers_as_the_model_id(client: OpenAI) -> None:
    _, body = chat(client, model=EMBEDDED_ALIAS, messages=USER, max_tokens=4)
    assert body["model"] == EMBEDDED


async def test_non_stream_async(aclient: AsyncOpenAI) -> None:
    for model in MODELS:
        raw = await aclient.chat.completions.with_raw_response.create(
            model=model, messages=USER, max_tokens=8
        )
        body = json_body(raw)
        validate("CreateChatCompletionResponse", body)
        assert body["choices"][0]["message"]["content"]
        assert raw.parse().choices[0].message.content == body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model", MODELS)
def test_stream_raw(client: OpenAI, model: str) -> None:
    chunks = chat_stream(client, model=model, messages=USER, max_tokens=16)
    check_chunks(chunks, model)
    assert chat_text(chunks)
    assert all(c.get("usage") is None for c in chunks)


@pytest.mark.parametrize("model", MODELS)
def test_stream_sdk(client: OpenAI, model: str) -> None:
    with client.chat.completions.create(
        model=model, messages=USER, max_tokens=16, stream=True
    ) as stream:
        chunks = [chunk.model_dump(mode="json", exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    check_chunks(chunks, model)
    assert chat_text(chunks)


@pytest.mark.parametrize("model", MODELS)
async def test_stream_async(aclient: AsyncOpenAI, model: str) -> None:
    async with await aclient.chat.completions.create(
        model=model,
        messages=USER,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = [chunk.model_dump(mode="json", exclude_unset=True) async for chunk in stream]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    check_chunks(chunks, model)
    assert chat_text(chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] <= 16


async def test_stream_async_raw(aclient: AsyncOpenAI) -> None:
    for model in MODELS:
        async with aclient.chat.completions.with_streaming_response.create(
            model=model, messages=USER, max_tokens=8, stream=True
        ) as response:
            lines = [line async for line in response.iter_lines()]
        chunks = chat_events(lines)
        check_chunks(chunks, model)
        assert chat_text(chunks)


@pytest.mark.parametrize("model", MODELS)
def test_stream_include_usage(client: OpenAI, model: str) -> None:
    chunks = chat_stream(
        client,
        model=model,
        messages=USER,
        max_tokens=12,
        stream_options={"include_usage": True},
    )
    check_chunks(chunks, model)
    *content, last = chunks
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["choices"] and c.get("usage") is None for c in content)
    assert chat_text(chunks)


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_length(client: OpenAI, model: str, limit: str) -> None:
    _, body = chat(client, model=model, messages=USER, **{limit: 2})
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"]
    assert 0 < body["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_token_limit_gives_length_when_streaming(client: OpenAI, model: str) -> None:
    chunks = chat_stream(
        client,
        model=model,
        messages=USER,
        max_completion_tokens=3,
        stream_options={"include_usage": True},
    )
    assert finish_reasons(chunks) == ["length"]
    assert 0 < chunks[-1]["usage"]["completion_tokens"] <= 3


def logprob_entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The token logprob entries of a choice or chunk choice (none when it has no logprobs)."""
    entries: list[dict[str, Any]] = (choice.get("logprobs") or {}).get("content") or []
    return entries


def stop_word(text: str) -> str:
    """A word from the middle of text, to stop on."""
    words = text.split()
    assert len(words) >= 3, text
    return words[2]


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_stop_sequence(client: OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "alpha beta gamma delta epsilon"}]
    _, full = chat(client, model=model, messages=messages, max_tokens=24, **GREEDY)
    text = full["choices"][0]["message"]["content"]
    stop = stop_word(text)
    expected = text[: text.index(stop)]

    _, body = chat(client, model=model, messages=messages, max_tokens=24, stop=[stop], **GREEDY)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"

    chunks = chat_stream(client, model=model, messages=messages, max_tokens=24, stop=stop, **GREEDY)
    assert chat_text(chunks) == expected
    assert finish_reasons(chunks) == ["stop"]


def test_temperature_zero_and_seed_repeat_exactly(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": EMBEDDED, "messages": USER, "max_tokens": 24, **GREEDY}
    _, first = chat(client, **kwargs)
    _, second = chat(client, **kwargs)
    text = first["choices"][0]["message"]["content"]
    assert text
    assert second["choices"][0]["message"]["content"] == text
    assert chat_text(chat_stream(client, **kwargs)) == text


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_logprobs(client: OpenAI, model: str) -> None:
    _, body = chat(
        client, model=model, messages=USER, max_tokens=6, logprobs=True, top_logprobs=2, **GREEDY
    )
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    for entry in entries:
        assert entry["logprob"] <= 0
        assert 1 <= len(entry["top_logprobs"]) <= 2
        assert all(top["logprob"] <= 0 for top in entry["top_logprobs"])
    if model == EMBEDDED:
        assert all(len(entry["top_logprobs"]) == 2 for entry in entries)
    spelled = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert spelled.decode() == choice["message"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_keep_characters_split_over_tokens(client: OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": EMBEDDED,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 1,
    }
    _, plain = chat(client, **kwargs)
    text = plain["choices"][0]["message"]["content"]
    if text.isascii():
        pytest.skip(f"the model no longer answers with a multi-token character: {text!r}")
    if stream:
        chunks = chat_stream(client, logprobs=True, top_logprobs=2, **kwargs)
        got = chat_text(chunks)
        entries = [e for c in chunks if c["choices"] for e in logprob_entries(c["choices"][0])]
    else:
        _, body = chat(client, logprobs=True, top_logprobs=2, **kwargs)
        got = body["choices"][0]["message"]["content"]
        entries = logprob_entries(body["choices"][0])
    assert got == text
    assert all(entry["bytes"] for entry in entries)
    # Token bytes rebuild the content; a character cut off by max_tokens is left out of it.
    joined = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert joined.startswith(text.encode())
    assert len(joined) - len(text.encode()) < 4


def test_logprobs_when_streaming(client: OpenAI) -> None:
    chunks = chat_stream(
        client,
        model=EMBEDDED,
        messages=USER,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    entries = [e for chunk in chunks for c in chunk["choices"] for e in logprob_entries(c)]
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in entries)


@pytest.mark.parametrize("model", MODELS)
def test_developer_role_and_text_parts(client: OpenAI, model: str) -> None:
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "system", "content": [{"type": "text", "text": "Be polite."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}],
        },
    ]
    _, body = chat(client, model=model, messages=messages, max_tokens=8)
    content = body["choices"][0]["message"]["content"]
    assert content
    if model != EMBEDDED:
        assert content == "You said: Say hello."


@pytest.mark.parametrize("model", MODELS)
def test_unknown_fields_are_ignored(client: OpenAI, model: str) -> None:
    _, body = chat(
        client,
        model=model,
        messages=USER,
        max_tokens=4,
        extra_body={"not_an_openai_field": True, "vendor": {"nested": [1, 2]}},
    )
    assert body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_n_above_one_is_a_bad_request(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=USER, max_tokens=4, n=2)
    error = error_body(caught.value, 400)
    assert error["param"] == "n"
    assert error["type"] == "invalid_request_error"
