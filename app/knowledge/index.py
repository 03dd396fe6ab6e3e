"""Chunks in, hits out: the full-text index, the vectors, and fusing the two.

Full text: FTS5's BM25 on SQLite (the `chunks_fts` table); PostgreSQL's `ts_rank` over a GIN
index of the stored `terms_tsv = to_tsvector('simple', terms)`. Both read `terms`
(`app.knowledge.text`), so Chinese is searched as bigrams on either.

Vectors: float32 rows of `chunks.embedding`, searched by an exact dot product over a matrix
each process keeps per store (`VectorCache`). Python's sqlite3 here cannot load extensions
(sqlite-vec), the PostgreSQL server has no pgvector, and an exact scan of 100k x 384 floats is
a few milliseconds of BLAS: the same code serves both databases. A store's `generation` and
`purges` counters say when the cached matrix is stale; chunks added since are read alone.
The matrix costs 4 bytes x dimensions per chunk (150 MB for 100k MiniLM chunks), which is
where this stops scaling: beyond a few million chunks per node, use an ANN index.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.knowledge.chunking import TextChunk
from app.knowledge.schema import Chunk, VectorStore
from app.knowledge.text import index_text, query_terms
from app.ledger.storage.database import Database

RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack et al. 2009; what Elasticsearch and Azure use)."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk found by a search, with its fused score in [0, 1]."""

    chunk_id: int
    file_id: str
    text: str
    score: float
    page: int | None


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
    *,
    sqlite: bool,
) -> None:
    """Replace a file's chunks in a store (in the caller's transaction): indexing a file twice
    leaves it indexed once."""
    await delete_chunks(session, store_id, file_id, sqlite=sqlite)
    rows = [
        Chunk(
            store_id=store_id,
            file_id=file_id,
            seq=seq,
            text=chunk.text,
            terms=index_text(chunk.text),
            tokens=chunk.tokens,
            page=chunk.page,
            embedding=vector_bytes(vector),
        )
        for seq, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))
    ]
    session.add_all(rows)
    await session.flush()
    if sqlite and rows:
        await session.execute(
            text("INSERT INTO chunks_fts (rowid, store, terms) VALUES (:id, :store, :terms)"),
            [{"id": r.id, "store": store_id, "terms": r.terms} for r in rows],
        )
    await session.execute(
        update(VectorStore)
        .where(VectorStore.id == store_id)
        .values(generation=VectorStore.generation + 1)
    )


async def delete_chunks(
    session: AsyncSession, store_id: str, file_id: str | None = None, *, sqlite: bool
) -> None:
    """Remove a store's chunks (of one file, or all), index rows included."""
    where = [Chunk.store_id == store_id]
    if file_id is not None:
        where.append(Chunk.file_id == file_id)
    ids = list(await session.scalars(select(Chunk.id).where(*where)))
    if not ids:
        return
    if sqlite:
        for at in range(0, len(ids), 500):
            part = ids[at : at + 500]
            await session.execute(
                text(f"DELETE FROM chunks_fts WHERE rowid IN ({','.join(map(str, part))})")
            )
    await session.execute(delete(Chunk).where(*where))
    await session.execute(
        update(VectorStore)
        .where(VectorStore.id == store_id)
        .values(generation=VectorStore.generation + 1, purges=VectorStore.purges + 1)
    )


@dataclass(slots=True)
class _Matrix:
    generation: int
    purges: int
    last_id: int
    ids: np.ndarray  # int64 chunk ids
    files: np.ndarray  # object: file id per row
    vectors: np.ndarray  # float32 [n, d]

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.ids.nbytes + self.files.nbytes)


class VectorCache:
    """Each store's vectors as one matrix, kept up to date with the database, least recently
    used stores dropped beyond `max_bytes`."""

    def __init__(self, db: Database, max_bytes: int = 2 << 30) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self._stores: OrderedDict[str, _Matrix] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def matrix(self, store_id: str) -> _Matrix:
        """The store's current matrix (read or brought up to date under a per-store lock)."""
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
                    fresh = await self._read(session, store_id, after=cached.last_id)
                    cached = _Matrix(
                        generation,
                        purges,
                        max(cached.last_id, fresh.last_id),
                        np.concatenate([cached.ids, fresh.ids]),
                        np.concatenate([cached.files, fresh.files]),
                        np.concatenate([cached.vectors, fresh.vectors])
                        if len(fresh.ids)
                        else cached.vectors,
                    )
                else:
                    cached = await self._read(session, store_id, after=0)
                    cached.generation, cached.purges = generation, purges
            self._stores[store_id] = cached
            self._stores.move_to_end(store_id)
            self._evict()
            return cached

    async def _read(self, session: AsyncSession, store_id: str, *, after: int) -> _Matrix:
        rows = (
            await session.execute(
                select(Chunk.id, Chunk.file_id, Chunk.embedding)
                .where(Chunk.store_id == store_id, Chunk.id > after)
                .order_by(Chunk.id)
            )
        ).all()
        if not rows:
            return _Matrix(
                0,
                0,
                after,
                np.zeros(0, np.int64),
                np.zeros(0, object),
                np.zeros((0, 0), np.float32),
            )
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        files = np.array([r[1] for r in rows], dtype=object)
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), -1)
        return _Matrix(0, 0, int(ids[-1]), ids, files, vectors.astype(np.float32, copy=False))

    def _evict(self) -> None:
        total = sum(m.nbytes for m in self._stores.values())
        while total > self.max_bytes and len(self._stores) > 1:
            _, dropped = self._stores.popitem(last=False)
            total -= dropped.nbytes

    def forget(self, store_id: str) -> None:
        """Drop a deleted store's matrix."""
        self._stores.pop(store_id, None)
        self._locks.pop(store_id, None)


async def vector_ranking(
    cache: VectorCache,
    store_id: str,
    query: Sequence[float],
    limit: int,
    files: Collection[str] | None,
) -> list[tuple[int, float]]:
    """The `limit` nearest chunks by cosine similarity: (chunk id, similarity), best first."""
    matrix = await cache.matrix(store_id)
    if not len(matrix.ids):
        return []
    q = np.asarray(query, dtype=np.float32)
    if q.shape[0] != matrix.vectors.shape[1]:
        return []  # a store embedded with another model; its owner is told at search
    scores = matrix.vectors @ (q / (np.linalg.norm(q) or 1.0))
    if files is not None:
        mask = np.isin(matrix.files, list(files))
        scores = np.where(mask, scores, -np.inf)
    k = min(limit, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return [(int(matrix.ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]


async def text_ranking(
    session: AsyncSession,
    store_id: str,
    query: str,
    limit: int,
    files: Collection[str] | None,
    *,
    sqlite: bool,
) -> list[tuple[int, float]]:
    """The `limit` best full-text matches: (chunk id, score), best first."""
    words = query_terms(query)
    if not words:
        return []
    file_list = sorted(files) if files is not None else None
    if file_list is not None and not file_list:
        return []
    params: dict[str, object] = {"store": store_id, "limit": limit}
    if sqlite:
        quoted = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        params["match"] = f'store : "{_store_token(store_id)}" AND ({quoted})'
        if file_list is None:
            sql = (
                "SELECT rowid, bm25(chunks_fts, 0.0, 1.0) AS rank FROM chunks_fts "
                "WHERE chunks_fts MATCH :match ORDER BY rank LIMIT :limit"
            )
        else:
            names = {f"f{i}": f for i, f in enumerate(file_list)}
            params.update(names)
            sql = (
                "SELECT f.rowid, bm25(chunks_fts, 0.0, 1.0) AS rank FROM chunks_fts f "
                "JOIN chunks c ON c.id = f.rowid WHERE chunks_fts MATCH :match "
                f"AND c.file_id IN ({', '.join(':' + n for n in names)}) "
                "ORDER BY rank LIMIT :limit"
            )
        rows = (await session.execute(text(sql), params)).all()
        return [(int(r[0]), -float(r[1])) for r in rows]
    params["query"] = " | ".join("'" + w.replace("'", "''") + "'" for w in words)
    only = ""
    if file_list is not None:
        params["files"] = file_list
        only = "AND file_id = ANY(:files)"
    sql = (
        "SELECT id, ts_rank(terms_tsv, q, 1) AS rank "
        "FROM chunks, to_tsquery('simple', :query) q "
        f"WHERE store_id = :store AND terms_tsv @@ q {only} "
        "ORDER BY rank DESC LIMIT :limit"
    )
    rows = (await session.execute(text(sql), params)).all()
    return [(int(r[0]), float(r[1])) for r in rows]


def _store_token(store_id: str) -> str:
    """The FTS5 token that names a store: `vs_<hex>` is indexed as `vs` and `<hex>`, and a
    phrase of both is checked position by position against every chunk of every store (32 of
    40 ms at 100k chunks); the hex alone is one posting list, and as unique as the id."""
    return store_id.rpartition("_")[2]


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


async def load_hits(session: AsyncSession, fused: Sequence[tuple[int, float]]) -> list[Hit]:
    """The chunks behind fused (id, score) pairs, in that order."""
    if not fused:
        return []
    ids = [c for c, _ in fused]
    rows = {
        r.id: r
        for r in (
            await session.execute(
                select(Chunk.id, Chunk.file_id, Chunk.text, Chunk.page).where(Chunk.id.in_(ids))
            )
        ).all()
    }
    return [
        Hit(chunk_id=c, file_id=rows[c].file_id, text=rows[c].text, score=s, page=rows[c].page)
        for c, s in fused
        if c in rows
    ]


async def count_chunks(session: AsyncSession, store_id: str) -> int:
    """How many chunks a store holds."""
    return int(await session.scalar(select(func.count()).where(Chunk.store_id == store_id)) or 0)
