"""The shared tail of the generation routes: route, then stream as SSE or answer once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from app.accounting import exchange_for
from app.context import RequestContext
from app.disconnect import unless_disconnected
from app.dispatch import Dispatcher, PerModel
from app.gateway import Gateway, ServedModel
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    StreamItem,
    StreamOptions,
)
from app.responses import json_response, observed, sse_response
from backends.base import Backend

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


async def generate(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: R,
    *,
    prepare: Callable[[R, ServedModel], R],
    stream: Callable[[Backend, R], AsyncIterator[StreamItem]],
    call: Callable[[Backend, R], Awaitable[ChatCompletion | Completion]],
) -> Response[bytes] | Stream:
    """Serve a request on `served` (or its fallbacks): usage is always asked of the backend,
    for accounting, and passed on to the client only if it asked for it."""
    exchange = exchange_for(request.scope)
    asked = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        exchange.stream = True
        req = msgspec.structs.replace(req, stream_options=StreamOptions(include_usage=True))
    per_model = PerModel(req, prepare)
    per_model(served)  # a request the model cannot take is refused before any routing
    dispatcher = Dispatcher(gateway, exchange, ctx)
    if req.stream:
        items = dispatcher.stream(served, lambda s, d: stream(d.backend, per_model(s)))
        return await sse_response(observed(items, exchange, strip_usage=not asked))
    result = await unless_disconnected(
        request.receive, dispatcher.call(served, lambda s, d: call(d.backend, per_model(s)))
    )
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    return json_response(result)
