"""Chunks in, hits out: each store's chunks as one in-memory index, full text and vectors,
ranked and fused.

Both rankings read what ingestion wrote with each chunk: its `lexicon` (term hashes and
counts, scored by BM25 in `app.knowledge.lexicon`) and its `embedding` (float32, searched by
an exact dot product). A store's rows are read once per process into a `StoreIndex` entry
(`StoreCache`), kept current by the store's `generation` and `purges` counters: chunks added
since are read alone, a deletion re-reads the store. The same code serves SQLite and
PostgreSQL (Python's sqlite3 here cannot load sqlite-vec, the PostgreSQL server has no
pgvector), and ranks the same on both. Memory is where it stops scaling: 4 bytes x dimensions
per chunk for the vectors (150 MB for 100k MiniLM chunks) and 10 bytes per distinct term of a
chunk for the postings; beyond a few million chunks per node, use an ANN index.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.knowledge.chunking import TextChunk
from app.knowledge.lexicon import Segment, appended, bm25, lexicon_bytes, segment
from app.knowledge.schema import Chunk, VectorStore
from app.ledger.storage.database import Database

RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack et al. 2009; what Elasticsearch and Azure use)."""


def vector_bytes(vector: Sequence[float]) -> bytes:
    """A vector as stored: float32, L2-normalized, little-endian."""
    array = np.asarray(vector, dtype="<f4")
    norm = float(np.linalg.norm(array))
    return (array / norm if norm > 0 else array).astype("<f4").tobytes()


async def write_chunks(
    session: AsyncSession,
    store_id: str,
    file_id: str,
    chunks: Sequence[TextChunk],
    vectors: Sequence[Sequence[float]],
) -> None:
    """Replace a file's chunks in a store (in the caller's transaction): indexing a file twice
    leaves it indexed once."""
    await delete_chunks(session, store_id, file_id)
    rows = [
        Chunk(
            store_id=store_id,
            file_id=file_id,
            seq=seq,
            text=chunk.text,
            lexicon=lexicon_bytes(chunk.text),
            tokens=chunk.tokens,
            page=chunk.page,
            embedding=vector_bytes(vector),
        )
        for seq, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))
    ]
    session.add_all(rows)
    await session.flush()
    await session.execute(
        update(VectorStore)
        .where(VectorStore.id == store_id)
        .values(generation=VectorStore.generation + 1)
    )


async def delete_chunks(session: AsyncSession, store_id: str, file_id: str | None = None) -> None:
    """Remove a store's chunks (of one file, or all)."""
    where = [Chunk.store_id == store_id]
    if file_id is not None:
        where.append(Chunk.file_id == file_id)
    removed = await session.execute(delete(Chunk).where(*where))
    if not removed.rowcount:  # type: ignore[attr-defined]
        return
    await session.execute(
        update(VectorStore)
        .where(VectorStore.id == store_id)
        .values(generation=VectorStore.generation + 1, purges=VectorStore.purges + 1)
    )


@dataclass(slots=True)
class StoreIndex:
    """A store's chunks in memory, one row each: ids, files, vectors, postings."""

    generation: int
    purges: int
    last_id: int
    ids: np.ndarray  # int64 chunk ids
    files: np.ndarray  # object: file id per row
    vectors: np.ndarray  # float32 [n, d]
    lengths: np.ndarray  # float32: terms per row
    segments: list[Segment]

    @property
    def nbytes(self) -> int:
        parts = (self.vectors, self.ids, self.files, self.lengths)
        return sum(int(x.nbytes) for x in parts) + sum(s.nbytes for s in self.segments)

    def extended(self, fresh: StoreIndex) -> StoreIndex:
        """This index with `fresh`'s rows after its own."""
        if not len(fresh.ids):
            return self
        return StoreIndex(
            fresh.generation,
            fresh.purges,
            fresh.last_id,
            np.concatenate([self.ids, fresh.ids]),
            np.concatenate([self.files, fresh.files]),
            np.concatenate([self.vectors, fresh.vectors]) if len(self.ids) else fresh.vectors,
            np.concatenate([self.lengths, fresh.lengths]),
            appended(self.segments, fresh.segments[0]),
        )

    def allowed(self, files: Collection[str] | None) -> np.ndarray | None:
        """A mask of the rows of `files` (None: every row)."""
        return None if files is None else np.isin(self.files, list(files))


class StoreCache:
    """Each store's `StoreIndex`, kept up to date with the database, least recently used
    stores dropped beyond `max_bytes`."""

    def __init__(self, db: Database, max_bytes: int = 2 << 30) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self._stores: OrderedDict[str, StoreIndex] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def index(self, store_id: str, generation: int | None = None) -> StoreIndex:
        """The store's current index (read or brought up to date under a per-store lock).
        A caller that has just read the store's row passes its `generation`: an index that
        has it is current without asking the database again."""
        cached = self._stores.get(store_id)
        if cached is not None and generation is not None and cached.generation == generation:
            self._stores.move_to_end(store_id)
            return cached
        lock = self._locks.setdefault(store_id, asyncio.Lock())
        async with lock:
            async with self.db.session() as session:
                counters = (
                    await session.execute(
                        select(VectorStore.generation, VectorStore.purges).where(
                            VectorStore.id == store_id
                        )
                    )
                ).one_or_none()
                generation, purges = counters if counters is not None else (0, 0)
                cached = self._stores.get(store_id)
                if cached is not None and cached.generation == generation:
                    self._stores.move_to_end(store_id)
                    return cached
                if cached is not None and cached.purges == purges:
                    fresh = await self._read(session, store_id, cached.last_id, len(cached.ids))
                    cached = await asyncio.to_thread(cached.extended, fresh)
                    cached.generation = generation
                else:
                    cached = await self._read(session, store_id, 0, 0)
                    cached.generation, cached.purges = generation, purges
            self._stores[store_id] = cached
            self._stores.move_to_end(store_id)
            self._evict()
            return cached

    async def _read(
        self, session: AsyncSession, store_id: str, after: int, first_row: int
    ) -> StoreIndex:
        rows = (
            await session.execute(
                select(Chunk.id, Chunk.file_id, Chunk.embedding, Chunk.lexicon)
                .where(Chunk.store_id == store_id, Chunk.id > after)
                .order_by(Chunk.id)
            )
        ).all()
        if not rows:
            empty = np.zeros(0, np.float32)
            return StoreIndex(
                0,
                0,
                after,
                np.zeros(0, np.int64),
                np.zeros(0, object),
                np.zeros((0, 0), np.float32),
                empty,
                [],
            )
        # Off the event loop: at 100k chunks this is seconds of joining and sorting, which
        # every other request would otherwise wait out.
        return await asyncio.to_thread(_built, rows, first_row)

    def _evict(self) -> None:
        total = sum(m.nbytes for m in self._stores.values())
        while total > self.max_bytes and len(self._stores) > 1:
            _, dropped = self._stores.popitem(last=False)
            total -= dropped.nbytes

    def forget(self, store_id: str) -> None:
        """Drop a deleted store's index."""
        self._stores.pop(store_id, None)
        self._locks.pop(store_id, None)


def _built(rows: Sequence[Any], first_row: int) -> StoreIndex:
    """A `StoreIndex` of (id, file id, embedding, lexicon) rows, numbered from `first_row`."""
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    files = np.array([r[1] for r in rows], dtype=object)
    vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), -1)
    postings, lengths = segment([r[3] for r in rows], first_row)
    return StoreIndex(
        0,
        0,
        int(ids[-1]),
        ids,
        files,
        vectors.astype(np.float32, copy=False),
        lengths,
        [postings],
    )


def _top(
    index: StoreIndex, scores: np.ndarray, limit: int, rows: np.ndarray | None = None
) -> list[tuple[int, float]]:
    """The `limit` best of `rows` (default: all) by `scores`, best first."""
    picked = scores if rows is None else scores[rows]
    k = min(limit, len(picked))
    if k <= 0:
        return []
    best = np.argpartition(picked, len(picked) - k)[len(picked) - k :]
    if rows is not None:
        best = rows[best]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(index.ids[i]), float(scores[i])) for i in best]


def vector_ranking(
    index: StoreIndex, query: Sequence[float], limit: int, allowed: np.ndarray | None
) -> list[tuple[int, float]]:
    """The `limit` nearest chunks by cosine similarity, of the rows `allowed` (a mask from
    `StoreIndex.allowed`; None: all): (chunk id, similarity), best first."""
    if not len(index.ids):
        return []
    q = np.asarray(query, dtype=np.float32)
    if q.shape[0] != index.vectors.shape[1]:
        return []  # a store embedded with another model; its owner is told at search
    scores = index.vectors @ (q / (np.linalg.norm(q) or 1.0))
    return _top(index, scores, limit, None if allowed is None else np.flatnonzero(allowed))


def text_ranking(
    index: StoreIndex, query: str, limit: int, allowed: np.ndarray | None
) -> list[tuple[int, float]]:
    """The `limit` best full-text matches by BM25, of the rows `allowed` (as for
    `vector_ranking`): (chunk id, score), best first."""
    scores = bm25(index.segments, index.lengths, query, allowed)
    # Only the matches: selecting among the many equal zeros is most of the work otherwise.
    return _top(index, scores, limit, np.flatnonzero(scores))


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[tuple[int, float]]],
    k: int = RRF_K,
    weights: Sequence[float] | None = None,
) -> list[tuple[int, float]]:
    """Chunk ids by the (weighted) sum of 1 / (k + rank) over the rankings, scaled so that
    first in every ranking is 1.0."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[int, float] = {}
    for weight, ranking in zip(weights, rankings, strict=True):
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (k + rank)
    best = sum(weights) / (k + 1) if rankings else 1.0
    return sorted(((c, s / best) for c, s in fused.items()), key=lambda p: -p[1])


def linear_fusion(
    rankings: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Chunk ids by a weighted sum of each ranking's min-max normalized scores (the
    alternative `bench/knowledge.py` measures against RRF)."""
    weights = weights or [1.0 / len(rankings)] * len(rankings)
    fused: dict[int, float] = {}
    for weight, ranking in zip(weights, rankings, strict=True):
        if not ranking:
            continue
        scores = [s for _, s in ranking]
        low, high = min(scores), max(scores)
        span = high - low or 1.0
        for chunk_id, score in ranking:
            fused[chunk_id] = fused.get(chunk_id, 0.0) + weight * (score - low) / span
    return sorted(fused.items(), key=lambda p: -p[1])
