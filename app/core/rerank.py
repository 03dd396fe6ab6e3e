"""Scoring documents against a query on one deployment: the model's own /rerank, or the
cosine similarity of embeddings where it has none.

A deployment that reranks by itself (`capabilities.rerank`: a cross-encoder behind llama.cpp's
server started with `--reranking`, vLLM, Infinity) gets the request passed through. Any other
that embeds scores each document by the cosine similarity of its embedding to the query's,
all texts in one embeddings call: a bi-encoder approximation, which orders near-duplicates
well and subtler relevance worse than a cross-encoder does. POST /v1/rerank and the knowledge
base's rerank stage both score here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol

import msgspec
import numpy as np

from app.config import ModelConfig
from app.errors import InvalidRequest, UnsupportedParameter, UpstreamError, UpstreamStatusError
from app.protocol import EmbeddingRequest, RerankRequest, RerankResponse, RerankResult, RerankUsage
from backends.base import Backend, Reranker

log = logging.getLogger("clawbot.rerank")


class Scorer(Protocol):
    """What rerank reads of a served model (the gateway's `ServedModel`)."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def backends(self) -> Sequence[Backend]: ...


NO_RERANK_ROUTE = frozenset({404, 405, 501})
"""Upstream statuses meaning "no /rerank here" (llama.cpp's server without `--reranking`
answers 501): such a deployment scores by embeddings instead, when it can."""

_INPUT_AT = re.compile(r"^input\[(?P<i>\d+)\]")


def prepare_rerank(req: RerankRequest, served: Scorer) -> RerankRequest:
    """Check that every deployment can score documents; `top_k` becomes `top_n`."""
    if not all(b.capabilities.rerank or b.capabilities.embeddings for b in served.backends):
        raise UnsupportedParameter(
            f"model {served.config.id!r} does not support rerank (it neither reranks nor embeds)",
            param="model",
        )
    top_n = req.top_n if req.top_n is not None else req.top_k
    return msgspec.structs.replace(req, model=served.config.id, top_n=top_n, top_k=None)


async def score(backend: Backend, req: RerankRequest) -> RerankResponse:
    """Every document's score on one deployment, in any order (`ranked` orders them)."""
    if backend.capabilities.rerank and isinstance(backend, Reranker):
        try:
            return await backend.rerank(req)
        except UpstreamStatusError as exc:
            if exc.upstream_status not in NO_RERANK_ROUTE or not backend.capabilities.embeddings:
                raise
            log.info(
                "model %s: the upstream has no /rerank (HTTP %d); scoring by embeddings",
                req.model,
                exc.upstream_status,
            )
    return await score_by_embeddings(backend, req)


async def score_by_embeddings(backend: Backend, req: RerankRequest) -> RerankResponse:
    """Cosine similarity of each document's embedding to the query's (same text, same vector)."""
    texts = req.texts()
    unique = list(dict.fromkeys([req.query, *texts]))
    try:
        answer = await backend.embed(EmbeddingRequest(input=unique, model=req.model))
    except InvalidRequest as exc:
        raise _about_rerank(exc, unique, texts) from exc
    rows = sorted(answer.data, key=lambda item: item.index)
    if [item.index for item in rows] != list(range(len(unique))) or any(
        isinstance(item.embedding, str) for item in rows
    ):
        raise UpstreamError(f"model {req.model}: the embeddings answer does not match its input")
    vectors = np.asarray([item.embedding for item in rows], dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0
    unit = vectors / norms[:, None]
    similarity = np.clip(unit @ unit[0], -1.0, 1.0)
    row_of = {text: i for i, text in enumerate(unique)}
    results = [
        RerankResult(index=i, relevance_score=float(similarity[row_of[text]]))
        for i, text in enumerate(texts)
    ]
    tokens = answer.usage.prompt_tokens
    return RerankResponse(
        id="",
        model=req.model,
        results=results,
        data=results,
        usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _about_rerank(exc: InvalidRequest, unique: list[str], texts: list[str]) -> InvalidRequest:
    """`exc` (about an embeddings input) retold about the rerank field that input came from."""
    match = _INPUT_AT.match(exc.message)
    param = "documents"
    if match and int(match["i"]) < len(unique):
        text = unique[int(match["i"])]
        param = "query" if int(match["i"]) == 0 else f"documents[{texts.index(text)}]"
    message = _INPUT_AT.sub(param, exc.message) if match else exc.message
    return type(exc)(message, param=param, code=exc.code)
