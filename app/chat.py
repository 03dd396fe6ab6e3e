"""POST /v1/chat/completions."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.bodies import decode_body
from app.gateway import Gateway
from app.generation import generate
from app.params import prepare_chat
from app.protocol import ChatCompletionRequest
from app.tokens import estimate_chat


@post("/v1/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Chat completion, streamed as SSE when `stream` is true."""
    req = decode_body(await request.body(), ChatCompletionRequest)
    ctx, served = await gateway.admit_model(request, req.model, partial(estimate_chat, req))
    return await generate(
        request,
        gateway,
        ctx,
        served,
        req,
        prepare=lambda r, s: prepare_chat(r, s.config, s.capabilities),
        stream=lambda backend, r: backend.stream_chat(r),
        call=lambda backend, r: backend.chat(r),
    )
