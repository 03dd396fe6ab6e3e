"""POST /v1/embeddings."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from app.api.bodies import decode_body
from app.api.replies import json_response
from app.api.scope import arrival_of
from app.core.dispatch import Dispatcher, PerModel
from app.core.gateway import Gateway
from app.core.params import prepare_embedding
from app.protocol import EmbeddingRequest
from app.tokens import estimate_embedding


@post("/v1/embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Embeddings of a string, strings, or token-id arrays, in input order."""
    req = decode_body(await request.body(), EmbeddingRequest)
    arrival = arrival_of(request)
    call = await gateway.admit_model(arrival, req.model, partial(estimate_embedding, req))
    per_model = PerModel(req, lambda r, s: prepare_embedding(r, s.config, s.capabilities))
    per_model(call.model)
    result = await Dispatcher(gateway, call.exchange, call.ctx).call(
        call.model, lambda s, d: d.backend.embed(per_model(s))
    )
    call.exchange.record_usage(result.usage.prompt_tokens, 0)
    return json_response(result)
