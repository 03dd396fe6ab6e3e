"""The knowledge base's tables (on the ledger's declarative base: one schema, one migration
history). `migrations/versions/0002_knowledge.py` creates them; 0003 gives chunks their
lexicon in place of the database's own full-text indexes (`app.knowledge.lexicon` says why)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.ledger.storage.schema import Base

_BIGINT_ID = BigInteger().with_variant(Integer, "sqlite")


class StoredFile(Base):
    """An uploaded file (the Files API's File object); its bytes are in the blob store."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40))
    """The key id that uploaded it ("" with auth off, "master" for the master key)."""
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FilePart(Base):
    """A slice of a file's bytes, for the `database:` blob store (slices keep rows small)."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class VectorStore(Base):
    """A vector store: a named set of files, chunked, embedded and indexed."""

    __tablename__ = "vector_stores"
    __table_args__ = (Index("ix_vector_stores_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40))
    name: Mapped[str | None] = mapped_column(String(512))
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    embedding_model: Mapped[str] = mapped_column(String(200))
    """The model its chunks were embedded with: queries must use the same one."""
    expires_after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_active_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bumped whenever its chunks change: search caches of every replica compare it."""
    purges: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bumped whenever chunks are deleted: a cache then reloads the store instead of only
    reading the chunks added since it last looked."""


class VectorStoreFile(Base):
    """A file in a vector store, with its ingestion state (the claim is the work queue)."""

    __tablename__ = "vector_store_files"
    __table_args__ = (
        Index("ix_vector_store_files_status", "status", "lease_until"),
        Index("ix_vector_store_files_batch", "batch_id"),
    )

    store_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("vector_stores.id", ondelete="CASCADE"), primary_key=True
    )
    file_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    """in_progress, completed, failed or cancelled."""
    last_error: Mapped[dict[str, str] | None] = mapped_column(JSON)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    chunking: Mapped[dict[str, int]] = mapped_column(JSON)
    """{"max_chunk_size_tokens": n, "chunk_overlap_tokens": m}, resolved at creation."""
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class FileBatch(Base):
    """A vector store file batch: files added together, polled as one."""

    __tablename__ = "vector_store_file_batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    store_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("vector_stores.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cancelled: Mapped[bool] = mapped_column(default=False)


class Chunk(Base):
    """A chunk of a file in a store: its text, its terms for full text, its vector."""

    __tablename__ = "chunks"
    __table_args__ = (Index("ix_chunks_store_file", "store_id", "file_id", "seq"),)

    id: Mapped[int] = mapped_column(_BIGINT_ID, primary_key=True, autoincrement=True)
    store_id: Mapped[str] = mapped_column(String(40))
    file_id: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    lexicon: Mapped[bytes] = mapped_column(LargeBinary)
    """`app.knowledge.lexicon.lexicon_bytes` of `text`: its terms' hashes and counts."""
    tokens: Mapped[int] = mapped_column(Integer)
    page: Mapped[int | None] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    """float32, L2-normalized, little-endian."""
