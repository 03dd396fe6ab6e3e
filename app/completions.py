"""POST /v1/completions."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.bodies import decode_body
from app.disconnect import unless_disconnected
from app.gateway import Gateway
from app.params import prepare_completion
from app.protocol import CompletionRequest
from app.responses import json_response, sse_response


@post("/v1/completions", status_code=200)
async def completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Text completion, streamed as SSE when `stream` is true."""
    req = decode_body(await request.body(), CompletionRequest)
    _, served = await gateway.admit_model(request, req.model)
    req = prepare_completion(req, served.config, served.backend.capabilities)
    if req.stream:
        return await sse_response(served.backend.stream_complete(req))
    return json_response(await unless_disconnected(request.receive, served.backend.complete(req)))
