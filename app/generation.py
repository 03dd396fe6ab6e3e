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
from app.params import prepare_chat
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    StreamItem,
    StreamOptions,
)
from app.reasoning import split_answer, split_stream
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
    split = served.config.think_tags and isinstance(req, ChatCompletionRequest)
    if req.stream:
        items = dispatcher.stream(served, lambda s, d: stream(d.backend, per_model(s)))
        if split:
            items = split_stream(items)
        return await sse_response(observed(items, exchange, strip_usage=not asked))
    result = await unless_disconnected(
        request.receive, dispatcher.call(served, lambda s, d: call(d.backend, per_model(s)))
    )
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    if split and isinstance(result, ChatCompletion):
        result = split_answer(result)
    return json_response(result)


_decode_chunk = msgspec.json.Decoder(ChatCompletionChunk).decode


async def chat_chunks(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: ChatCompletionRequest,
) -> AsyncIterator[ChatCompletionChunk]:
    """A chat completion as decoded chunks, for the API bridges (Responses, Messages).

    Routed, failed over and accounted like `/v1/chat/completions`; the last chunk carries the
    usage. Pull the first chunk before sending headers (`named_sse_response` does).
    """
    exchange = exchange_for(request.scope)
    exchange.stream = True
    req = msgspec.structs.replace(
        req, stream=True, stream_options=StreamOptions(include_usage=True)
    )
    per_model = PerModel(req, lambda r, s: prepare_chat(r, s.config, s.capabilities))
    per_model(served)
    items = Dispatcher(gateway, exchange, ctx).stream(
        served, lambda s, d: d.backend.stream_chat(per_model(s))
    )
    if served.config.think_tags:
        items = split_stream(items)
    async for item in observed(items, exchange, strip_usage=False):
        yield _decode_chunk(bytes(item)) if isinstance(item, msgspec.Raw) else item


async def chat_answer(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: ChatCompletionRequest,
) -> ChatCompletion:
    """A chat completion in one piece, for the API bridges; routed and accounted."""
    exchange = exchange_for(request.scope)
    req = msgspec.structs.replace(req, stream=None, stream_options=None)
    per_model = PerModel(req, lambda r, s: prepare_chat(r, s.config, s.capabilities))
    per_model(served)
    result = await unless_disconnected(
        request.receive,
        Dispatcher(gateway, exchange, ctx).call(served, lambda s, d: d.backend.chat(per_model(s))),
    )
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    return split_answer(result) if served.config.think_tags else result
