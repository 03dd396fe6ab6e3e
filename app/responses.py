"""Building success responses: JSON bodies and SSE streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import msgspec
from litestar import Response
from litestar.response import Stream
from msgspec import Raw

from app.accounting import Exchange
from app.protocol import UNSET, Usage
from app.sse import DONE, NamedEvent, encode_named_stream, encode_stream
from app.wire_errors import error_code

_encode = msgspec.json.Encoder().encode
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def json_response(body: Any, status_code: int = 200) -> Response[bytes]:
    """A JSON response of a wire Struct."""
    return Response(content=_encode(body), status_code=status_code, media_type="application/json")


async def _only_done() -> AsyncIterator[bytes]:
    yield DONE


class _UsageProbe(msgspec.Struct):
    choices: list[Any] | None = None
    usage: Usage | None = None


_probe = msgspec.json.Decoder(_UsageProbe).decode


def _usage_of(item: Any) -> tuple[Usage | None, bool]:
    """An item's usage, and whether it is the usage-only final chunk."""
    if isinstance(item, Raw):
        raw = bytes(item)
        if b'"usage"' not in raw or b'"usage":null' in raw or b'"usage": null' in raw:
            return None, False
        try:
            probe = _probe(raw)
        except msgspec.MsgspecError:
            return None, False
        return probe.usage, probe.usage is not None and probe.choices == []
    usage = getattr(item, "usage", None)
    if isinstance(usage, Usage):
        return usage, not item.choices
    return None, False


async def observed(
    source: AsyncIterator[Any], exchange: Exchange, *, strip_usage: bool
) -> AsyncIterator[Any]:
    """Pass a stream through, noting its usage and failure in the exchange.

    With `strip_usage` the gateway asked the backend for usage the client did not ask for:
    the usage-only final chunk is dropped after it is noted.
    """
    async with aclosing(source):  # type: ignore[type-var]
        try:
            async for item in source:
                usage, usage_only = _usage_of(item)
                if usage is not None:
                    exchange.record_usage(usage.prompt_tokens, usage.completion_tokens)
                if strip_usage:
                    if usage_only:
                        continue
                    if not isinstance(item, Raw) and getattr(item, "usage", UNSET) is None:
                        item.usage = UNSET
                yield item
        except Exception as exc:
            exchange.error_type = error_code(exc)
            raise


async def sse_response(source: AsyncIterator[Any]) -> Stream:
    """Start a stream: its first item is produced before any byte is sent.

    So a failure before the first byte is an ordinary error response with its status code
    (and can be retried by a router); only later failures become SSE error events.
    """
    try:
        first = await anext(source)
    except StopAsyncIteration:
        return Stream(_only_done(), media_type="text/event-stream", headers=SSE_HEADERS)
    except BaseException:
        await source.aclose()  # type: ignore[attr-defined]
        raise
    return Stream(encode_stream(first, source), media_type="text/event-stream", headers=SSE_HEADERS)


async def named_sse_response(
    source: AsyncIterator[NamedEvent], on_error: Callable[[Exception], NamedEvent]
) -> Stream:
    """`sse_response` for named-event streams: the first event is made before any byte."""
    try:
        first = await anext(source)
    except BaseException:
        await source.aclose()  # type: ignore[attr-defined]
        raise
    return Stream(
        encode_named_stream(first, source, on_error),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
