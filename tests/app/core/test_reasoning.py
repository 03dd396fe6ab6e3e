"""`think_tags`: a leading <think> block becomes reasoning_content; reasoning passes through."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

from app.api.app import create_app
from app.core.gateway import Gateway
from app.core.reasoning import ThinkSplitter
from tests.conftest import AUTH, AppClient, make_config

REPLY = "<think>Two and two.\nIs four.</think>\n\nThe answer is 4."


def split_all(text: str, step: int) -> tuple[str, str]:
    splitter = ThinkSplitter()
    reasoning, content = "", ""
    for start in range(0, len(text), step):
        r, c = splitter.feed(text[start : start + step])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 100])
def test_the_split_does_not_depend_on_chunk_boundaries(step: int) -> None:
    assert split_all(REPLY, step) == ("Two and two.\nIs four.", "The answer is 4.")
    assert split_all("  " + REPLY, step)[0] == "Two and two.\nIs four."
    assert split_all("No thinking here.", step) == ("", "No thinking here.")
    assert split_all("<thin air", step) == ("", "<thin air")
    assert split_all("<think>never closed", step) == ("never closed", "")
    assert split_all("<", step) == ("", "<")


def client_for(**model: Any) -> AppClient:
    config = make_config([{"id": "r", "backend": "mock:", "options": {"reply": REPLY}, **model}])
    return AppClient(create_app(Gateway.from_config(config)))


BODY = {"model": "r", "messages": [{"role": "user", "content": "2+2?"}]}


async def test_think_tags_split_a_whole_reply() -> None:
    async with client_for(think_tags=True) as client:
        r = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
        message = r.json()["choices"][0]["message"]
        assert message["reasoning_content"] == "Two and two.\nIs four."
        assert message["content"] == "The answer is 4."


async def test_think_tags_split_a_stream() -> None:
    async with client_for(think_tags=True) as client:
        r = await client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=AUTH)
        events = [
            json.loads(block.removeprefix("data: "))
            for block in r.text.strip().split("\n\n")
            if block != "data: [DONE]"
        ]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two and two.\nIs four."
        assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_without_think_tags_the_reply_is_untouched() -> None:
    async with client_for() as client:
        r = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
        message = r.json()["choices"][0]["message"]
        assert message["content"] == REPLY
        assert "reasoning_content" not in message


async def test_reasoning_content_of_a_remote_backend_passes_through() -> None:
    config = make_config(
        [
            {
                "id": "remote",
                "backend": "http://upstream.test/v1",
                "options": {"transport": "httpx"},
            }
        ]
    )
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "remote",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "4", "reasoning_content": "2+2"},
                "finish_reason": "stop",
            }
        ],
    }
    chunk = {**answer, "object": "chat.completion.chunk"}
    chunk["choices"] = [
        {"index": 0, "delta": {"reasoning_content": "2+2", "content": "4"}, "finish_reason": None}
    ]
    stream = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    with respx.mock(base_url="http://upstream.test/v1", assert_all_called=False) as upstream:
        upstream.post("/chat/completions").mock(
            side_effect=lambda request: httpx.Response(
                200,
                content=stream if b'"stream":true' in request.content else json.dumps(answer),
                headers={"content-type": "text/event-stream"},
            )
        )
        async with AppClient(create_app(Gateway.from_config(config))) as client:
            body = {**BODY, "model": "remote"}
            r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
            assert r.json()["choices"][0]["message"]["reasoning_content"] == "2+2"
            r = await client.post(
                "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
            )
            first = json.loads(r.text.split("\n\n")[0].removeprefix("data: "))
            assert first["choices"][0]["delta"]["reasoning_content"] == "2+2"
