"""The continuous-batching engine, on the embedded SmolLM2 model: correctness, not timings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import msgspec
import pytest

from app.api.app import create_app
from app.config import MemorySettings, ModelConfig
from app.core.gateway import Gateway
from app.errors import ServerBusy
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from backends.base import BackendSpec
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.engine import Engine, common_prefix
from backends.memory import MemoryBudget
from tests.conftest import AUTH, AppClient, make_config, until

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three primary colors are",
    "Once upon a time, in a small village,",
    "To reset a router, first",
    "The chemical symbol for gold is",
]


def make_backend(
    model_id: str = "smol", memory: MemoryBudget | None = None, **options: Any
) -> LlamaCppBackend:
    model = ModelConfig(
        id=model_id, backend="llamacpp:embedded", context_length=512, options=options
    )
    return LlamaCppBackend(BackendSpec(model, "llamacpp", "embedded", 60.0, memory))


@pytest.fixture
async def backend() -> AsyncIterator[LlamaCppBackend]:
    b = make_backend(slots=4)
    await b.start()
    yield b
    await b.aclose()


def engine_of(backend: LlamaCppBackend) -> Engine:
    assert backend.engine is not None
    return backend.engine


def completion(prompt: str, **kw: Any) -> CompletionRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 24)
    return msgspec.convert({"model": "smol", "prompt": prompt, **kw}, CompletionRequest)


def chat(messages: list[dict[str, str]], **kw: Any) -> ChatCompletionRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 16)
    return msgspec.convert({"model": "smol", "messages": messages, **kw}, ChatCompletionRequest)


async def long_stream(backend: LlamaCppBackend) -> AsyncIterator[Any]:
    req = chat(
        [{"role": "user", "content": "Write a very long essay about the sea."}],
        max_tokens=400,
        stream=True,
    )
    return backend.stream_chat(req)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6, 7]) == 2


async def test_batched_greedy_outputs_equal_single_sequence_outputs(
    backend: LlamaCppBackend,
) -> None:
    alone = [(await backend.complete(completion(p))).choices[0].text for p in PROMPTS]
    engine = engine_of(backend)
    steps = engine.steps
    # Six at once on four slots: four decode together, two queue and join as slots free up.
    together = await asyncio.gather(*(backend.complete(completion(p)) for p in PROMPTS))
    assert [r.choices[0].text for r in together] == alone
    assert all(text for text in alone)
    assert engine.steps - steps < sum(r.usage.completion_tokens for r in together), "batched"


async def test_several_prompts_of_one_request_decode_together(backend: LlamaCppBackend) -> None:
    alone = [(await backend.complete(completion(p))).choices[0].text for p in PROMPTS[:3]]
    out = await backend.complete(completion(PROMPTS[:3]))  # type: ignore[arg-type]
    assert [c.text for c in out.choices] == alone
    assert [c.index for c in out.choices] == [0, 1, 2]


async def test_streams_interleave(backend: LlamaCppBackend) -> None:
    """Two streams progress together: neither waits for the other to finish."""
    order: list[int] = []

    async def run(i: int) -> None:
        req = completion(PROMPTS[i], max_tokens=20, stream=True)
        async with aclosing(backend.stream_complete(req)) as items:  # type: ignore[type-var]
            async for _ in items:
                order.append(i)

    await asyncio.gather(run(0), run(1))
    first_done = min(max(i for i, x in enumerate(order) if x == k) for k in (0, 1))
    assert {0, 1} <= set(order[: first_done + 1]), order


async def test_seeded_sampling_replays_and_respects_stop(backend: LlamaCppBackend) -> None:
    req = completion(PROMPTS[3], temperature=1.0, seed=7, max_tokens=20)
    first = (await backend.complete(req)).choices[0].text
    concurrent = await asyncio.gather(backend.complete(req), backend.complete(completion("x")))
    assert concurrent[0].choices[0].text == first
    stop = first.split()[1]
    out = await backend.complete(completion(PROMPTS[3], temperature=1.0, seed=7, stop=[stop]))
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text


async def test_a_long_prompt_is_read_in_chunks_while_others_stream() -> None:
    backend = make_backend(slots=2, n_batch=32)
    await backend.start()
    try:
        engine = engine_of(backend)
        long_text = " ".join(f"item {i}," for i in range(80))  # ~400 tokens
        seen: list[str] = []

        async def short() -> None:
            req = completion(PROMPTS[1], max_tokens=40, stream=True)
            async with aclosing(backend.stream_complete(req)) as items:  # type: ignore[type-var]
                async for _ in items:
                    seen.append("short")

        async def long() -> None:
            req = completion(long_text, max_tokens=2, stream=True)
            async with aclosing(backend.stream_complete(req)) as items:  # type: ignore[type-var]
                async for _ in items:
                    seen.append("long")

        steps = engine.steps
        task = asyncio.create_task(short())
        await until(lambda: "short" in seen, 30)
        await asyncio.gather(task, long())
        # The long prompt took many steps (32 tokens each, minus the short one's token), and
        # the short stream kept getting tokens meanwhile instead of stalling behind it.
        assert engine.steps - steps >= 400 // 32
        first_long = seen.index("long")
        assert seen[:first_long].count("short") >= 10
    finally:
        await backend.aclose()


async def test_next_turn_reuses_the_conversation_prefix(backend: LlamaCppBackend) -> None:
    history = [
        {"role": "system", "content": "You are a helpful assistant for Acme Corp."},
        {"role": "user", "content": "Where is my order?"},
    ]
    first = await backend.chat(chat(history))
    assert first.usage.prompt_tokens_details is not msgspec.UNSET
    reply = first.choices[0].message.content or ""
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks!"}]
    second = await backend.chat(chat(history))
    details = second.usage.prompt_tokens_details
    assert not isinstance(details, msgspec.UnsetType)
    assert details.cached_tokens >= first.usage.prompt_tokens - 1
    assert details.cached_tokens < second.usage.prompt_tokens


async def test_reused_prefix_gives_the_same_greedy_reply(backend: LlamaCppBackend) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    cold = make_backend(slots=1, prefix_cache=False)
    await cold.start()
    try:
        expected = (await cold.chat(chat(messages))).choices[0].message.content
    finally:
        await cold.aclose()
    await backend.chat(chat([{"role": "user", "content": "Name three animals."}]))
    warm = await backend.chat(chat(messages))
    details = warm.usage.prompt_tokens_details
    assert not isinstance(details, msgspec.UnsetType)
    assert details.cached_tokens > 0
    assert warm.choices[0].message.content == expected


@asynccontextmanager
async def one_slot_taken(
    **options: Any,
) -> AsyncIterator[tuple[LlamaCppBackend, Callable[[], Any]]]:
    """A one-slot model whose slot a long stream holds; and how to close that stream."""
    backend = make_backend(slots=1, **options)
    await backend.start()
    stream = await long_stream(backend)
    try:
        await anext(stream)
        await anext(stream)
        yield backend, stream.aclose
    finally:
        await stream.aclose()
        await backend.aclose()


async def test_cancelled_request_frees_its_slot_at_once() -> None:
    async with one_slot_taken(queue_timeout_s=20) as (backend, release):
        engine = engine_of(backend)
        assert engine.active == 1
        await release()
        # The only slot is free for the next request long before 400 tokens were generated.
        steps = engine.steps
        out = await asyncio.wait_for(backend.complete(completion("Hi", max_tokens=2)), 10)
        assert out.choices[0].text
        assert engine.steps - steps < 50
        assert engine.active == 0


async def test_a_cancelled_waiting_request_leaves_the_queue() -> None:
    async with one_slot_taken(max_queue=1) as (backend, release):
        engine = engine_of(backend)
        waiting = asyncio.create_task(backend.complete(completion("Hi")))
        await until(lambda: engine.queued > 0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Its place in the queue is free again: another request may wait there.
        again = asyncio.create_task(backend.complete(completion("Hi", max_tokens=2)))
        await asyncio.sleep(0.05)
        assert not again.done()
        await release()
        assert (await asyncio.wait_for(again, 10)).choices[0].text


async def test_full_queue_is_server_busy_at_once() -> None:
    async with one_slot_taken(max_queue=1) as (backend, release):
        engine = engine_of(backend)
        queued = asyncio.create_task(backend.complete(completion("Hi", max_tokens=2)))
        await until(lambda: engine.queued > 0)
        with pytest.raises(ServerBusy) as caught:
            await backend.complete(completion("Hi"))
        assert caught.value.status_code == 503
        assert caught.value.code == "server_busy"
        assert caught.value.retry_after
        await release()
        assert (await asyncio.wait_for(queued, 10)).choices[0].text


async def test_queue_timeout_is_server_busy() -> None:
    async with one_slot_taken(queue_timeout_s=0.3) as (backend, _):
        with pytest.raises(ServerBusy, match=r"no slot became free within 0\.3 s"):
            await backend.complete(completion("Hi"))
        assert engine_of(backend).queued in (0, 1)  # dropped at the next step at the latest


async def test_server_busy_on_the_wire() -> None:
    config = make_config(
        [
            {
                "id": "smol",
                "backend": "llamacpp:embedded",
                "context_length": 512,
                "options": {"slots": 1, "max_queue": 0},
            }
        ]
    )
    gateway = Gateway.from_config(config)
    async with AppClient(create_app(gateway)) as client:
        backend = gateway.models[0].backends[0]
        assert isinstance(backend, LlamaCppBackend)
        stream = await long_stream(backend)
        async with aclosing(stream) as items:  # type: ignore[type-var]
            await anext(items)
            r = await client.post(
                "/v1/chat/completions",
                headers=AUTH,
                json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}]},
            )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "server_busy"
    assert r.json()["error"]["type"] == "api_error"
    assert int(r.headers["retry-after"]) >= 1


async def test_concurrent_embeddings_are_batched(backend: LlamaCppBackend) -> None:
    texts = ["hello world", "goodbye", "the sea is blue", "a quick brown fox"]
    alone = [
        (await backend.embed(EmbeddingRequest(model="smol", input=t))).data[0].embedding
        for t in texts
    ]
    engine = engine_of(backend)
    batches = engine.embed_batches
    together = await asyncio.gather(
        *(backend.embed(EmbeddingRequest(model="smol", input=t)) for t in texts)
    )
    assert engine.embed_batches - batches < len(texts)
    for vector, out in zip(alone, together, strict=True):
        got = out.data[0].embedding
        assert isinstance(got, list)
        assert isinstance(vector, list)
        assert max(abs(a - b) for a, b in zip(vector, got, strict=True)) < 1e-4


async def test_lru_model_is_unloaded_and_reloaded_on_demand() -> None:
    one = make_backend("one", slots=2)
    budget = MemoryBudget(int(one.footprint * 1.5))
    await one.aclose()
    a = make_backend("a", budget, slots=2)
    b = make_backend("b", budget, slots=2)
    try:
        await a.start()
        await b.start()
        assert (a.loaded, b.loaded) == (False, False), "under a budget, models load on demand"
        assert await a.health()
        assert await b.health()
        first = (await a.complete(completion(PROMPTS[0]))).choices[0].text
        assert a.loaded
        assert not b.loaded
        await b.complete(completion(PROMPTS[0]))
        assert (a.loaded, b.loaded) == (False, True), "a was the least recently used"
        again = (await a.complete(completion(PROMPTS[0]))).choices[0].text
        assert a.loaded
        assert not b.loaded
        assert again == first
        assert budget.unloads == 2
        assert budget.used_bytes <= budget.limit_bytes  # type: ignore[operator]
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_busy_model_is_not_unloaded() -> None:
    one = make_backend("one", slots=1)
    budget = MemoryBudget(int(one.footprint * 1.5))
    await one.aclose()
    a = make_backend("a", budget, slots=1)
    b = make_backend("b", budget, slots=1, queue_timeout_s=0.3)
    try:
        stream = await long_stream(a)
        async with aclosing(stream) as items:  # type: ignore[type-var]
            await anext(items)
            with pytest.raises(ServerBusy, match="memory budget"):
                await b.complete(completion("Hi"))
            assert a.loaded
            assert not b.loaded
        out = await b.complete(completion("Hi", max_tokens=2))  # a is idle now: swapped out
        assert out.choices[0].text
        assert b.loaded
        assert not a.loaded
    finally:
        await a.aclose()
        await b.aclose()


async def test_models_endpoint_says_which_are_loaded() -> None:
    one = make_backend("one", slots=1)
    budget_mb = int(one.footprint * 1.5) // 2**20
    await one.aclose()
    models = [
        {"id": name, "backend": "llamacpp:embedded", "context_length": 512, "options": {"slots": 1}}
        for name in ("a", "b")
    ]
    config = msgspec.structs.replace(
        make_config(models), memory=MemorySettings(budget_mb=budget_mb)
    )
    async with AppClient(create_app(Gateway.from_config(config))) as client:

        async def loaded() -> dict[str, bool]:
            data = (await client.get("/v1/models", headers=AUTH)).json()["data"]
            return {m["id"]: m["loaded"] for m in data}

        assert await loaded() == {"a": False, "b": False}
        body = {"model": "b", "prompt": "Hi", "max_tokens": 2}
        assert (await client.post("/v1/completions", headers=AUTH, json=body)).status_code == 200
        assert await loaded() == {"a": False, "b": True}
        body["model"] = "a"
        assert (await client.post("/v1/completions", headers=AUTH, json=body)).status_code == 200
        assert await loaded() == {"a": True, "b": False}


def test_a_model_larger_than_the_whole_budget_is_a_config_error() -> None:
    from app.config import ConfigError

    with pytest.raises(ConfigError, match=r"more than the whole memory\.budget_mb"):
        make_backend(memory=MemoryBudget(1024 * 1024))


def test_n_batch_below_slots_is_a_config_error() -> None:
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="n_batch"):
        make_backend(slots=8, n_batch=4)


async def test_an_embedding_input_beyond_the_window_is_a_400(backend: LlamaCppBackend) -> None:
    from app.errors import ContextLengthExceeded

    long_text = " ".join(["word"] * 600)
    with pytest.raises(ContextLengthExceeded, match="embeds at most 512") as caught:
        await backend.embed(EmbeddingRequest(model="smol", input=["short", long_text]))
    assert caught.value.param == "input"
    assert caught.value.status_code == 400


async def test_a_failing_sequence_does_not_stop_the_others(
    backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.errors import UpstreamError
    from backends.llamacpp import engine as llama_engine

    def broken(*_: Any) -> Any:
        raise FloatingPointError("no")

    monkeypatch.setattr(llama_engine, "log_softmax_at", broken)
    failing = backend.complete(completion(PROMPTS[0], logprobs=2))
    fine = backend.complete(completion(PROMPTS[1]))
    results = await asyncio.gather(failing, fine, return_exceptions=True)
    assert isinstance(results[0], UpstreamError)
    assert "sampling failed: FloatingPointError" in results[0].message
    assert not isinstance(results[1], BaseException)
    assert results[1].choices[0].text
    assert engine_of(backend).active == 0


async def test_a_dead_engine_fails_its_requests_and_is_reloaded(
    backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.errors import UpstreamError

    engine = engine_of(backend)

    def crash() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine, "_step", crash)
    with pytest.raises(UpstreamError, match="the inference engine failed: bug"):
        await backend.complete(completion(PROMPTS[0]))
    assert engine.failed
    assert not await backend.health()
    out = await backend.complete(completion(PROMPTS[0]))
    assert out.choices[0].text
    assert backend.engine is not engine
    assert await backend.health()


@pytest.mark.parametrize("unified", [False, True])
async def test_a_prefix_in_a_busy_slot_is_shared(unified: bool) -> None:
    """A shared system prompt is read once: the next request copies it from a busy slot."""
    system = {
        "role": "system",
        "content": "You are the support assistant of Acme Corp. Be brief, be polite, never "
        "share personal data, and say so when you are unsure about an answer.",
    }
    backend = make_backend(slots=2, kv_unified=unified)
    cold = make_backend(slots=1, prefix_cache=False)
    await backend.start()
    await cold.start()
    try:
        essay = [system, {"role": "user", "content": "Write a very long essay about the sea."}]
        stream = backend.stream_chat(chat(essay, max_tokens=400, stream=True))
        async with aclosing(stream) as items:  # type: ignore[type-var]
            await anext(items)
            await anext(items)  # slot 0 is generating, its cache holds the system prompt
            question = [system, {"role": "user", "content": "Name three colors."}]
            shared = await backend.chat(chat(question))  # slot 1, empty until now
            assert engine_of(backend).active == 1
        expected = await cold.chat(chat(question))
        details = shared.usage.prompt_tokens_details
        assert not isinstance(details, msgspec.UnsetType)
        assert details.cached_tokens >= 30, "the system prompt, at least"
        assert shared.choices[0].message.content == expected.choices[0].message.content
    finally:
        await backend.aclose()
        await cold.aclose()
