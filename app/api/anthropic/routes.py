"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, on the chat path.

For Claude Code and the `anthropic` SDKs pointed at the gateway (`ANTHROPIC_BASE_URL`).
Requests are bridged onto chat completions (`app.api.anthropic.bridge`), so every backend serves
them with the same routing, limits and audit; errors on these routes are Anthropic-shaped.
The `anthropic-version` and `anthropic-beta` headers are accepted and not needed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream
from litestar.types import ExceptionHandlersMap

from app.api.anthropic.bridge import (
    estimate_input_tokens,
    message_events,
    server_tools,
    to_chat_messages,
    to_chat_request,
    to_chat_tools,
    to_message,
)
from app.api.anthropic.protocol import CountTokensRequest, CountTokensResponse, MessagesRequest
from app.api.bodies import decode_body
from app.api.errors import anthropic_error_event, anthropic_error_response
from app.api.hosted_tools import note_left_out
from app.api.replies import json_response, named_sse_response
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.core.generation import chat_answer, chat_chunks
from app.core.grounding import ground

# Everything raised on these routes (policies, body decoding, backends) is answered in
# Anthropic's shape; the app-wide handler stays OpenAI's.
ANTHROPIC_ERRORS: ExceptionHandlersMap = {Exception: anthropic_error_response}


@post("/v1/messages", status_code=200, exception_handlers=ANTHROPIC_ERRORS)
async def create_message(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """A message, streamed as Anthropic's named SSE events when `stream` is true."""
    req = decode_body(await request.body(), MessagesRequest)
    chat = to_chat_request(req)
    left_out = server_tools(req.tools)
    # Counted at most once: for token limits, and for `message_start` of a stream.
    input_tokens = cache(lambda: estimate_input_tokens(chat.messages, chat.tools))
    call = await gateway.admit_model(
        arrival_of(request), req.model, lambda: input_tokens() + req.max_tokens
    )
    note_left_out(call.exchange, left_out)
    grounded = await ground(gateway, call, chat)
    if grounded is not None:
        chat = grounded.req  # its sources are named in the x-clawbot-sources header
    if req.stream:
        chunks = chat_chunks(gateway, call, chat)
        events = message_events(chunks, call.model.config.id, input_tokens)
        return await named_sse_response(events, anthropic_error_event)
    result = await chat_answer(gateway, call, chat)
    return json_response(to_message(result, input_tokens))


@post("/v1/messages/count_tokens", status_code=200, exception_handlers=ANTHROPIC_ERRORS)
async def count_message_tokens(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """The prompt's input tokens, estimated in cl100k; nothing is generated."""
    req = decode_body(await request.body(), CountTokensRequest)
    messages, tools = to_chat_messages(req), to_chat_tools(req.tools)
    await gateway.admit_model(arrival_of(request), req.model)
    return json_response(CountTokensResponse(input_tokens=estimate_input_tokens(messages, tools)))
