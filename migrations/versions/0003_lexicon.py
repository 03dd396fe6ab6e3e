"""chunks keep their lexicon (term hashes and counts) for the in-memory full-text index; the
database's own full-text indexes go

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.knowledge.lexicon import lexicon_bytes

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("DROP TABLE chunks_fts")
    else:
        op.execute("DROP INDEX ix_chunks_terms")
        op.drop_column("chunks", "terms_tsv")
    op.add_column("chunks", sa.Column("lexicon", sa.LargeBinary()))
    chunks = sa.table(
        "chunks", sa.column("id", sa.Integer), sa.column("text"), sa.column("lexicon")
    )
    after = 0
    while True:
        rows = bind.execute(
            sa.select(chunks.c.id, chunks.c.text)
            .where(chunks.c.id > after)
            .order_by(chunks.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        bind.execute(
            chunks.update().where(chunks.c.id == sa.bindparam("row")),
            [{"row": r[0], "lexicon": lexicon_bytes(r[1])} for r in rows],
        )
        after = rows[-1][0]
    with op.batch_alter_table("chunks") as batch:
        batch.alter_column("lexicon", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("terms")


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("terms", sa.Text(), nullable=False, server_default=""))
        batch.drop_column("lexicon")
    op.execute("UPDATE chunks SET terms = lower(text)")
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE chunks_fts USING fts5("
            "store, terms, tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        op.execute(
            "INSERT INTO chunks_fts (rowid, store, terms) SELECT id, store_id, terms FROM chunks"
        )
    else:
        op.execute(
            "ALTER TABLE chunks ADD COLUMN terms_tsv tsvector "
            "GENERATED ALWAYS AS (to_tsvector('simple', terms)) STORED"
        )
        op.execute("CREATE INDEX ix_chunks_terms ON chunks USING gin (terms_tsv)")
