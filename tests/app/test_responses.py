"""Streams through `observed` and the SSE encoder: usage noted, failures logged once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from app.accounting import Exchange
from app.responses import observed
from app.sse import encode_stream


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
