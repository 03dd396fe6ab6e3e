"""The shared tail of the generation routes: route a prepared request, then stream or answer.

`routed_stream` and `routed_answer` are the one path every generation takes (routing,
failover, fallbacks, usage accounting, `think_tags`); the web layer serves their output as
OpenAI's own wire format (`app.api.replies.generate`), and the other APIs (FIM, Responses,
Messages) convert it first (`chat_chunks`, `chat_answer`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec

from app.core.disconnect import unless_disconnected
from app.core.dispatch import Dispatcher, PerModel
from app.core.gateway import Call, Gateway, ServedModel
from app.core.params import prepare_chat
from app.core.reasoning import split_answer, split_stream
from app.core.usage import observed
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    StreamItem,
    StreamOptions,
)
from backends.base import Backend

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)
A = TypeVar("A", bound=ChatCompletion | Completion)

Prepare = Callable[[R, ServedModel], R]

_decode_chunk = msgspec.json.Decoder(ChatCompletionChunk).decode


def _splits(served: ServedModel, req: ChatCompletionRequest | CompletionRequest) -> bool:
    return served.config.think_tags and isinstance(req, ChatCompletionRequest)


def routed_stream(
    gateway: Gateway,
    call: Call,
    req: R,
    *,
    prepare: Prepare[R],
    stream: Callable[[Backend, R], AsyncIterator[StreamItem]],
) -> AsyncIterator[StreamItem]:
    """Stream `req` from the call's model (or its fallbacks); usage is always asked of the
    backend, for accounting. Raises before routing if the model cannot take the request."""
    served = call.model
    call.exchange.stream = True
    req = msgspec.structs.replace(
        req, stream=True, stream_options=StreamOptions(include_usage=True)
    )
    per_model = PerModel(req, prepare)
    per_model(served)
    items = Dispatcher(gateway, call.exchange, call.ctx).stream(
        served, lambda s, d: stream(d.backend, per_model(s))
    )
    return split_stream(items) if _splits(served, req) else items


async def routed_answer(
    gateway: Gateway,
    call: Call,
    req: R,
    *,
    prepare: Prepare[R],
    answer: Callable[[Backend, R], Awaitable[A]],
) -> A:
    """Answer `req` from the call's model (or its fallbacks) in one piece, usage recorded."""
    served = call.model
    req = msgspec.structs.replace(req, stream=None, stream_options=None)
    per_model = PerModel(req, prepare)
    per_model(served)
    result = await unless_disconnected(
        call.disconnected,
        Dispatcher(gateway, call.exchange, call.ctx).call(
            served, lambda s, d: answer(d.backend, per_model(s))
        ),
    )
    if result.usage:
        call.exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    if isinstance(result, ChatCompletion) and _splits(served, req):
        split_answer(result)  # in place
    return result


def _prepare_chat(req: ChatCompletionRequest, served: ServedModel) -> ChatCompletionRequest:
    return prepare_chat(req, served.config, served.capabilities)


async def chat_chunks(
    gateway: Gateway, call: Call, req: ChatCompletionRequest
) -> AsyncIterator[ChatCompletionChunk]:
    """A chat completion as decoded chunks, for the API bridges (Responses, Messages).

    The last chunk carries the usage. Pull the first chunk before sending headers
    (`named_sse_response` does), so failures before it keep their status code.
    """
    items = routed_stream(
        gateway, call, req, prepare=_prepare_chat, stream=lambda backend, r: backend.stream_chat(r)
    )
    async for item in observed(items, call.exchange, strip_usage=False):
        yield _decode_chunk(bytes(item)) if isinstance(item, msgspec.Raw) else item


async def chat_answer(gateway: Gateway, call: Call, req: ChatCompletionRequest) -> ChatCompletion:
    """A chat completion in one piece, for the API bridges; routed and accounted."""
    return await routed_answer(
        gateway, call, req, prepare=_prepare_chat, answer=lambda backend, r: backend.chat(r)
    )
