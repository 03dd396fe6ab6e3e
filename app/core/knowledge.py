"""What the knowledge base asks of the served models: embeddings of chunks and queries, and
relevance scores for the rerank stage.

The knowledge room sits beside routing, not above it, so the gateway hands it `ModelCalls`.
Both go through the model's pool (failover between its deployments, cooldowns) but never to
a fallback model: a store's vectors and its queries' must come from the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from app.config import Config, ConfigError, ModelConfig
from app.core.params import prepare_embedding
from app.core.rerank import prepare_rerank, score
from app.errors import ModelNotFound, UpstreamError
from app.protocol import EmbeddingRequest, RerankRequest
from app.routing.pool import Pool
from backends.base import Backend, Capabilities


class Served(Protocol):
    """What is read of a served model (the gateway's `ServedModel`)."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def backends(self) -> Sequence[Backend]: ...


def embedding_model_of(config: Config) -> str:
    """The id of `knowledge.embedding_model`; unset, of the first model whose id or alias
    says it embeds, else of the first model. ConfigError for an unknown name."""
    names = config.model_names()
    wanted = config.knowledge.embedding_model
    if wanted:
        model = names.get(wanted)
        if model is None:
            raise ConfigError(f"knowledge.embedding_model: no model is called {wanted!r}")
        return model.id
    for model in config.models:
        if any("embed" in n or "minilm" in n for n in (model.id, *model.aliases)):
            return model.id
    return config.models[0].id


class ModelCalls:
    """Embeddings and rerank scores through the running gateway's models (a reload points it
    at the new ones)."""

    def __init__(self, config: Config, models: Mapping[str, Served]) -> None:
        self.config = config
        self.models = models

    def point_at(self, config: Config, models: Mapping[str, Served]) -> None:
        """Serve from a reloaded gateway's models."""
        self.config, self.models = config, models

    def embedding_model(self) -> str:
        """The model new vector stores embed with."""
        return embedding_model_of(self.config)

    def _served(self, model: str, named: str) -> Served:
        """The served `model`; 404 naming it as `named` once no longer served."""
        served = self.models.get(model)
        if served is None:
            raise ModelNotFound(f"{named} is no longer served", param="model")
        return served

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Vectors of `texts`, in order."""
        served = self._served(model, f"the embedding model {model!r} of this vector store")
        req = prepare_embedding(
            EmbeddingRequest(model=served.config.id, input=texts),
            served.config,
            served.capabilities,
        )
        result = await served.pool.call(lambda d: d.backend.embed(req))
        ordered = sorted(result.data, key=lambda e: e.index)
        return [e.embedding for e in ordered if isinstance(e.embedding, list)]

    async def rerank(self, model: str, query: str, texts: Sequence[str]) -> list[float]:
        """How relevant each of `texts` is to `query`, by `model`, in order."""
        served = self._served(model, f"the rerank model {model!r}")
        req = prepare_rerank(
            RerankRequest(model=served.config.id, query=query, documents=list(texts)), served
        )
        answer = await served.pool.call(lambda d: score(d.backend, req))
        scores = {r.index: r.relevance_score for r in answer.results}
        if sorted(scores) != list(range(len(texts))):
            raise UpstreamError(f"model {model}: the rerank answer does not score every document")
        return [scores[i] for i in range(len(texts))]
