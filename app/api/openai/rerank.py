"""POST /v1/rerank (and /rerank): a query's documents, most relevant first (scored by
`app.core.rerank`: the deployment's own /rerank, or embedding similarity)."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from app.api.bodies import decode_body
from app.api.replies import json_response
from app.api.scope import arrival_of
from app.core.disconnect import unless_disconnected
from app.core.dispatch import Dispatcher, PerModel
from app.core.gateway import Gateway
from app.core.rerank import prepare_rerank, score
from app.errors import UpstreamError
from app.protocol import UNSET, RerankDocument, RerankRequest, RerankResponse, RerankResult
from app.tokens import count_tokens


def estimate_rerank(req: RerankRequest) -> int:
    """Query and document tokens (cl100k)."""
    return count_tokens(req.query) + sum(count_tokens(text) for text in req.texts())


def ranked(req: RerankRequest, answer: RerankResponse, request_id: str) -> RerankResponse:
    """The answer's results, most relevant first, cut to `top_n`, with documents if asked."""
    texts = req.texts()
    indexes = [r.index for r in answer.results]
    if len(set(indexes)) != len(indexes) or not all(0 <= i < len(texts) for i in indexes):
        raise UpstreamError(f"model {answer.model}: the rerank answer has invalid indexes")
    order = sorted(answer.results, key=lambda r: (-r.relevance_score, r.index))
    if req.top_n is not None:
        order = order[: req.top_n]
    results = [
        RerankResult(
            index=r.index,
            relevance_score=r.relevance_score,
            document=RerankDocument(text=texts[r.index]) if req.return_documents else UNSET,
        )
        for r in order
    ]
    return RerankResponse(
        id=answer.id or f"rerank-{request_id}",
        model=answer.model,
        results=results,
        data=results,
        usage=answer.usage,
    )


@post("/v1/rerank", status_code=200)
async def rerank(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Documents ordered by relevance to the query, as `results` and as `data`."""
    req = decode_body(await request.body(), RerankRequest)
    call = await gateway.admit_model(arrival_of(request), req.model, partial(estimate_rerank, req))
    per_model = PerModel(req, prepare_rerank)
    prepared = per_model(call.model)
    dispatcher = Dispatcher(gateway, call.exchange, call.ctx)
    answer = await unless_disconnected(
        call.disconnected,
        dispatcher.call(call.model, lambda s, d: score(d.backend, per_model(s))),
    )
    call.exchange.record_usage(answer.usage.prompt_tokens, 0)
    return json_response(ranked(prepared, answer, call.ctx.request_id))
