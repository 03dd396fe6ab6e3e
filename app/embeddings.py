"""POST /v1/embeddings."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from app.bodies import decode_body
from app.gateway import Gateway
from app.params import prepare_embedding
from app.protocol import EmbeddingRequest
from app.responses import json_response


@post("/v1/embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Embeddings of a string, strings, or token-id arrays, in input order."""
    req = decode_body(await request.body(), EmbeddingRequest)
    _, served = await gateway.admit_model(request, req.model)
    req = prepare_embedding(req, served.config, served.backend.capabilities)
    return json_response(await served.backend.embed(req))
