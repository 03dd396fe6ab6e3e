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
    Grounding,
    ResponseStream,
    bridge_request,
    bridge_response,
    file_search_item,
    response_events,
)
from app.api.responses.protocol import CreateResponse
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.core.generation import chat_answer, chat_chunks
from app.core.grounding import (
    SOURCES_HEADER,
    ground,
    prompt_budget,
    question_of,
    search,
    sources_header,
    with_passages,
)
from app.knowledge.records import Principal
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
    chat = bridged.chat
    grounding: Grounding | None = None
    grounded = await ground(gateway, call, chat)
    if grounded is not None:
        chat = grounded.req
        grounding = Grounding(passages=grounded.results)
    tool = bridged.file_search
    if tool is not None:
        query = question_of(bridged.chat.messages)
        options = tool.ranking_options if isinstance(tool.ranking_options, dict) else {}
        threshold = options.get("score_threshold", 0.0)
        results = (
            await search(
                gateway,
                Principal.of(call.ctx.key_id),
                tool.vector_store_ids,
                query,
                max_results=tool.max_num_results,
                filters=tool.filters,
                score_threshold=threshold if isinstance(threshold, int | float) else 0.0,
                rerank=options.get("ranker") != "none",
            )
            if query
            else []
        )
        bound = grounding.passages if grounding else []
        chat, given = with_passages(
            chat, results, budget=prompt_budget(call, chat), first=len(bound) + 1
        )
        passages = [*bound, *given]
        item = file_search_item(query, results, include=bridged.include_results)
        grounding = Grounding(passages=passages, search=item)
        if passages:
            call.exchange.response_headers[SOURCES_HEADER] = sources_header(passages)
    if req.stream:
        chunks = chat_chunks(gateway, call, chat)
        stream = ResponseStream(shell, bridged.namespaced, grounding)
        return await named_sse_response(response_events(chunks, stream), stream.error)
    completion = await chat_answer(gateway, call, chat)
    return json_response(bridge_response(completion, shell, bridged.namespaced, grounding))
