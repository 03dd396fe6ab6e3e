"""A search over one or more vector stores: full text and vectors per store, fused, filtered,
reranked when a rerank model is configured, cut at a score threshold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select

from app.errors import ClientClosedRequest, GatewayError, InvalidRequest
from app.knowledge.index import (
    VectorCache,
    load_hits,
    reciprocal_rank_fusion,
    text_ranking,
    vector_ranking,
)
from app.knowledge.records import Principal, check_filter, matches
from app.knowledge.schema import StoredFile, VectorStore, VectorStoreFile
from app.knowledge.stores import Stores, StoreView
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
        cache: VectorCache,
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
        views = [await self.stores.view(principal, s) for s in store_ids]
        for view in views:
            if view.status == "expired":
                raise InvalidRequest(
                    f"vector store {view.store.id!r} has expired", param="vector_store_id"
                )
        depth = max(4 * query.max_num_results, 40)
        vectors: dict[str, list[float]] = {}
        fused: list[tuple[str, int, float]] = []
        for view in views:
            ranked = await self._store_ranking(view, query, depth, vectors)
            fused += [(view.store.id, chunk_id, score) for chunk_id, score in ranked]
        fused.sort(key=lambda item: -item[2])
        fused = fused[:depth]
        async with self.db.session() as session:
            hits = await load_hits(session, [(c, s) for _, c, s in fused])
            stores_of = {c: s for s, c, _ in fused}
            files = await self._file_facts(
                session, {(stores_of[h.chunk_id], h.file_id) for h in hits}
            )
        results = [
            Result(
                store_id=stores_of[h.chunk_id],
                file_id=h.file_id,
                filename=files[(stores_of[h.chunk_id], h.file_id)][0],
                score=round(h.score, 6),
                text=h.text,
                attributes=files[(stores_of[h.chunk_id], h.file_id)][1],
                page=h.page,
                chunk_id=h.chunk_id,
            )
            for h in hits
        ]
        if query.rerank and self.rerank is not None:
            results = await self._reranked(query, results)
        results = [r for r in results if r.score >= query.score_threshold]
        for view in views:
            await self.stores.touch(view.store)
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
        self, view: StoreView, query: Query, depth: int, vectors: dict[str, list[float]]
    ) -> list[tuple[int, float]]:
        store = view.store
        allowed = await self._allowed_files(store, query.filters)
        if allowed is not None and not allowed:
            return []
        model = store.embedding_model
        if model not in vectors:
            vectors[model] = await self.embed_query(model, query.text)
        async with self.db.session() as session:
            by_text, by_vector = await asyncio.gather(
                text_ranking(
                    session, store.id, query.text, depth, allowed, sqlite=self.db.is_sqlite
                ),
                vector_ranking(self.cache, store.id, vectors[model], depth, allowed),
            )
        return reciprocal_rank_fusion([by_text, by_vector])

    async def _allowed_files(
        self, store: VectorStore, filters: Mapping[str, Any] | None
    ) -> set[str] | None:
        """Files whose attributes pass the filter (None: no filter, every file)."""
        if filters is None:
            return None
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(VectorStoreFile.file_id, VectorStoreFile.attributes).where(
                        VectorStoreFile.store_id == store.id,
                        VectorStoreFile.status == "completed",
                    )
                )
            ).all()
        return {file_id for file_id, attrs in rows if matches(filters, attrs)}

    async def _file_facts(
        self, session: Any, pairs: set[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str, Mapping[str, Any]]]:
        facts: dict[tuple[str, str], tuple[str, Mapping[str, Any]]] = {}
        if not pairs:
            return facts
        file_ids = {f for _, f in pairs}
        names = dict(
            (
                await session.execute(
                    select(StoredFile.id, StoredFile.filename).where(StoredFile.id.in_(file_ids))
                )
            ).all()
        )
        rows = (
            await session.execute(
                select(
                    VectorStoreFile.store_id, VectorStoreFile.file_id, VectorStoreFile.attributes
                ).where(VectorStoreFile.file_id.in_(file_ids))
            )
        ).all()
        attributes = {(s, f): a or {} for s, f, a in rows}
        for pair in pairs:
            facts[pair] = (names.get(pair[1], pair[1]), attributes.get(pair, {}))
        return facts
