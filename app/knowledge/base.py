"""The knowledge base as the rest of the gateway sees it: files, stores, ingestion, search."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from app.config import KnowledgeSettings
from app.knowledge.blobs import BlobStore, open_blobs
from app.knowledge.extract import Extractor
from app.knowledge.files import Files
from app.knowledge.index import StoreCache
from app.knowledge.ingest import Embed, Ingestor
from app.knowledge.search import Rerank, Searcher
from app.knowledge.stores import Stores
from app.ledger.storage.database import Database

RerankWith = Callable[[str, str, Sequence[str]], Awaitable[list[float]]]
"""Scores texts against a query with a model (by name): `ModelCalls.rerank`."""


class KnowledgeBase:
    """Built once per process (a reload keeps it); `start` launches ingestion."""

    def __init__(
        self,
        db: Database,
        settings: KnowledgeSettings,
        *,
        embed: Embed,
        embedding_model: Callable[[], str],
        rerank_with: RerankWith | None = None,
        extractor: Extractor | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.blobs = blobs or open_blobs(settings.blobs, db)
        self.files = Files(db, self.blobs, settings)
        self.ingestor = Ingestor(db, self.blobs, settings, embed, extractor)
        self.stores = Stores(db, settings, embedding_model, self.ingestor.wake)
        self.cache = StoreCache(db)

        async def embed_query(model: str, text: str) -> list[float]:
            (vector,) = await embed(model, [text])
            return vector

        rerank: Rerank | None = None
        if settings.rerank_model and rerank_with is not None:
            rerank = partial(rerank_with, settings.rerank_model)
        self.searcher = Searcher(
            db, self.stores, self.cache, embed_query, rerank, settings.rerank_candidates
        )

    def start(self) -> None:
        """Start ingestion (files left in progress by an earlier run are taken up again)."""
        self.ingestor.start()

    async def aclose(self) -> None:
        """Stop ingestion."""
        await self.ingestor.aclose()
