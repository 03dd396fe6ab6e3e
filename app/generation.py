"""The shared tail of the generation routes: stream as SSE, or answer once, with accounting."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from app.accounting import exchange_for
from app.disconnect import unless_disconnected
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    StreamItem,
    StreamOptions,
)
from app.responses import json_response, observed, sse_response

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


async def generate(
    request: Request[Any, Any, Any],
    req: R,
    *,
    stream: Callable[[R], AsyncIterator[StreamItem]],
    call: Callable[[R], Awaitable[ChatCompletion | Completion]],
) -> Response[bytes] | Stream:
    """Serve a prepared request: usage is always asked of the backend, for accounting, and
    passed on to the client only if it asked for it."""
    exchange = exchange_for(request.scope)
    if req.stream:
        exchange.stream = True
        asked = bool(req.stream_options and req.stream_options.include_usage)
        req = msgspec.structs.replace(req, stream_options=StreamOptions(include_usage=True))
        return await sse_response(observed(stream(req), exchange, strip_usage=not asked))
    result = await unless_disconnected(request.receive, call(req))
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    return json_response(result)
