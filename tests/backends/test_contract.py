"""The backend contract, one module run over every built-in backend: `mock`, `openai_http` in
front of a real `clawbot serve` process (its mock model), and `llamacpp` on the embedded model
(slow). Each is built the way the gateway builds it (`backends.registry.build_backend`).

What every backend must do: declare its capabilities; answer chat and text completions whole
and streamed, the stream adding up to the same answer (temperature 0) and ending with a finish
reason and, when asked, usage; embed when it says it can; free itself when a stream is closed
half-way, serving the next request; say it is healthy once started; and fail with
GatewayErrors, not foreign exceptions.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

from app.config import parse_config
from app.errors import ContextLengthExceeded, GatewayError
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    StreamItem,
)
from backends.base import Backend, Capabilities, SelfDescribing
from backends.registry import BUILTIN_BACKENDS, build_backend
from tests.serving import serve

PROMPT = "Name a colour of the sky."
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gateway serving a mock model, for the HTTP backend to talk to."""
    config = {"models": [{"id": "echo", "backend": "mock:"}], "logging": {"level": "WARNING"}}
    with serve(config, tmp_path_factory.mktemp("contract-upstream")) as running:
        yield running.base_url


def model_entry(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "mock":
        return {"id": "m", "backend": "mock:"}
    if kind == "openai_http":
        base = request.getfixturevalue("upstream")
        return {"id": "m", "backend": base, "options": {"upstream_model": "echo"}}
    return {
        "id": "m",
        "backend": "llamacpp:embedded",
        "context_length": 512,
        "options": {"slots": 2, "n_threads": 1},
    }


@pytest.fixture(
    params=["mock", "openai_http", pytest.param("llamacpp", marks=pytest.mark.slow)],
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    model = parse_config({"models": [model_entry(request.param, request)]}).models[0]
    built = build_backend(model, timeout_s=60.0)
    await built.start()
    try:
        yield built
    finally:
        await built.aclose()


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **fields,
    }
    return msgspec.convert(body, ChatCompletionRequest)


def completion(**fields: Any) -> CompletionRequest:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return msgspec.convert(body, CompletionRequest)


def decoded(item: StreamItem, kind: type[Any]) -> Any:
    """A stream item as its Struct (backends that pass JSON through yield it raw)."""
    return msgspec.json.decode(bytes(item), type=kind) if isinstance(item, msgspec.Raw) else item


async def chunks(stream: AsyncIterator[StreamItem], kind: type[Any]) -> list[Any]:
    return [decoded(item, kind) async for item in stream]


async def test_capabilities_are_declared(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend.capabilities, Capabilities)
    assert backend.capabilities.chat
    assert await backend.health() is True


async def test_chat_whole_and_streamed_agree(backend: Backend) -> None:
    whole = await backend.chat(chat())
    assert isinstance(whole, ChatCompletion)
    [choice] = whole.choices
    assert isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None
    assert whole.usage.prompt_tokens > 0
    assert 0 < whole.usage.completion_tokens <= MAX_TOKENS
    options = {"include_usage": True}
    parts = await chunks(
        backend.stream_chat(chat(stream=True, stream_options=options)), ChatCompletionChunk
    )
    assert all(isinstance(p, ChatCompletionChunk) for p in parts)
    text = "".join(
        c.delta.content for p in parts for c in p.choices if isinstance(c.delta.content, str)
    )
    assert text == choice.message.content
    finishes = [c.finish_reason for p in parts for c in p.choices if c.finish_reason]
    assert finishes == [choice.finish_reason]
    assert parts[-1].usage is not None
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_completions_whole_and_streamed_agree(backend: Backend) -> None:
    if not backend.capabilities.completions:
        pytest.skip("this backend declares no text completions")
    whole = await backend.complete(completion())
    assert isinstance(whole, Completion)
    [choice] = whole.choices
    assert choice.text
    parts = await chunks(backend.stream_complete(completion(stream=True)), Completion)
    assert "".join(c.text for p in parts for c in p.choices) == choice.text
    assert [c.finish_reason for p in parts for c in p.choices if c.finish_reason] == [
        choice.finish_reason
    ]


async def test_embeddings_when_declared(backend: Backend) -> None:
    if not backend.capabilities.embeddings:
        pytest.skip("this backend declares no embeddings")
    req = msgspec.convert({"model": "m", "input": ["sky", "sea"]}, EmbeddingRequest)
    result = await backend.embed(req)
    assert [e.index for e in result.data] == [0, 1]
    vectors = [e.embedding for e in result.data]
    assert all(isinstance(v, list) for v in vectors)
    dims = {len(v) for v in vectors if isinstance(v, list)}
    assert len(dims) == 1
    assert all(math.isfinite(x) for v in vectors if isinstance(v, list) for x in v)
    assert result.usage.prompt_tokens > 0


async def test_a_stream_closed_half_way_frees_the_backend(backend: Backend) -> None:
    for _ in range(3):  # more than the in-process engine's two slots
        stream = backend.stream_chat(chat(stream=True, max_tokens=64))
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
    answer = await backend.chat(chat())
    assert answer.choices[0].message.content


async def test_failures_are_gateway_errors(backend: Backend) -> None:
    """A prompt far beyond any context window fails with a GatewayError (the in-process model
    refuses it as a 400) or is answered (the mocks have no window); never a foreign exception."""
    req = chat(messages=[{"role": "user", "content": "sky " * 20_000}])
    window = backend.state().context_length if isinstance(backend, SelfDescribing) else None
    if window is None:
        assert (await backend.chat(req)).choices
        return
    with pytest.raises(ContextLengthExceeded) as refused:
        await backend.chat(req)
    assert isinstance(refused.value, GatewayError)
    assert refused.value.status_code == 400


def test_every_built_in_backend_is_covered() -> None:
    """A new built-in backend needs its row in `backend`'s params."""
    assert set(BUILTIN_BACKENDS) == {"mock", "llamacpp", "http", "https"}  # http(s): one backend
