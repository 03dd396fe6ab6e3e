"""POST /v1/responses: the OpenAI Responses API, served by the chat path of any backend."""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.api.bodies import decode_body
from app.api.hosted_tools import note_left_out
from app.api.replies import json_response, named_sse_response
from app.api.responses.bridge import (
    ResponseStream,
    bridge_request,
    bridge_response,
    response_events,
)
from app.api.responses.protocol import CreateResponse
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.core.generation import chat_answer, chat_chunks
from app.tokens import estimate_chat


@post("/v1/responses", status_code=200)
async def create_response(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """A model response, streamed as named SSE events when `stream` is true."""
    req = decode_body(await request.body(), CreateResponse)
    bridged = bridge_request(req)
    call = await gateway.admit_model(
        arrival_of(request), req.model, partial(estimate_chat, bridged.chat)
    )
    # Until the backend answers, the response names the model as configured (not an alias).
    shell = msgspec.structs.replace(bridged.shell, model=call.model.config.id)
    note_left_out(call.exchange, bridged.left_out)
    if req.stream:
        chunks = chat_chunks(gateway, call, bridged.chat)
        stream = ResponseStream(shell, bridged.namespaced)
        return await named_sse_response(response_events(chunks, stream), stream.error)
    completion = await chat_answer(gateway, call, bridged.chat)
    return json_response(bridge_response(completion, shell, bridged.namespaced))
