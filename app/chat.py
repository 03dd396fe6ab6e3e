"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.bodies import decode_body
from app.disconnect import unless_disconnected
from app.gateway import Gateway
from app.params import prepare_chat
from app.protocol import ChatCompletionRequest
from app.responses import json_response, sse_response


@post("/v1/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Chat completion, streamed as SSE when `stream` is true."""
    req = decode_body(await request.body(), ChatCompletionRequest)
    _, served = await gateway.admit_model(request, req.model)
    req = prepare_chat(req, served.config, served.backend.capabilities)
    if req.stream:
        return await sse_response(served.backend.stream_chat(req))
    return json_response(await unless_disconnected(request.receive, served.backend.chat(req)))
