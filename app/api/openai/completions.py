"""POST /v1/completions."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.api.bodies import decode_body
from app.api.replies import generate
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.core.params import prepare_completion
from app.protocol import CompletionRequest
from app.tokens import estimate_completion


@post("/v1/completions", status_code=200)
async def completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Text completion, streamed as SSE when `stream` is true."""
    req = decode_body(await request.body(), CompletionRequest)
    arrival = arrival_of(request)
    call = await gateway.admit_model(arrival, req.model, partial(estimate_completion, req))
    return await generate(
        gateway,
        call,
        req,
        prepare=lambda r, s: prepare_completion(r, s.config, s.capabilities),
        stream=lambda backend, r: backend.stream_complete(r),
        answer=lambda backend, r: backend.complete(r),
    )
