"""Migration 0003: chunks indexed before it get their lexicon, and the database's own
full-text indexes go (and come back on a downgrade)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from app.knowledge.lexicon import lexicon_bytes
from app.ledger.storage.database import Database, alembic_config

TEXTS = ["Refunds are paid within 14 days.", "订单在三个工作日内发货。"]


async def test_chunks_of_0002_get_their_lexicon_and_the_fts_tables_go(database_url: str) -> None:
    db = Database(database_url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(lambda c: command.upgrade(alembic_config(c), "0002"))
            for seq, body in enumerate(TEXTS):
                await connection.execute(
                    sa.text(
                        "INSERT INTO chunks (store_id, file_id, seq, text, terms, tokens, "
                        "embedding) VALUES ('vs_1', 'file-1', :seq, :text, :text, 9, :vec)"
                    ),
                    {"seq": seq, "text": body, "vec": b"\0" * 12},
                )
        assert await db.upgrade() == "0003"
        async with db.engine.connect() as connection:
            rows = (
                await connection.execute(sa.text("SELECT text, lexicon FROM chunks ORDER BY seq"))
            ).all()
            assert [bytes(r[1]) for r in rows] == [lexicon_bytes(t) for t in TEXTS]
            columns = await connection.run_sync(
                lambda c: {col["name"] for col in sa.inspect(c).get_columns("chunks")}
            )
            tables = await connection.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert "terms" not in columns
        assert "terms_tsv" not in columns
        assert "chunks_fts" not in tables
        async with db.engine.begin() as connection:
            await connection.run_sync(lambda c: command.downgrade(alembic_config(c), "0002"))
        async with db.engine.connect() as connection:
            columns = await connection.run_sync(
                lambda c: {col["name"] for col in sa.inspect(c).get_columns("chunks")}
            )
            count = await connection.scalar(sa.text("SELECT count(*) FROM chunks"))
        assert "terms" in columns
        assert "lexicon" not in columns
        assert count == len(TEXTS)
        assert await db.upgrade() == "0003"
    finally:
        await db.aclose()
