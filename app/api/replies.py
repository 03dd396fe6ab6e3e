"""Building success responses: JSON bodies and SSE streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

import msgspec
from litestar import Response
from litestar.response import Stream

from app.api.sse import DONE, NamedEvent, encode_named_stream, encode_stream
from app.core.gateway import Call, Gateway
from app.core.generation import Prepare, R, routed_answer, routed_stream
from app.core.usage import observed
from app.protocol import ChatCompletion, Completion, StreamItem
from backends.base import Backend

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


async def generate(
    gateway: Gateway,
    call: Call,
    req: R,
    *,
    prepare: Prepare[R],
    stream: Callable[[Backend, R], AsyncIterator[StreamItem]],
    answer: Callable[[Backend, R], Awaitable[ChatCompletion | Completion]],
    extension: Mapping[str, Any] | None = None,
) -> Response[bytes] | Stream:
    """Serve a generation as OpenAI's SSE or JSON; usage reaches the client only if it asked
    for it. `extension` adds top-level fields of this gateway's own to a JSON answer (the
    sources of a grounded answer), and to a stream's first chunk."""
    if req.stream:
        asked = bool(req.stream_options and req.stream_options.include_usage)
        items = routed_stream(gateway, call, req, prepare=prepare, stream=stream)
        chunks = observed(items, call.exchange, strip_usage=not asked)
        return await sse_response(_first_with(chunks, extension) if extension else chunks)
    result = await routed_answer(gateway, call, req, prepare=prepare, answer=answer)
    if extension:
        return json_response({**msgspec.to_builtins(result), **extension})
    return json_response(result)


async def _first_with(chunks: AsyncIterator[Any], fields: Mapping[str, Any]) -> AsyncIterator[Any]:
    """`chunks` with `fields` added to the first (a backend's own JSON, `Raw`, included)."""
    async with aclosing(chunks):  # type: ignore[type-var]
        first = True
        async for chunk in chunks:
            if first:
                first = False
                body = msgspec.json.decode(chunk) if isinstance(chunk, msgspec.Raw) else chunk
                chunk = {**msgspec.to_builtins(body), **fields}
            yield chunk
