"""POST /v1/fim/completions: Mistral's fill-in-the-middle API.

Served as a text completion with `suffix` on the model's deployments, like /v1/completions,
and answered in Mistral's shape: a chat completion, or chat completion chunks with
`delta.content` whose last one (with `finish_reason`) carries the usage. `min_tokens` is
accepted and not enforced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream
from msgspec import Raw

from app.api.bodies import decode_body
from app.api.replies import json_response, sse_response
from app.api.scope import arrival_of
from app.core.gateway import Gateway, ServedModel
from app.core.generation import routed_answer, routed_stream
from app.core.params import prepare_completion
from app.core.usage import observed
from app.errors import UpstreamError
from app.protocol import (
    UNSET,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionRequest,
    FimCompletionRequest,
    ResponseMessage,
    StreamItem,
    StreamOptions,
    Usage,
)
from app.tokens import estimate_completion

_decode_completion = msgspec.json.Decoder(Completion).decode


def completion_request(fim: FimCompletionRequest) -> CompletionRequest:
    """The text completion a FIM request asks for (usage always asked of a stream)."""
    return CompletionRequest(
        model=fim.model,
        prompt=fim.prompt,
        suffix=fim.suffix,
        max_tokens=fim.max_tokens if fim.max_tokens is not None else fim.max_completion_tokens,
        temperature=fim.temperature,
        top_p=fim.top_p,
        stop=fim.stop,
        seed=fim.random_seed,
        frequency_penalty=fim.frequency_penalty,
        presence_penalty=fim.presence_penalty,
        stream=fim.stream,
        stream_options=StreamOptions(include_usage=True) if fim.stream else None,
    )


def answer(result: Completion) -> ChatCompletion:
    """A completion in Mistral's FIM response shape."""
    return ChatCompletion(
        id=result.id,
        created=result.created,
        model=result.model,
        choices=[
            ChatChoice(
                index=choice.index,
                message=ResponseMessage(content=choice.text),
                finish_reason=choice.finish_reason or "stop",
            )
            for choice in result.choices
        ],
        usage=result.usage if isinstance(result.usage, Usage) else UNSET,
    )


def _event(item: StreamItem) -> Completion | None:
    """A completion stream item as a Completion (upstream JSON passed through is decoded)."""
    if isinstance(item, Completion):
        return item
    if isinstance(item, Raw):
        try:
            return _decode_completion(bytes(item))
        except msgspec.MsgspecError as exc:
            raise UpstreamError(f"the backend sent an invalid completion event: {exc}") from exc
    return None


async def chunks(events: AsyncIterator[StreamItem]) -> AsyncIterator[ChatCompletionChunk]:
    """Completion events as chat chunks: the role on the first, the usage on the last."""
    started = False
    last: ChatCompletionChunk | None = None
    usage: Usage | None = None
    async with aclosing(events):  # type: ignore[type-var]
        async for item in events:
            event = _event(item)
            if event is None:
                continue
            if isinstance(event.usage, Usage):
                usage = event.usage
            for choice in event.choices:
                chunk = ChatCompletionChunk(
                    id=event.id,
                    created=event.created,
                    model=event.model,
                    choices=[
                        ChunkChoice(
                            index=choice.index,
                            delta=ChunkDelta(
                                role=UNSET if started else "assistant", content=choice.text
                            ),
                            finish_reason=choice.finish_reason,
                        )
                    ],
                )
                started = True
                if choice.finish_reason is not None:
                    last = chunk
                else:
                    yield chunk
    if last is not None:
        last.usage = usage if usage is not None else UNSET
        yield last


def _prepare(req: CompletionRequest, served: ServedModel) -> CompletionRequest:
    return prepare_completion(req, served.config, served.capabilities)


@post("/v1/fim/completions", status_code=200)
async def fim_completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Code between `prompt` and `suffix`, streamed as SSE when `stream` is true."""
    req = completion_request(decode_body(await request.body(), FimCompletionRequest))
    arrival = arrival_of(request)
    call = await gateway.admit_model(arrival, req.model, partial(estimate_completion, req))
    if req.stream:
        items = routed_stream(
            gateway, call, req, prepare=_prepare, stream=lambda b, r: b.stream_complete(r)
        )
        return await sse_response(chunks(observed(items, call.exchange, strip_usage=False)))
    result = await routed_answer(
        gateway, call, req, prepare=_prepare, answer=lambda b, r: b.complete(r)
    )
    return json_response(answer(result))
