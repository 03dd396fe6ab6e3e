"""POST /v1/chat/completions."""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.accounting import exchange_for
from app.bodies import decode_body
from app.disconnect import unless_disconnected
from app.gateway import Gateway
from app.params import prepare_chat
from app.protocol import ChatCompletionRequest, StreamOptions
from app.responses import json_response, observed, sse_response
from app.tokens import estimate_chat


@post("/v1/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Chat completion, streamed as SSE when `stream` is true."""
    req = decode_body(await request.body(), ChatCompletionRequest)
    exchange = exchange_for(request.scope)
    _, served = await gateway.admit_model(request, req.model, partial(estimate_chat, req))
    req = prepare_chat(req, served.config, served.backend.capabilities)
    if req.stream:
        exchange.stream = True
        # Usage is always asked of the backend, for accounting; the client gets it if it asked.
        asked = bool(req.stream_options and req.stream_options.include_usage)
        req = msgspec.structs.replace(req, stream_options=StreamOptions(include_usage=True))
        source = served.backend.stream_chat(req)
        return await sse_response(observed(source, exchange, strip_usage=not asked))
    result = await unless_disconnected(request.receive, served.backend.chat(req))
    if result.usage:
        exchange.record_usage(result.usage.prompt_tokens, result.usage.completion_tokens)
    return json_response(result)
