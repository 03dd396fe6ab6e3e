"""POST /v1/completions on the mock backend."""

from __future__ import annotations

from typing import Any

import pytest

from tests.app.api.openai.test_chat import sse_events
from tests.conftest import AUTH, AppClient


async def test_string_prompt(client: AppClient) -> None:
    r = await client.post("/v1/completions", json={"model": "fixed", "prompt": "hi"}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"text": "one two three four five", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"]["completion_tokens"] == 5


async def test_default_max_tokens_is_16(client: AppClient) -> None:
    long_prompt = " ".join(["w"] * 40)
    r = await client.post(
        "/v1/completions", json={"model": "mock", "prompt": long_prompt}, headers=AUTH
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_list_of_prompts_gives_a_choice_each(client: AppClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "mock", "prompt": ["a", "b c"]}, headers=AUTH
    )
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == ["You said: a", "You said: b c"]


async def test_echo_and_logprobs(client: AppClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"model": "fixed", "prompt": "P: ", "echo": True, "logprobs": 1, "max_tokens": 2},
        headers=AUTH,
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == "P: one two "
    assert choice["logprobs"]["tokens"] == ["one ", "two "]
    assert choice["logprobs"]["text_offset"] == [3, 7]


async def test_stream(client: AppClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "model": "fixed",
            "prompt": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=AUTH,
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "one two three four five"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("prompt", "stream"),
    [([], False), ([1, "a"], False), ([[1], []], False), ({"a": 1}, False), (["a", "b"], True)],
)
async def test_bad_prompts(client: AppClient, prompt: Any, stream: bool) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "mock", "prompt": prompt, "stream": stream}, headers=AUTH
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


async def test_missing_prompt(client: AppClient) -> None:
    r = await client.post("/v1/completions", json={"model": "mock"}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
