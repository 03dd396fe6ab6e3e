"""POST /v1/fim/completions (Mistral's FIM API) on the mock backend and a remote one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import respx

from app.api.openai.fim import completion_request
from app.protocol import FimCompletionRequest, StreamOptions
from tests.app.api.openai.test_chat import sse_events
from tests.conftest import AUTH, AppClient, make_config

UPSTREAM = "http://upstream.test/v1"
PROMPT = "def add(a, b):"
SUFFIX = "return c"
FILLED = "You said: def add(a, b): before: return c"


async def fim(client: AppClient, path: str = "/v1/fim/completions", **body: Any) -> Any:
    body = {"model": "mock", "prompt": PROMPT, "suffix": SUFFIX, **body}
    r = await client.post(path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r


def content(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events)


async def test_answer_is_chat_completion_shaped(client: AppClient) -> None:
    body = (await fim(client)).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "mock"
    assert body["id"]
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == FILLED
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


async def test_without_suffix_it_is_a_plain_completion(client: AppClient) -> None:
    body = (await fim(client, suffix=None)).json()
    assert body["choices"][0]["message"]["content"] == f"You said: {PROMPT}"


async def test_unversioned_path(client: AppClient) -> None:
    body = (await fim(client, path="/fim/completions")).json()
    assert body["choices"][0]["message"]["content"] == FILLED


async def test_stream_is_chat_chunks_with_usage_on_the_last(client: AppClient) -> None:
    r = await fim(client, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(len(c["choices"]) == 1 for c in chunks)  # no choice-less usage chunk
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert content(chunks) == FILLED
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_is_honoured(client: AppClient, stream: bool) -> None:
    r = await fim(client, stop=["before"], stream=stream)
    if stream:
        chunks = sse_events(r.text)[:-1]
        text, finish = content(chunks), chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = r.json()["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    assert text == "You said: def add(a, b): "
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_is_honoured(client: AppClient, stream: bool, field: str) -> None:
    r = await fim(client, stream=stream, **{field: 3})
    if stream:
        chunks = sse_events(r.text)[:-1]
        text, finish = content(chunks), chunks[-1]["choices"][0]["finish_reason"]
        usage = chunks[-1]["usage"]
    else:
        choice = r.json()["choices"][0]
        text, finish, usage = (
            choice["message"]["content"],
            choice["finish_reason"],
            r.json()["usage"],
        )
    assert text == "You said: def "
    assert finish == "length"
    assert usage["completion_tokens"] == 3


async def test_failure_mid_stream_is_an_error_event(client: AppClient) -> None:
    r = await fim(client, model="broken", stream=True)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    assert content(events[:-2]) == "You said: "


def test_mistral_fields_map_onto_a_completion() -> None:
    req = msgspec.convert(
        {
            "model": "m",
            "prompt": "p",
            "suffix": "s",
            "random_seed": 7,
            "min_tokens": 1,
            "stop": "x",
            "temperature": 0.2,
            "top_p": 0.9,
            "stream": True,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.25,
        },
        FimCompletionRequest,
    )
    completion = completion_request(req)
    assert completion.suffix == "s"
    assert completion.seed == 7
    assert completion.stop == "x"
    assert (completion.temperature, completion.top_p) == (0.2, 0.9)
    assert (completion.frequency_penalty, completion.presence_penalty) == (0.5, 0.25)
    assert completion.stream_options == StreamOptions(include_usage=True)
    assert completion_request(msgspec.structs.replace(req, stream=None)).stream_options is None


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"suffix": 3}, "suffix"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"random_seed": "x"}, "random_seed"),
        ({"model": None}, "model"),
    ],
)
async def test_bad_request_is_400_naming_the_field(
    client: AppClient, change: dict[str, Any], param: str
) -> None:
    body = {"model": "mock", "prompt": "p", **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = await client.post("/v1/fim/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_missing_key_is_401(client: AppClient) -> None:
    r = await client.post("/v1/fim/completions", json={"model": "mock", "prompt": "p"})
    assert r.status_code == 401


async def test_unknown_model_is_404(client: AppClient) -> None:
    r = await client.post(
        "/v1/fim/completions", json={"model": "nope", "prompt": "p"}, headers=AUTH
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# ---- a remote backend: the suffix is forwarded to its /completions


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.get("/models").respond(200, json={"object": "list", "data": []})
        yield router


def remote_config() -> Any:
    # Same name upstream: stream events pass through as raw JSON, which the route decodes.
    return make_config([{"id": "coder", "backend": UPSTREAM, "options": {"transport": "httpx"}}])


def completion_event(text: str, finish: str | None, usage: dict[str, int] | None = None) -> str:
    event: dict[str, Any] = {
        "id": "cmpl-up",
        "object": "text_completion",
        "created": 1,
        "model": "coder",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
        if usage is None
        else [],
    }
    if usage is not None:
        event["usage"] = usage
    return f"data: {json.dumps(event)}\n\n"


async def test_remote_gets_the_suffix(upstream: respx.MockRouter, make_client: Any) -> None:
    route = upstream.post("/completions").respond(
        200,
        json={
            "id": "cmpl-up",
            "object": "text_completion",
            "created": 1,
            "model": "coder",
            "choices": [{"text": " return a + b", "index": 0, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11},
        },
    )
    async with make_client(remote_config()) as client:
        r = await fim(client, model="coder", max_tokens=20, random_seed=3)
    sent = json.loads(route.calls.last.request.content)
    assert sent["prompt"] == PROMPT
    assert sent["suffix"] == SUFFIX
    assert sent["max_tokens"] == 20
    assert sent["seed"] == 3
    body = r.json()
    assert body["id"] == "cmpl-up"
    assert body["choices"][0]["message"]["content"] == " return a + b"
    assert body["usage"]["total_tokens"] == 11


async def test_remote_stream_is_converted(upstream: respx.MockRouter, make_client: Any) -> None:
    sse = (
        completion_event(" return", None)
        + completion_event(" a + b", None)
        + completion_event("", "length")
        + completion_event(
            "", None, {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}
        )
        + "data: [DONE]\n\n"
    )
    route = upstream.post("/completions").respond(
        200, content=sse.encode(), headers={"content-type": "text/event-stream"}
    )
    async with make_client(remote_config()) as client:
        r = await fim(client, model="coder", stream=True)
    sent = json.loads(route.calls.last.request.content)
    assert sent["suffix"] == SUFFIX
    assert sent["stream_options"] == {"include_usage": True}
    chunks = sse_events(r.text)[:-1]
    assert content(chunks) == " return a + b"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["total_tokens"] == 8
