"""Building success responses: JSON bodies and SSE streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Response
from litestar.response import Stream

from app.sse import DONE, encode_stream

_encode = msgspec.json.Encoder().encode
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def json_response(body: Any, status_code: int = 200) -> Response[bytes]:
    """A JSON response of a wire Struct."""
    return Response(content=_encode(body), status_code=status_code, media_type="application/json")


async def _only_done() -> AsyncIterator[bytes]:
    yield DONE


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
