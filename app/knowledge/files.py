"""Uploaded files: records in `files`, bytes in the blob store, a quota per key."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import KnowledgeSettings
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.knowledge.blobs import BlobStore
from app.knowledge.index import delete_chunks
from app.knowledge.paging import Page, page_of
from app.knowledge.records import Principal, new_id
from app.knowledge.schema import StoredFile, VectorStoreFile
from app.ledger.storage.database import Database

log = logging.getLogger("clawbot.knowledge")

PURPOSES = frozenset(
    {"assistants", "batch", "fine-tune", "vision", "user_data", "evals", "knowledge"}
)
"""What OpenAI accepts as a file's `purpose` (`knowledge` is this gateway's own)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """A file as the client sent it."""

    filename: str
    purpose: str
    data: bytes
    content_type: str | None = None


class Files:
    """The Files API's operations, each checked against the caller."""

    def __init__(self, db: Database, blobs: BlobStore, settings: KnowledgeSettings) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings

    @property
    def max_bytes(self) -> int:
        """The largest upload accepted."""
        return self.settings.max_file_mb * 1024 * 1024

    async def create(self, principal: Principal, upload: Upload) -> StoredFile:
        """Store an upload; 400 on a bad purpose or name, 413 over the size or the quota."""
        if upload.purpose not in PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {sorted(PURPOSES)}, not {upload.purpose!r}",
                param="purpose",
            )
        name = upload.filename.strip()
        if not name or len(name) > 512 or any(c in name for c in "\x00/\\"):
            raise InvalidRequest(
                "the file needs a name of 1 to 512 characters, without slashes", param="file"
            )
        if len(upload.data) > self.max_bytes:
            raise PayloadTooLarge(
                f"the file is {len(upload.data)} bytes; at most {self.max_bytes} are accepted "
                "(knowledge.max_file_mb)",
                param="file",
            )
        quota = self.settings.quota_mb_per_key
        if quota is not None and not principal.sees_all:
            used = await self.bytes_of(principal.owner)
            if used + len(upload.data) > quota * 1024 * 1024:
                raise PayloadTooLarge(
                    f"this key stores {used} bytes of files; {len(upload.data)} more would "
                    f"exceed its quota of {quota} MB (knowledge.quota_mb_per_key): delete "
                    "files first",
                    param="file",
                    code="storage_quota_exceeded",
                )
        record = StoredFile(
            id=new_id("file-"),
            owner=principal.owner,
            filename=name,
            purpose=upload.purpose,
            bytes=len(upload.data),
            sha256=hashlib.sha256(upload.data).hexdigest(),
            content_type=upload.content_type,
            created_at=datetime.now(UTC),
        )
        # Bytes first: a record never names bytes that are not there; bytes without a
        # record (a crash in between) are only unreferenced space.
        await self.blobs.put(record.id, upload.data)
        async with self.db.session() as session, session.begin():
            session.add(record)
        log.info("file %s stored (%s, %d bytes)", record.id, name, record.bytes)
        return record

    async def bytes_of(self, owner: str) -> int:
        """Bytes of files an owner keeps."""
        async with self.db.session() as session:
            total = await session.scalar(
                select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                    StoredFile.owner == owner
                )
            )
        return int(total or 0)

    async def get(self, principal: Principal, file_id: str) -> StoredFile:
        """A file the caller may see; 404 otherwise."""
        async with self.db.session() as session:
            return await visible_file(session, principal, file_id)

    async def page(
        self,
        principal: Principal,
        *,
        purpose: str | None,
        limit: int,
        order: str,
        after: str | None,
    ) -> Page[StoredFile]:
        """The caller's files, newest first unless `order` is asc."""
        query = select(StoredFile)
        if not principal.sees_all:
            query = query.where(StoredFile.owner == principal.owner)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        async with self.db.session() as session:
            return await page_of(
                session, query, StoredFile, limit=limit, order=order, after=after, before=None
            )

    async def content(self, principal: Principal, file_id: str) -> tuple[StoredFile, bytes]:
        """A file and its bytes."""
        record = await self.get(principal, file_id)
        try:
            return record, await self.blobs.get(record.id)
        except FileNotFoundError:
            raise NotFound(
                f"the bytes of file {file_id!r} are missing from the blob store ({self.blobs.url})",
                param="file_id",
            ) from None

    async def delete(self, principal: Principal, file_id: str) -> None:
        """Delete a file, and take it out of every vector store holding it."""
        async with self.db.session() as session, session.begin():
            record = await visible_file(session, principal, file_id)
            stores: Sequence[str] = list(
                await session.scalars(
                    select(VectorStoreFile.store_id).where(VectorStoreFile.file_id == file_id)
                )
            )
            for store_id in stores:
                await delete_chunks(session, store_id, file_id)
            await session.execute(delete(VectorStoreFile).where(VectorStoreFile.file_id == file_id))
            await session.delete(record)
        await self.blobs.delete(file_id)
        log.info("file %s deleted", file_id)


async def visible_file(session: AsyncSession, principal: Principal, file_id: str) -> StoredFile:
    """The file with this id if the caller may see it; 404 (never 403) otherwise."""
    record = await session.get(StoredFile, file_id)
    if record is None or not principal.may_see(record.owner):
        raise NotFound(f"no file with id {file_id!r}", param="file_id")
    return record
