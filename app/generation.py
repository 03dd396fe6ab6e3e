"""The shared tail of the generation routes: route a prepared request, then stream or answer.

`routed_stream` and `routed_answer` are the one path every generation takes (routing,
failover, fallbacks, usage accounting, `think_tags`); `generate` serves their output as
OpenAI's own wire format, and the other APIs (FIM, Responses, Messages) convert it first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.response import Stream

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
from app.scope import exchange_for
from backends.base import Backend

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)
A = TypeVar("A", bound=ChatCompletion | Completion)

Prepare = Callable[[R, ServedModel], R]

_decode_chunk = msgspec.json.Decoder(ChatCompletionChunk).decode


def _splits(served: ServedModel, req: ChatCompletionRequest | CompletionRequest) -> bool:
    return served.config.think_tags and isinstance(req, ChatCompletionRequest)


def routed_stream(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: R,
    *,
    prepare: Prepare[R],
    stream: Callable[[Backend, R], AsyncIterator[StreamItem]],
) -> AsyncIterator[StreamItem]:
    """Stream `req` from `served` (or its fallbacks); usage is always asked of the backend,
    for accounting. Raises before routing if the model cannot take the request."""
    exchange = exchange_for(request.scope)
    exchange.stream = True
    req = msgspec.structs.replace(
        req, stream=True, stream_options=StreamOptions(include_usage=True)
    )
    per_model = PerModel(req, prepare)
    per_model(served)
    items = Dispatcher(gateway, exchange, ctx).stream(
        served, lambda s, d: stream(d.backend, per_model(s))
    )
    return split_stream(items) if _splits(served, req) else items


async def routed_answer(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: R,
    *,
    prepare: Prepare[R],
    call: Callable[[Backend, R], Awaitable[A]],
) -> A:
    """Answer `req` from `served` (or its fallbacks) in one piece, its usage recorded."""
    exchange = exchange_for(request.scope)
    req = msgspec.structs.replace(req, stream=None, stream_options=None)
    per_model = PerModel(req, prepare)
    per_model(served)
    result = await unless_disconnected(
        request.receive,
        Dispatcher(gateway, exchange, ctx).call(served, lambda s, d: call(d.backend, per_model(s))),
    )
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    if isinstance(result, ChatCompletion) and _splits(served, req):
        split_answer(result)  # in place
    return result


async def generate(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: R,
    *,
    prepare: Prepare[R],
    stream: Callable[[Backend, R], AsyncIterator[StreamItem]],
    call: Callable[[Backend, R], Awaitable[ChatCompletion | Completion]],
) -> Response[bytes] | Stream:
    """Serve a request as SSE or JSON; usage reaches the client only if it asked for it."""
    if req.stream:
        asked = bool(req.stream_options and req.stream_options.include_usage)
        items = routed_stream(request, gateway, ctx, served, req, prepare=prepare, stream=stream)
        exchange = exchange_for(request.scope)
        return await sse_response(observed(items, exchange, strip_usage=not asked))
    result = await routed_answer(request, gateway, ctx, served, req, prepare=prepare, call=call)
    return json_response(result)


def _prepare_chat(req: ChatCompletionRequest, served: ServedModel) -> ChatCompletionRequest:
    return prepare_chat(req, served.config, served.capabilities)


async def chat_chunks(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: ChatCompletionRequest,
) -> AsyncIterator[ChatCompletionChunk]:
    """A chat completion as decoded chunks, for the API bridges (Responses, Messages).

    The last chunk carries the usage. Pull the first chunk before sending headers
    (`named_sse_response` does), so failures before it keep their status code.
    """
    items = routed_stream(
        request,
        gateway,
        ctx,
        served,
        req,
        prepare=_prepare_chat,
        stream=lambda backend, r: backend.stream_chat(r),
    )
    async for item in observed(items, exchange_for(request.scope), strip_usage=False):
        yield _decode_chunk(bytes(item)) if isinstance(item, msgspec.Raw) else item


async def chat_answer(
    request: Request[Any, Any, Any],
    gateway: Gateway,
    ctx: RequestContext,
    served: ServedModel,
    req: ChatCompletionRequest,
) -> ChatCompletion:
    """A chat completion in one piece, for the API bridges; routed and accounted."""
    return await routed_answer(
        request,
        gateway,
        ctx,
        served,
        req,
        prepare=_prepare_chat,
        call=lambda backend, r: backend.chat(r),
    )
