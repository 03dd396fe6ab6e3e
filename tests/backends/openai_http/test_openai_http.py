"""The OpenAI-compatible HTTP backend against a respx-mocked upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import httpx
import msgspec
import pytest
import respx

from app.config import ConfigError, ModelConfig
from app.errors import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    StreamItem,
)
from backends.base import BackendSpec
from backends.openai_http.backend import OpenAIHTTPBackend
from backends.openai_http.transport import PooledTransport
from backends.registry import build_backend
from tests.serving import serve

BASE = "http://upstream.test/v1"
PUBLIC = "pub"
LIMIT_S = 5.0

Factory = Callable[..., OpenAIHTTPBackend]


@pytest.fixture
async def make_backend() -> AsyncIterator[Factory]:
    """Build backends for the public id `pub` at BASE; all are closed after the test.

    They use httpx's own transport, the only one respx intercepts.
    """
    built: list[OpenAIHTTPBackend] = []

    def build(target: str = BASE, timeout_s: float = 5.0, **options: Any) -> OpenAIHTTPBackend:
        options.setdefault("transport", "httpx")
        model = ModelConfig(id=PUBLIC, backend=target, options=options)
        backend = OpenAIHTTPBackend(
            BackendSpec(model=model, scheme="http", target=target, timeout_s=timeout_s)
        )
        built.append(backend)
        return backend

    yield build
    for backend in built:
        await backend.aclose()


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    """The mocked upstream; any request it has no route for fails the test."""
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


# ---- wire fixtures


def chat_request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": PUBLIC, "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


def completion_request(**fields: Any) -> CompletionRequest:
    body = {"model": PUBLIC, "prompt": "Once upon", **fields}
    return msgspec.json.decode(json.dumps(body), type=CompletionRequest)


def embedding_request(**fields: Any) -> EmbeddingRequest:
    body = {"model": PUBLIC, "input": ["a", "b"], **fields}
    return msgspec.json.decode(json.dumps(body), type=EmbeddingRequest)


CHAT_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "upstream-model-2024",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
COMPLETION_RESPONSE = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "upstream-model-2024",
    "choices": [{"text": " a time", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}
EMBEDDING_RESPONSE = {
    "object": "list",
    "data": [
        {"object": "embedding", "embedding": [0.1, 0.2], "index": 0},
        {"object": "embedding", "embedding": [0.3, 0.4], "index": 1},
    ],
    "model": "upstream-model-2024",
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}


def chat_chunk(content: str, *, model: str = PUBLIC, finish: str | None = None) -> bytes:
    """Chunk JSON with non-canonical spacing, so re-encoding would be visible."""
    delta = json.dumps({"content": content})
    return (
        f'{{"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000, '
        f'"model": "{model}",  "choices": [{{"index": 0, "delta": {delta}, '
        f'"finish_reason": {json.dumps(finish)}}}]}}'
    ).encode()


def completion_chunk(text: str, *, model: str) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-s",
            "object": "text_completion",
            "created": 1700000000,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}],
        }
    ).encode()


def sse(*payloads: bytes, done: bool = True, sep: bytes = b"\n\n") -> bytes:
    events = [b"data: " + payload + sep for payload in payloads]
    if done:
        events.append(b"data: [DONE]" + sep)
    return b"".join(events)


def sse_response(body: bytes | AsyncIterator[bytes], status: int = 200) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": "text/event-stream"}, content=body)


def sent_json(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


async def collect(stream: AsyncIterator[StreamItem]) -> list[StreamItem]:
    async with asyncio.timeout(LIMIT_S):
        return [item async for item in stream]


async def drain(stream: AsyncIterator[StreamItem], into: list[StreamItem]) -> None:
    """Like `collect`, but keeps what arrived before a failure."""
    async with asyncio.timeout(LIMIT_S):
        async for item in stream:
            into.append(item)


# One entry per non-streamed call: (backend method, upstream path, request, response).
NonStreamCall = tuple[str, str, Callable[..., msgspec.Struct], dict[str, Any]]
NON_STREAM_CALLS: list[NonStreamCall] = [
    ("chat", "/chat/completions", chat_request, CHAT_RESPONSE),
    ("complete", "/completions", completion_request, COMPLETION_RESPONSE),
    ("embed", "/embeddings", embedding_request, EMBEDDING_RESPONSE),
]
NON_STREAM_IDS = ["chat", "complete", "embed"]


async def call(backend: OpenAIHTTPBackend, method: str, req: msgspec.Struct) -> Any:
    async with asyncio.timeout(LIMIT_S):
        result: Awaitable[Any] = getattr(backend, method)(req)
        return await result


# ---- non-streamed calls


@pytest.mark.parametrize(
    ("method", "path", "make_req", "response"), NON_STREAM_CALLS, ids=NON_STREAM_IDS
)
async def test_non_stream_rewrites_model_both_ways(
    make_backend: Factory,
    upstream: respx.MockRouter,
    method: str,
    path: str,
    make_req: Callable[..., msgspec.Struct],
    response: dict[str, Any],
) -> None:
    route = upstream.post(path).respond(200, json=response)
    backend = make_backend(upstream_model="upstream-model")

    result = await call(backend, method, make_req(user="u-1"))

    sent = sent_json(route)
    assert sent["model"] == "upstream-model"
    assert sent["user"] == "u-1"
    assert result.model == PUBLIC
    expected = {**response, "model": PUBLIC}
    assert json.loads(msgspec.json.encode(result)) == expected


@pytest.mark.parametrize(
    ("method", "path", "req", "expected"),
    [
        (
            "chat",
            "/chat/completions",
            chat_request(temperature=0.5, max_tokens=7),
            {
                "model": "up",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.5,
                "max_tokens": 7,
            },
        ),
        ("complete", "/completions", completion_request(), {"model": "up", "prompt": "Once upon"}),
        ("embed", "/embeddings", embedding_request(), {"model": "up", "input": ["a", "b"]}),
        (
            "embed",
            "/embeddings",
            embedding_request(dimensions=8, encoding_format="base64"),
            {"model": "up", "input": ["a", "b"], "dimensions": 8, "encoding_format": "base64"},
        ),
    ],
    ids=["chat", "complete", "embed", "embed-options"],
)
async def test_body_holds_only_fields_the_client_set(
    make_backend: Factory,
    upstream: respx.MockRouter,
    method: str,
    path: str,
    req: msgspec.Struct,
    expected: dict[str, Any],
) -> None:
    responses = {
        "chat": CHAT_RESPONSE,
        "complete": COMPLETION_RESPONSE,
        "embed": EMBEDDING_RESPONSE,
    }
    route = upstream.post(path).respond(200, json=responses[method])

    await call(make_backend(upstream_model="up"), method, req)

    assert sent_json(route) == expected
    assert route.calls.last.request.headers["content-type"] == "application/json"


async def test_upstream_model_defaults_to_public_id(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)

    result = await call(make_backend(), "chat", chat_request())

    assert sent_json(route)["model"] == PUBLIC
    assert result.model == PUBLIC


async def test_non_stream_call_never_asks_upstream_to_stream(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)
    req = chat_request(stream=True, stream_options={"include_usage": True})

    result = await call(make_backend(), "chat", req)

    assert "stream" not in sent_json(route)
    assert "stream_options" not in sent_json(route)
    assert isinstance(result, ChatCompletion)


async def test_result_types(make_backend: Factory, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)
    upstream.post("/completions").respond(200, json=COMPLETION_RESPONSE)
    upstream.post("/embeddings").respond(200, json=EMBEDDING_RESPONSE)
    backend = make_backend()

    assert isinstance(await call(backend, "chat", chat_request()), ChatCompletion)
    assert isinstance(await call(backend, "complete", completion_request()), Completion)
    embeddings = await call(backend, "embed", embedding_request())
    assert isinstance(embeddings, EmbeddingList)
    assert [e.embedding for e in embeddings.data] == [[0.1, 0.2], [0.3, 0.4]]


# ---- headers


async def test_api_key_option_is_bearer_auth(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)

    await call(make_backend(api_key="sk-option"), "chat", chat_request())

    assert route.calls.last.request.headers["authorization"] == "Bearer sk-option"


async def test_api_key_env_is_preferred_over_api_key(
    make_backend: Factory, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAWBOT_TEST_UPSTREAM_KEY", "sk-from-env")
    route = upstream.post("/embeddings").respond(200, json=EMBEDDING_RESPONSE)
    backend = make_backend(api_key_env="CLAWBOT_TEST_UPSTREAM_KEY", api_key="sk-option")

    await call(backend, "embed", embedding_request())

    assert route.calls.last.request.headers["authorization"] == "Bearer sk-from-env"


async def test_api_key_env_unset_falls_back_to_api_key(
    make_backend: Factory, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLAWBOT_TEST_UPSTREAM_KEY", raising=False)
    route = upstream.post("/embeddings").respond(200, json=EMBEDDING_RESPONSE)
    backend = make_backend(api_key_env="CLAWBOT_TEST_UPSTREAM_KEY", api_key="sk-option")

    await call(backend, "embed", embedding_request())

    assert route.calls.last.request.headers["authorization"] == "Bearer sk-option"


async def test_no_key_sends_no_authorization(
    make_backend: Factory, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLAWBOT_TEST_UPSTREAM_KEY", raising=False)
    route = upstream.post("/completions").respond(200, json=COMPLETION_RESPONSE)

    await call(
        make_backend(api_key_env="CLAWBOT_TEST_UPSTREAM_KEY"), "complete", completion_request()
    )

    assert "authorization" not in route.calls.last.request.headers


async def test_extra_headers_are_sent_on_every_request(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    chat = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)
    models = upstream.get("/models").respond(200, json={"object": "list", "data": []})
    backend = make_backend(headers={"X-Org": "org-1", "X-Trace": "t"}, api_key="sk-1")

    await call(backend, "chat", chat_request())
    assert await backend.health()

    for route in (chat, models):
        headers = route.calls.last.request.headers
        assert headers["x-org"] == "org-1"
        assert headers["x-trace"] == "t"
        assert headers["authorization"] == "Bearer sk-1"


async def test_api_key_replaces_an_authorization_header_option(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)
    backend = make_backend(headers={"Authorization": "Bearer stale"}, api_key="sk-1")

    await call(backend, "chat", chat_request())

    assert route.calls.last.request.headers.get_list("authorization") == ["Bearer sk-1"]


# ---- streaming


async def test_stream_passes_chunks_through_as_exact_bytes(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    chunks = [chat_chunk("Hel"), chat_chunk("lo"), chat_chunk("", finish="stop")]
    body = b": keep-alive\n\ndata:\n\nevent: message\n" + sse(*chunks)
    route = upstream.post("/chat/completions").mock(return_value=sse_response(body))

    items = await collect(make_backend().stream_chat(chat_request(stream=True)))

    assert all(isinstance(item, msgspec.Raw) for item in items)
    assert [bytes(item) for item in items if isinstance(item, msgspec.Raw)] == chunks
    sent = sent_json(route)
    assert sent["model"] == PUBLIC
    assert sent["stream"] is True


async def test_stream_chunks_are_rewritten_when_upstream_model_differs(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    chunks = [chat_chunk(text, model="up") for text in ("a", "b", "c")]
    route = upstream.post("/chat/completions").mock(return_value=sse_response(sse(*chunks)))

    items = await collect(make_backend(upstream_model="up").stream_chat(chat_request(stream=True)))

    assert all(isinstance(item, ChatCompletionChunk) for item in items)
    assert [item.model for item in items if isinstance(item, ChatCompletionChunk)] == [PUBLIC] * 3
    contents = [
        item.choices[0].delta.content for item in items if isinstance(item, ChatCompletionChunk)
    ]
    assert contents == ["a", "b", "c"]
    assert sent_json(route)["model"] == "up"


async def test_stream_request_body(make_backend: Factory, upstream: respx.MockRouter) -> None:
    route = upstream.post("/chat/completions").mock(return_value=sse_response(sse()))
    req = chat_request(stream=True, stream_options={"include_usage": True}, seed=3)

    assert await collect(make_backend(upstream_model="up").stream_chat(req)) == []

    assert sent_json(route) == {
        "model": "up",
        "messages": [{"role": "user", "content": "hi"}],
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_stream_always_asks_upstream_to_stream(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").mock(return_value=sse_response(sse()))

    await collect(make_backend().stream_chat(chat_request()))

    assert sent_json(route)["stream"] is True


async def test_stream_completions(make_backend: Factory, upstream: respx.MockRouter) -> None:
    chunks = [completion_chunk(text, model="up") for text in (" a", " time")]
    route = upstream.post("/completions").mock(return_value=sse_response(sse(*chunks)))
    req = completion_request(stream=True)

    items = await collect(make_backend(upstream_model="up").stream_complete(req))

    assert all(isinstance(item, Completion) for item in items)
    assert [
        (item.model, item.choices[0].text) for item in items if isinstance(item, Completion)
    ] == [
        (PUBLIC, " a"),
        (PUBLIC, " time"),
    ]
    assert sent_json(route)["stream"] is True


async def test_stream_stops_at_done(make_backend: Factory, upstream: respx.MockRouter) -> None:
    body = sse(chat_chunk("a")) + sse(chat_chunk("after done"), done=False)
    upstream.post("/chat/completions").mock(return_value=sse_response(body))

    items = await collect(make_backend().stream_chat(chat_request(stream=True)))

    assert [bytes(item) for item in items if isinstance(item, msgspec.Raw)] == [chat_chunk("a")]


async def test_stream_handles_crlf_and_no_space_after_colon(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    body = b"data:" + chat_chunk("a") + b"\r\n\r\ndata:[DONE]\r\n\r\n"
    upstream.post("/chat/completions").mock(return_value=sse_response(body))

    items = await collect(make_backend().stream_chat(chat_request(stream=True)))

    assert [bytes(item) for item in items if isinstance(item, msgspec.Raw)] == [chat_chunk("a")]


async def test_stream_is_incremental(make_backend: Factory, upstream: respx.MockRouter) -> None:
    """The second chunk is only sent once the first came out of the backend."""
    first_seen = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield sse(chat_chunk("first"), done=False)
        await first_seen.wait()
        yield sse(chat_chunk("second"))

    upstream.post("/chat/completions").mock(side_effect=lambda request: sse_response(body()))
    stream = make_backend().stream_chat(chat_request(stream=True))

    async with asyncio.timeout(LIMIT_S):
        first = await anext(stream)
        first_seen.set()
        rest = [item async for item in stream]

    assert isinstance(first, msgspec.Raw)
    assert bytes(first) == chat_chunk("first")
    assert [bytes(item) for item in rest if isinstance(item, msgspec.Raw)] == [chat_chunk("second")]


class EndlessStream(httpx.AsyncByteStream):
    """An upstream body that sends one chunk, then nothing until it is closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse(chat_chunk("first"), done=False)
        await self.closed.wait()

    async def aclose(self) -> None:
        self.closed.set()


async def test_closing_a_stream_early_closes_the_upstream_response(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    body = EndlessStream()
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    )
    stream = make_backend().stream_chat(chat_request(stream=True))

    async with asyncio.timeout(LIMIT_S):
        await anext(stream)
        assert not body.closed.is_set()
        await stream.aclose()  # type: ignore[attr-defined]

    assert body.closed.is_set()


@pytest.mark.parametrize(
    "error_event",
    [
        b'{"error": {"message": "out of memory", "type": "server_error", "code": 500}}',
        b'{ "error" : {"message": "out of memory", "type": "server_error", "code": 500}}',
    ],
    ids=["compact", "spaced"],
)
async def test_mid_stream_error_event_raises(
    make_backend: Factory, upstream: respx.MockRouter, error_event: bytes
) -> None:
    body = sse(chat_chunk("a"), error_event, chat_chunk("never"))
    upstream.post("/chat/completions").mock(return_value=sse_response(body))
    stream = make_backend().stream_chat(chat_request(stream=True))
    received: list[StreamItem] = []

    with pytest.raises(UpstreamStatusError) as info:
        await drain(stream, received)

    assert len(received) == 1
    assert info.value.message == "out of memory"
    assert info.value.error_type == "server_error"
    assert info.value.code == "500"
    assert info.value.status_code == 502


async def test_mid_stream_string_error_raises(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    body = sse(b'{"error": "model crashed"}')
    upstream.post("/chat/completions").mock(return_value=sse_response(body))

    with pytest.raises(UpstreamStatusError, match="model crashed") as info:
        await collect(make_backend(upstream_model="up").stream_chat(chat_request(stream=True)))

    assert info.value.status_code == 502


async def test_invalid_chunk_raises_upstream_error(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    body = sse(b'{"id": "x", "choices": "not a list"}')
    upstream.post("/chat/completions").mock(return_value=sse_response(body))

    with pytest.raises(UpstreamError, match="invalid chunk") as info:
        await collect(make_backend(upstream_model="up").stream_chat(chat_request(stream=True)))

    assert not isinstance(info.value, UpstreamStatusError)
    assert info.value.status_code == 502


@pytest.mark.parametrize(
    ("exc", "expected", "status"),
    [
        (httpx.ReadTimeout("read timed out"), UpstreamTimeout, 504),
        (httpx.ReadError("connection reset"), UpstreamError, 502),
        (httpx.RemoteProtocolError("incomplete chunked read"), UpstreamError, 502),
    ],
    ids=["read-timeout", "read-error", "protocol-error"],
)
async def test_transport_failure_mid_stream(
    make_backend: Factory,
    upstream: respx.MockRouter,
    exc: Exception,
    expected: type[Exception],
    status: int,
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield sse(chat_chunk("a"), done=False)
        raise exc

    upstream.post("/chat/completions").mock(side_effect=lambda request: sse_response(body()))
    stream = make_backend().stream_chat(chat_request(stream=True))

    async with asyncio.timeout(LIMIT_S):
        assert bytes(await anext(stream)) == chat_chunk("a")  # type: ignore[arg-type]
        with pytest.raises(expected) as info:
            await anext(stream)

    assert type(info.value) is expected
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert info.value.__cause__ is exc


# ---- upstream error statuses (before any chunk), streamed and not


async def raise_from(backend: OpenAIHTTPBackend, streamed: bool) -> None:
    if streamed:
        await collect(backend.stream_chat(chat_request(stream=True)))
    else:
        await call(backend, "chat", chat_request())


@pytest.fixture(params=[False, True], ids=["non-stream", "stream"])
def streamed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_400_relays_param_and_type(
    make_backend: Factory, upstream: respx.MockRouter, streamed: bool
) -> None:
    error = {
        "error": {
            "message": "temperature is too high",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    upstream.post("/chat/completions").respond(400, json=error)

    with pytest.raises(UpstreamStatusError) as info:
        await raise_from(make_backend(), streamed)

    err = info.value
    assert (err.status_code, err.upstream_status) == (400, 400)
    assert err.message == "temperature is too high"
    assert err.error_type == "invalid_request_error"
    assert err.param == "temperature"
    assert err.code == "invalid_value"
    assert err.retry_after is None


async def test_404_model_not_found(
    make_backend: Factory, upstream: respx.MockRouter, streamed: bool
) -> None:
    error = {
        "error": {
            "message": "The model `up` does not exist",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    upstream.post("/chat/completions").respond(404, json=error)

    with pytest.raises(UpstreamStatusError, match="does not exist") as info:
        await raise_from(make_backend(upstream_model="up"), streamed)

    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param is None


@pytest.mark.parametrize(("header", "expected"), [("7", 7.0), ("1.5", 1.5)])
async def test_429_keeps_retry_after(
    make_backend: Factory,
    upstream: respx.MockRouter,
    streamed: bool,
    header: str,
    expected: float,
) -> None:
    error = {"error": {"message": "Rate limit reached", "type": "requests", "code": 429}}
    upstream.post("/chat/completions").respond(429, json=error, headers={"retry-after": header})

    with pytest.raises(UpstreamStatusError) as info:
        await raise_from(make_backend(), streamed)

    assert info.value.status_code == 429
    assert info.value.retry_after == expected
    assert info.value.code == "429"
    assert info.value.error_type == "requests"


async def test_retry_after_http_date_is_ignored(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").respond(
        429,
        json={"error": {"message": "slow down"}},
        headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
    )

    with pytest.raises(UpstreamStatusError) as info:
        await raise_from(make_backend(), streamed=False)

    assert info.value.status_code == 429
    assert info.value.retry_after is None


async def test_500_becomes_502(
    make_backend: Factory, upstream: respx.MockRouter, streamed: bool
) -> None:
    error = {"error": {"message": "internal failure", "type": "server_error"}}
    upstream.post("/chat/completions").respond(500, json=error)

    with pytest.raises(UpstreamStatusError, match="internal failure") as info:
        await raise_from(make_backend(), streamed)

    assert info.value.upstream_status == 500
    assert info.value.status_code == 502
    assert info.value.error_type == "server_error"


async def test_plain_text_error_body(
    make_backend: Factory, upstream: respx.MockRouter, streamed: bool
) -> None:
    upstream.post("/chat/completions").respond(
        502, text="<html>nginx: bad gateway</html>", headers={"content-type": "text/html"}
    )

    with pytest.raises(UpstreamStatusError, match="nginx: bad gateway") as info:
        await raise_from(make_backend(), streamed)

    assert info.value.status_code == 502
    assert info.value.error_type == "api_error"


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (404, b'{"detail": "Not Found"}', "Not Found"),
        (400, b'{"error": "bad prompt"}', "bad prompt"),
        (503, b"", "HTTP 503"),
        (422, b'{"error": {"type": "invalid"}}', "HTTP 422"),
    ],
    ids=["fastapi-detail", "string-error", "empty", "no-message"],
)
async def test_other_error_bodies(
    make_backend: Factory,
    upstream: respx.MockRouter,
    streamed: bool,
    status: int,
    body: bytes,
    text: str,
) -> None:
    upstream.post("/chat/completions").respond(status, content=body)

    with pytest.raises(UpstreamStatusError, match=text) as info:
        await raise_from(make_backend(), streamed)

    assert info.value.upstream_status == status


# ---- transport failures and timeouts


def every_call(backend: OpenAIHTTPBackend) -> list[Callable[[], Awaitable[Any]]]:
    return [
        lambda: backend.chat(chat_request()),
        lambda: backend.complete(completion_request()),
        lambda: backend.embed(embedding_request()),
        lambda: collect(backend.stream_chat(chat_request(stream=True))),
        lambda: collect(backend.stream_complete(completion_request(stream=True))),
    ]


async def test_connect_error_is_upstream_unavailable(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    upstream.route().mock(side_effect=httpx.ConnectError("connection refused"))
    backend = make_backend()

    for attempt in every_call(backend):
        with pytest.raises(UpstreamUnavailable, match="connection refused") as info:
            async with asyncio.timeout(LIMIT_S):
                await attempt()
        assert info.value.status_code == 503
        assert info.value.code == "upstream_unavailable"
        assert info.value.retry_after == 1
        assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("exc", "expected", "status"),
    [
        (httpx.ConnectTimeout("connect timed out"), UpstreamUnavailable, 503),
        (httpx.ReadTimeout("read timed out"), UpstreamTimeout, 504),
        (httpx.WriteTimeout("write timed out"), UpstreamTimeout, 504),
        (httpx.PoolTimeout("pool timed out"), UpstreamTimeout, 504),
        (httpx.RemoteProtocolError("server disconnected"), UpstreamError, 502),
    ],
    ids=["connect-timeout", "read-timeout", "write-timeout", "pool-timeout", "disconnected"],
)
async def test_transport_exceptions_are_mapped(
    make_backend: Factory,
    upstream: respx.MockRouter,
    exc: Exception,
    expected: type[Exception],
    status: int,
) -> None:
    upstream.route().mock(side_effect=exc)
    backend = make_backend()

    for attempt in every_call(backend):
        with pytest.raises(expected) as info:
            async with asyncio.timeout(LIMIT_S):
                await attempt()
        assert type(info.value) is expected
        assert info.value.status_code == status  # type: ignore[attr-defined]
        assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    ("method", "path", "make_req", "response"), NON_STREAM_CALLS, ids=NON_STREAM_IDS
)
async def test_non_stream_total_timeout(
    make_backend: Factory,
    upstream: respx.MockRouter,
    method: str,
    path: str,
    make_req: Callable[..., msgspec.Struct],
    response: dict[str, Any],
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json=response)

    upstream.post(path).mock(side_effect=slow)
    backend = make_backend(timeout_s=0.1)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as info:
        await call(backend, method, make_req())

    assert loop.time() - started < 2
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"


@pytest.mark.parametrize(
    ("method", "path", "make_req", "response"), NON_STREAM_CALLS, ids=NON_STREAM_IDS
)
@pytest.mark.parametrize(
    "body",
    [b"not json at all", b'{"unexpected": true}', b"[1, 2]"],
    ids=["not-json", "wrong-shape", "array"],
)
async def test_invalid_response_is_upstream_error(
    make_backend: Factory,
    upstream: respx.MockRouter,
    method: str,
    path: str,
    make_req: Callable[..., msgspec.Struct],
    response: dict[str, Any],
    body: bytes,
) -> None:
    upstream.post(path).respond(200, content=body)

    with pytest.raises(UpstreamError, match="invalid response") as info:
        await call(make_backend(), method, make_req())

    assert not isinstance(info.value, UpstreamStatusError)
    assert info.value.status_code == 502


# ---- health


async def test_health_true_when_models_answers(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.get("/models").respond(200, json={"object": "list", "data": []})

    assert await make_backend().health() is True
    assert route.called


@pytest.mark.parametrize(
    "outcome",
    [
        httpx.Response(500, text="boom"),
        httpx.Response(401, json={"error": {"message": "bad key"}}),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
    ],
    ids=["500", "401", "connect-error", "timeout"],
)
async def test_health_false_when_upstream_fails(
    make_backend: Factory, upstream: respx.MockRouter, outcome: httpx.Response | Exception
) -> None:
    route = upstream.get("/models")
    if isinstance(outcome, Exception):
        route.mock(side_effect=outcome)
    else:
        route.mock(return_value=outcome)

    async with asyncio.timeout(LIMIT_S):
        assert await make_backend().health() is False


# ---- configuration


@pytest.mark.parametrize(
    "target",
    [
        "ftp://upstream.test/v1",
        "http:///v1",
        "upstream.test:8000/v1",
        "http://[::1",
        "http://h:x/v1",
    ],
)
def test_bad_url_is_config_error(make_backend: Factory, target: str) -> None:
    with pytest.raises(ConfigError, match="URL"):
        make_backend(target=target)


def test_bad_url_through_the_registry_names_the_model() -> None:
    model = ModelConfig(id=PUBLIC, backend="http://[::1")

    with pytest.raises(ConfigError, match=r"models\[0\] \(pub\)"):
        build_backend(model, timeout_s=5.0)


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"bogus": 1}, "bogus"),
        ({"max_connections": 0}, "max_connections"),
        ({"connect_timeout_s": -1}, "connect_timeout_s"),
        ({"headers": {"x": 1}}, "headers"),
        ({"verify": "/nonexistent/ca.pem"}, "verify"),
    ],
    ids=["unknown", "max-connections", "connect-timeout", "header-type", "missing-ca-bundle"],
)
def test_bad_options_are_config_errors(
    make_backend: Factory, options: dict[str, Any], text: str
) -> None:
    with pytest.raises(ConfigError, match=text):
        make_backend(**options)


@pytest.mark.parametrize("verify", [False, True, certifi.where()], ids=["off", "on", "ca-bundle"])
def test_verify_option_is_accepted(make_backend: Factory, verify: bool | str) -> None:
    make_backend(verify=verify)


def test_https_url_and_trailing_slash(make_backend: Factory) -> None:
    backend = make_backend(target="https://api.example.com/v1/")

    assert backend.base_url == "https://api.example.com/v1"


async def test_trailing_slash_keeps_the_path(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=CHAT_RESPONSE)

    await call(make_backend(target=BASE + "/"), "chat", chat_request())

    assert route.calls.last.request.url == BASE + "/chat/completions"


# ---- lifecycle


async def test_aclose_closes_the_client(make_backend: Factory) -> None:
    backend = make_backend()
    await backend.start()

    await backend.aclose()

    assert backend._client.is_closed


# ---- upstream refusing the gateway's own credentials; truncated streams


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_is_502_not_the_clients_fault(
    make_backend: Factory, upstream: respx.MockRouter, streamed: bool, status: int
) -> None:
    error = {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}
    upstream.post("/chat/completions").respond(status, json=error)

    with pytest.raises(UpstreamError) as info:
        await raise_from(make_backend(api_key="sk-wrong"), streamed)

    err = info.value
    assert not isinstance(err, UpstreamStatusError)
    assert err.status_code == 502
    assert err.code == "upstream_auth_failed"
    assert "Incorrect API key" in err.message
    assert "options.api_key" in err.message
    assert "sk-wrong" not in err.message


async def test_stream_cut_before_done_raises(
    make_backend: Factory, upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").mock(
        return_value=sse_response(sse(chat_chunk("partial"), done=False))
    )
    got: list[StreamItem] = []

    with pytest.raises(UpstreamError, match=r"before \[DONE\]"):
        await drain(make_backend().stream_chat(chat_request(stream=True)), got)

    assert len(got) == 1


# ---- the default transport, against a real upstream process


@pytest.mark.slow
async def test_default_pooled_transport_against_a_real_upstream(tmp_path: Path) -> None:
    config = {"models": [{"id": "up", "backend": "mock:", "options": {"reply": "a b c"}}]}
    with serve(config, tmp_path) as upstream_server:
        url = upstream_server.base_url
        model = ModelConfig(id=PUBLIC, backend=url, options={"upstream_model": "up"})
        backend = OpenAIHTTPBackend(
            BackendSpec(model=model, scheme="http", target=url, timeout_s=10)
        )
        try:
            assert isinstance(backend._client._transport, PooledTransport)
            for _ in range(3):
                reply = await backend.chat(chat_request())
                assert reply.choices[0].message.content == "a b c"
                assert reply.model == PUBLIC
            chunks = await collect(backend.stream_chat(chat_request(stream=True)))
            text = "".join(
                c.choices[0].delta.content or ""
                for c in chunks
                if isinstance(c, ChatCompletionChunk)
                and c.choices
                and isinstance(c.choices[0].delta.content, str)
            )
            assert text == "a b c"
            embedded = await backend.embed(embedding_request())
            assert embedded.model == PUBLIC
            assert await backend.health()
        finally:
            await backend.aclose()
