"""The index itself: each store's full-text and vector rankings over the real databases."""

from __future__ import annotations

from sqlalchemy import select

from app.config import KnowledgeSettings
from app.knowledge.chunking import TextChunk
from app.knowledge.index import (
    StoreCache,
    delete_chunks,
    text_ranking,
    vector_ranking,
    write_chunks,
)
from app.knowledge.records import Principal
from app.knowledge.schema import Chunk
from app.knowledge.stores import NewStore, Stores
from app.ledger.storage.database import Database

ADMIN = Principal(owner="", sees_all=True)


async def test_each_store_ranks_only_its_own_chunks(db: Database) -> None:
    stores = Stores(db, KnowledgeSettings(), lambda: "embedder", lambda: None)
    ids = [(await stores.create(ADMIN, NewStore(name=n))).store.id for n in ("a", "b")]
    texts = ["the warranty covers the battery", "退货需要在三十天内申请"]
    for n, store_id in enumerate(ids):
        async with db.session() as session, session.begin():
            await write_chunks(
                session,
                store_id,
                f"file-{n}",
                [TextChunk(t, 8, None) for t in texts],
                [[1.0, float(n), 0.0], [0.0, 1.0, float(n)]],
            )
    cache = StoreCache(db)
    for store_id in ids:
        async with db.session() as session:
            rows = await session.execute(
                select(Chunk.id, Chunk.text).where(Chunk.store_id == store_id)
            )
            own: dict[int, str] = {r[0]: r[1] for r in rows}
            for query, expected in (("battery warranty", texts[0]), ("三十天 退货", texts[1])):
                found = text_ranking(await cache.index(store_id), query, 10, None)
                assert [own.get(c) for c, _ in found] == [expected]
        near = vector_ranking(await cache.index(store_id), [1.0, 0.0, 0.0], 10, None)
        assert {c for c, _ in near} == set(own)


async def test_an_index_kept_up_to_date_ranks_as_one_read_afresh(db: Database) -> None:
    stores = Stores(db, KnowledgeSettings(), lambda: "embedder", lambda: None)
    store_id = (await stores.create(ADMIN, NewStore(name="growing"))).store.id
    cache = StoreCache(db)
    words = ["refund", "warranty", "battery", "退款", "ship", "order"]
    queries = ["refund", "battery ship", "退款 order"]
    for n in range(6):
        text = " ".join(words[: n + 1] * (6 - n))
        async with db.session() as session, session.begin():
            await write_chunks(
                session, store_id, f"file-{n}", [TextChunk(text, 8, None)], [[1.0, float(n)]]
            )
        grown = await cache.index(store_id)  # read once, then extended file by file
    assert len(grown.segments) < 6  # neighbours merged
    afresh = await StoreCache(db).index(store_id)
    for query in queries:
        assert dict(text_ranking(grown, query, 10, None)) == dict(
            text_ranking(afresh, query, 10, None)
        )
    async with db.session() as session, session.begin():
        await delete_chunks(session, store_id, "file-0")
    kept = await cache.index(store_id)  # a deletion: read again
    assert len(kept.ids) == 5
    afresh = await StoreCache(db).index(store_id)
    for query in queries:
        assert dict(text_ranking(kept, query, 10, None)) == dict(
            text_ranking(afresh, query, 10, None)
        )
