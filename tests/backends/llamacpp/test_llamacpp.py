"""The in-process llama.cpp backend, on the embedded SmolLM2 model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.config import ModelConfig
from app.errors import ContextLengthExceeded, InvalidRequest
from app.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    StreamOptions,
)
from backends.base import BackendSpec
from backends.llamacpp.backend import LlamaCppBackend
from tests.serving import serve

pytestmark = pytest.mark.slow


def make_backend(**options: Any) -> LlamaCppBackend:
    model = ModelConfig(id="smol", backend="llamacpp:embedded", context_length=512, options=options)
    return LlamaCppBackend(BackendSpec(model, "llamacpp", "embedded", 60.0))


@pytest.fixture
async def backend() -> AsyncIterator[LlamaCppBackend]:
    b = make_backend()
    await b.start()
    yield b
    await b.aclose()


def chat_req(text: str = "Name three colors.", **kw: Any) -> ChatCompletionRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 16)
    return ChatCompletionRequest(
        model="smol", messages=[ChatMessage(role="user", content=text)], **kw
    )


async def test_start_reports_context(backend: LlamaCppBackend) -> None:
    assert backend.context_length == 512
    assert await backend.health()


async def test_chat(backend: LlamaCppBackend) -> None:
    out = await backend.chat(chat_req(max_tokens=8))
    choice = out.choices[0]
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 8  # type: ignore[union-attr]
    assert out.usage.prompt_tokens > 5  # type: ignore[union-attr]


async def test_greedy_is_deterministic_and_stream_matches(backend: LlamaCppBackend) -> None:
    first = await backend.chat(chat_req())
    second = await backend.chat(chat_req())
    assert first.choices[0].message.content == second.choices[0].message.content
    req = chat_req(stream=True, stream_options=StreamOptions(include_usage=True))
    chunks = [c async for c in backend.stream_chat(req)]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    typed = [c for c in chunks if isinstance(c, ChatCompletionChunk)]
    assert typed[0].choices[0].delta.role == "assistant"
    text = "".join(
        c.choices[0].delta.content or ""
        for c in typed
        if c.choices and isinstance(c.choices[0].delta.content, str)
    )
    assert text == first.choices[0].message.content
    assert typed[-1].choices == []
    last = typed[-1].usage
    assert last is not None
    assert (last.prompt_tokens, last.completion_tokens) == (
        first.usage.prompt_tokens,  # type: ignore[union-attr]
        first.usage.completion_tokens,  # type: ignore[union-attr]
    )
    # The same prompt a third time: all of it but the last token comes from the KV cache.
    assert last.prompt_tokens_details.cached_tokens == last.prompt_tokens - 1  # type: ignore[union-attr]


async def test_stop_sequence_and_seed(backend: LlamaCppBackend) -> None:
    seeded = [
        (await backend.chat(chat_req("Tell a story.", temperature=1.0, seed=42)))
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    full = (await backend.chat(chat_req(max_tokens=24))).choices[0].message.content or ""
    words = full.split()
    assert len(words) > 2
    cut = await backend.chat(chat_req(max_tokens=24, stop=[words[2]]))
    assert words[2] not in (cut.choices[0].message.content or "")


async def test_logprobs(backend: LlamaCppBackend) -> None:
    out = await backend.chat(chat_req(max_tokens=4, logprobs=True, top_logprobs=2))
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


async def test_completion_echo_and_list(backend: LlamaCppBackend) -> None:
    out = await backend.complete(
        CompletionRequest(
            model="smol", prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, echo=True
        )
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("The sky is")
    assert out.choices[1].text.startswith("Water is")


async def test_prompt_over_context_is_400(backend: LlamaCppBackend) -> None:
    with pytest.raises(ContextLengthExceeded):
        await backend.chat(chat_req("word " * 600))
    with pytest.raises(ContextLengthExceeded):
        await anext(backend.stream_chat(chat_req("word " * 600, stream=True)))


async def test_template_errors_are_400(
    backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise ValueError("roles must alternate")

    assert backend._loaded is not None
    monkeypatch.setattr(backend._loaded, "formatter", broken)
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        await backend.chat(chat_req())


async def test_embeddings(backend: LlamaCppBackend) -> None:
    out = await backend.embed(
        EmbeddingRequest(model="smol", input=["hello world", "goodbye", "hello world"])
    )
    vectors = [d.embedding for d in out.data]
    assert [d.index for d in out.data] == [0, 1, 2]
    assert all(isinstance(v, list) and len(v) == 576 for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-4  # type: ignore[union-attr]
    assert out.usage.prompt_tokens > 3


async def test_cancelled_stream_frees_its_slot() -> None:
    backend = make_backend(slots=1)
    await backend.start()
    try:
        engine = backend.engine
        assert engine is not None
        req = chat_req("Write a very long essay about the sea.", max_tokens=400, stream=True)
        steps = engine.steps
        async with aclosing(backend.stream_chat(req)) as stream:  # type: ignore[type-var]
            for _ in range(3):
                await anext(stream)
            assert engine.active == 1
        # The one slot is free again long before 400 tokens could have been generated.
        await asyncio.wait_for(backend.chat(chat_req(max_tokens=2)), timeout=30)
        assert engine.steps - steps < 100
        assert engine.active == 0
    finally:
        await backend.aclose()


async def test_one_slot_serves_requests_in_arrival_order() -> None:
    backend = make_backend(slots=1)
    await backend.start()
    finished: list[int] = []

    async def one(i: int) -> None:
        await backend.chat(chat_req(f"Say the number {i}.", max_tokens=6))
        finished.append(i)

    try:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)  # each submits before the next is created
        await asyncio.gather(*tasks)
    finally:
        await backend.aclose()
    assert finished == [0, 1, 2, 3]


async def test_event_loop_stays_responsive_during_generation(tmp_path: Path) -> None:
    config = {"models": [{"id": "smol", "backend": "llamacpp:embedded", "context_length": 1024}]}
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with serve(config, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=60) as client:
            health_latencies: list[float] = []
            last = ""
            started = time.perf_counter()
            async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                lines = stream.aiter_lines()
                await anext(lines)  # generation has started
                async for line in lines:
                    if len(health_latencies) < 5:
                        sent = time.perf_counter()
                        r = await client.get("/health")
                        assert r.status_code == 200
                        health_latencies.append(time.perf_counter() - sent)
                    last = line or last
            generation_s = time.perf_counter() - started
            assert last == "data: [DONE]"
            assert len(health_latencies) == 5
            # A loop blocked by generation would answer /health only after the whole stream.
            assert max(health_latencies) < generation_s / 4


def test_usage_counts_match_tokenizer() -> None:
    backend = make_backend()

    async def go() -> tuple[int, str]:
        await backend.start()
        try:
            out = await backend.chat(chat_req("Hello!", max_tokens=64))
            return out.usage.completion_tokens, out.choices[0].message.content or ""  # type: ignore[union-attr]
        finally:
            await backend.aclose()

    count, text = asyncio.run(go())
    assert count >= 1
    assert len(msgspec.json.encode(text)) > 0
