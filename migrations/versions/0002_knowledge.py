"""files, vector stores, their files and batches, chunks and the full-text index

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(200)),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS),
    )
    op.create_index("ix_files_owner_created", "files", ["owner", "created_at"])
    op.create_table(
        "file_parts",
        sa.Column("file_id", sa.String(40), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "vector_stores",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("name", sa.String(512)),
        sa.Column("metadata", sa.JSON()),
        sa.Column("embedding_model", sa.String(200), nullable=False),
        sa.Column("expires_after", sa.JSON()),
        sa.Column("expires_at", _TS),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("last_active_at", _TS, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("purges", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index("ix_vector_stores_owner_created", "vector_stores", ["owner", "created_at"])
    op.create_table(
        "vector_store_files",
        sa.Column(
            "store_id",
            sa.String(40),
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("file_id", sa.String(40), primary_key=True),
        sa.Column("batch_id", sa.String(40)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_error", sa.JSON()),
        sa.Column("attributes", sa.JSON()),
        sa.Column("chunking", sa.JSON(), nullable=False),
        sa.Column("usage_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("lease_until", _TS),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_vector_store_files_status", "vector_store_files", ["status", "lease_until"])
    op.create_index("ix_vector_store_files_batch", "vector_store_files", ["batch_id"])
    op.create_table(
        "vector_store_file_batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "store_id",
            sa.String(40),
            sa.ForeignKey("vector_stores.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index(
        "ix_vector_store_file_batches_store_id", "vector_store_file_batches", ["store_id"]
    )
    op.create_table(
        "chunks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("store_id", sa.String(40), nullable=False),
        sa.Column("file_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("terms", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("page", sa.Integer()),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_chunks_store_file", "chunks", ["store_id", "file_id", "seq"])
    if op.get_bind().dialect.name == "sqlite":
        # `store` holds the store id, so a store's matches are found by the index itself
        # (`store:"vs…" AND (…)`), not by filtering every store's matches afterwards.
        op.execute(
            "CREATE VIRTUAL TABLE chunks_fts USING fts5("
            "store, terms, tokenize = 'porter unicode61 remove_diacritics 2')"
        )
    else:
        # Stored, so ranking reads each match's vector instead of parsing its text again.
        op.execute(
            "ALTER TABLE chunks ADD COLUMN terms_tsv tsvector "
            "GENERATED ALWAYS AS (to_tsvector('simple', terms)) STORED"
        )
        op.execute("CREATE INDEX ix_chunks_terms ON chunks USING gin (terms_tsv)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE chunks_fts")
    for table in (
        "chunks",
        "vector_store_file_batches",
        "vector_store_files",
        "vector_stores",
        "file_parts",
        "files",
    ):
        op.drop_table(table)
