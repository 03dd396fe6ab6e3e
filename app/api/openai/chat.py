"""POST /v1/chat/completions."""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from app.api.bodies import convert, decode_body
from app.api.hosted_tools import OPENAI_BUILT_IN_TOOLS, LeftOut, note_left_out, refuse_required
from app.api.replies import generate
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.core.grounding import ground, sources
from app.core.params import prepare_chat
from app.errors import InvalidRequest
from app.protocol import ChatCompletionRequest, Tool
from app.tokens import estimate_chat


def decode_chat(body: bytes) -> tuple[ChatCompletionRequest, list[LeftOut]]:
    """The request, and the built-in tools (`app.api.hosted_tools`) left out of it.

    Chat tools are function tools; a body that offers a built-in one fails the typed decode,
    and only then is it decoded again loosely to leave those out, so the usual request pays
    nothing for the rare one.
    """
    try:
        return decode_body(body, ChatCompletionRequest), []
    except InvalidRequest as exc:
        if not (exc.param or "").startswith("tools["):
            raise
        refused = exc
    raw = decode_body(body, dict[str, Any])
    tools = raw.get("tools")
    if not isinstance(tools, list):
        raise refused
    left_out = [
        LeftOut(f"tools[{i}]", tool["type"])
        for i, tool in enumerate(tools)
        if isinstance(tool, dict) and tool.get("type") in OPENAI_BUILT_IN_TOOLS
    ]
    if not left_out:
        raise refused
    dropped = {tool.param for tool in left_out}
    kept = [
        convert(tool, Tool, f"tools[{i}]")  # errors keep the tool's place in the request
        for i, tool in enumerate(tools)
        if f"tools[{i}]" not in dropped
    ]
    if not kept and raw.get("tool_choice") == "required":
        raise refuse_required(left_out, "tool_choice")
    raw["tools"] = None
    if not kept:
        raw.pop("tool_choice", None)
    req = convert(raw, ChatCompletionRequest, "")
    return msgspec.structs.replace(req, tools=kept or None), left_out


@post("/v1/chat/completions", status_code=200)
async def chat_completions(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes] | Stream:
    """Chat completion, streamed as SSE when `stream` is true."""
    req, left_out = decode_chat(await request.body())
    call = await gateway.admit_model(arrival_of(request), req.model, partial(estimate_chat, req))
    note_left_out(call.exchange, left_out)
    grounded = await ground(gateway, call, req)
    if grounded is not None:
        req = grounded.req
    return await generate(
        gateway,
        call,
        req,
        prepare=lambda r, s: prepare_chat(r, s.config, s.capabilities),
        stream=lambda backend, r: backend.stream_chat(r),
        answer=lambda backend, r: backend.chat(r),
        extension={"sources": sources(grounded.results)} if grounded and grounded.results else None,
    )
