"""A search over one or more vector stores: full text and vectors per store, fused, filtered,
reranked when a rerank model is configured, cut at a score threshold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ClientClosedRequest, GatewayError, InvalidRequest
from app.knowledge.index import (
    StoreCache,
    reciprocal_rank_fusion,
    text_ranking,
    vector_ranking,
)
from app.knowledge.records import Principal, check_filter, matches
from app.knowledge.schema import Chunk, StoredFile, VectorStore, VectorStoreFile
from app.knowledge.stores import Stores, searchable_store
from app.ledger.storage.database import Database

EmbedQuery = Callable[[str, str], Awaitable[list[float]]]
"""Embeds one query with a model (by id)."""

Rerank = Callable[[str, Sequence[str]], Awaitable[list[float]]]
"""Scores texts against a query (the rerank model's relevance, in the texts' order)."""

log = logging.getLogger("clawbot.knowledge")


@dataclass(frozen=True, slots=True)
class Query:
    """What a search asks for."""

    text: str
    max_num_results: int = 10
    filters: Mapping[str, Any] | None = None
    score_threshold: float = 0.0
    rerank: bool = True
    """Run the rerank stage, where one is configured (`ranking_options.ranker: "none"`: no)."""


@dataclass(frozen=True, slots=True)
class Result:
    """A hit with where it came from."""

    store_id: str
    file_id: str
    filename: str
    score: float
    text: str
    attributes: Mapping[str, Any]
    page: int | None
    chunk_id: int


class Searcher:
    """Hybrid search over the stores a caller may see."""

    def __init__(
        self,
        db: Database,
        stores: Stores,
        cache: StoreCache,
        embed_query: EmbedQuery,
        rerank: Rerank | None = None,
        rerank_candidates: int = 20,
    ) -> None:
        self.db = db
        self.stores = stores
        self.cache = cache
        self.embed_query = embed_query
        self.rerank = rerank
        self.rerank_candidates = rerank_candidates

    async def search(
        self, principal: Principal, store_ids: Sequence[str], query: Query
    ) -> list[Result]:
        """The best chunks for `query` over `store_ids`, best first."""
        if not query.text.strip():
            raise InvalidRequest("query must not be empty", param="query")
        if not 1 <= query.max_num_results <= 50:
            raise InvalidRequest("max_num_results must be from 1 to 50", param="max_num_results")
        if query.filters is not None:
            check_filter(query.filters)
        depth = max(4 * query.max_num_results, 40)
        vectors: dict[str, list[float]] = {}
        fused: list[tuple[int, float]] = []
        # One session for the whole search: each of SQLite's is a thread hop per step.
        async with self.db.session() as session:
            stores = [await searchable_store(session, principal, s) for s in store_ids]
            for store in stores:
                fused += await self._store_ranking(session, store, query, depth, vectors)
            fused.sort(key=lambda item: -item[1])
            results = await _results(session, fused[:depth])
        if query.rerank and self.rerank is not None:
            results = await self._reranked(query, results)
        results = [r for r in results if r.score >= query.score_threshold]
        for store in stores:
            await self.stores.touch(store)
        return results[: query.max_num_results]

    async def _reranked(self, query: Query, results: list[Result]) -> list[Result]:
        """The best fused candidates in the rerank model's order, scored by it. Should the model
        fail, the fused order stands (logged): a search answers without its rerank stage."""
        assert self.rerank is not None
        head = results[: max(self.rerank_candidates, query.max_num_results)]
        if not head:
            return head
        try:
            scores = await self.rerank(query.text, [r.text for r in head])
        except ClientClosedRequest:
            raise
        except GatewayError as exc:
            log.warning("rerank failed, results keep the fused order: %s", exc.message)
            return results
        scored = [replace(r, score=round(s, 6)) for r, s in zip(head, scores, strict=True)]
        return sorted(scored, key=lambda r: -r.score)

    async def _store_ranking(
        self,
        session: AsyncSession,
        store: VectorStore,
        query: Query,
        depth: int,
        vectors: dict[str, list[float]],
    ) -> list[tuple[int, float]]:
        allowed = await _allowed_files(session, store, query.filters)
        if allowed is not None and not allowed:
            return []
        model = store.embedding_model
        current = self.cache.index(store.id, store.generation)
        if model in vectors:
            index = await current
        else:  # the query is embedded while the store's index is brought up to date
            vector, index = await asyncio.gather(self.embed_query(model, query.text), current)
            vectors[model] = vector
        rows = index.allowed(allowed)
        by_text = text_ranking(index, query.text, depth, rows)
        by_vector = vector_ranking(index, vectors[model], depth, rows)
        return reciprocal_rank_fusion([by_text, by_vector])


_RESULTS = (
    select(
        Chunk.id,
        Chunk.store_id,
        Chunk.file_id,
        Chunk.text,
        Chunk.page,
        StoredFile.filename,
        VectorStoreFile.attributes,
    )
    .outerjoin(StoredFile, StoredFile.id == Chunk.file_id)
    .outerjoin(
        VectorStoreFile,
        (VectorStoreFile.store_id == Chunk.store_id) & (VectorStoreFile.file_id == Chunk.file_id),
    )
    .where(Chunk.id.in_(bindparam("ids", expanding=True)))
)
"""Built once: building and keying this statement per search cost more than running it."""


async def _results(session: AsyncSession, fused: Sequence[tuple[int, float]]) -> list[Result]:
    """The chunks behind fused (id, score) pairs, with their files' names and attributes, in
    that order (one query)."""
    if not fused:
        return []
    rows = (await session.execute(_RESULTS, {"ids": [c for c, _ in fused]})).all()
    found = {r.id: r for r in rows}
    return [
        Result(
            store_id=r.store_id,
            file_id=r.file_id,
            filename=r.filename or r.file_id,
            score=round(score, 6),
            text=r.text,
            attributes=r.attributes or {},
            page=r.page,
            chunk_id=chunk_id,
        )
        for chunk_id, score in fused
        if (r := found.get(chunk_id)) is not None
    ]


async def _allowed_files(
    session: AsyncSession, store: VectorStore, filters: Mapping[str, Any] | None
) -> set[str] | None:
    """Files whose attributes pass the filter (None: no filter, every file)."""
    if filters is None:
        return None
    rows = (
        await session.execute(
            select(VectorStoreFile.file_id, VectorStoreFile.attributes).where(
                VectorStoreFile.store_id == store.id,
                VectorStoreFile.status == "completed",
            )
        )
    ).all()
    return {file_id for file_id, attrs in rows if matches(filters, attrs)}
