"""Streams through `observed` and the SSE encoder: usage noted, failures logged once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec
import pytest

from app.api.sse import encode_stream
from app.core.usage import observed
from app.ledger.exchange import Exchange
from app.protocol import ChatCompletionChunk, ChunkChoice, ChunkDelta


async def failing() -> AsyncIterator[dict[str, int]]:
    yield {"n": 1}
    raise RuntimeError("boom")


async def test_unknown_mid_stream_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    exchange = Exchange(started=0.0, route="/v1/chat/completions")
    source = observed(failing(), exchange, strip_usage=False)
    first = await anext(source)
    with caplog.at_level(logging.ERROR, logger="clawbot.errors"):
        events = [e async for e in encode_stream(first, source)]
    assert events[-1] == b"data: [DONE]\n\n"
    assert b'"internal_error"' in events[-2]
    assert exchange.error_type == "internal_error"
    assert [r.message for r in caplog.records].count("unhandled error") == 1


async def items(*chunks: object) -> AsyncIterator[object]:
    for chunk in chunks:
        yield chunk


ROLE_ONLY = b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'


@pytest.mark.parametrize(
    "first_token",
    [
        msgspec.Raw(b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}'),
        msgspec.Raw(b'{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}'),
        msgspec.Raw(b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}'),
        msgspec.Raw(b'{"choices":[{"index":0,"text":"Hi"}]}'),
        ChatCompletionChunk(
            id="c",
            created=0,
            model="m",
            choices=[ChunkChoice(index=0, delta=ChunkDelta(content="Hi"))],
        ),
    ],
)
async def test_first_token_is_the_first_generated_output(first_token: object) -> None:
    """Role-only and empty chunks are not tokens; text, reasoning, tool calls and completion
    text are, whether a backend's chunk is a Struct or passed-through JSON."""
    exchange = Exchange(started=0.0, route="/v1/chat/completions", stream=True)
    empty = ChatCompletionChunk(
        id="c", created=0, model="m", choices=[ChunkChoice(index=0, delta=ChunkDelta())]
    )
    source = observed(
        items(msgspec.Raw(ROLE_ONLY), empty, first_token), exchange, strip_usage=False
    )
    await anext(source)
    await anext(source)
    assert exchange.first_token_at is None
    assert exchange.ttft_ms is None
    await anext(source)
    assert exchange.first_token_at is not None
    assert exchange.ttft_ms is not None
