"""Vector stores, the files in them and file batches: records, counts, status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import KnowledgeSettings
from app.errors import InvalidRequest, NotFound
from app.knowledge.files import visible_file
from app.knowledge.index import delete_chunks
from app.knowledge.paging import Page, page_of
from app.knowledge.records import (
    Principal,
    check_attributes,
    check_metadata,
    new_id,
    resolve_chunking,
)
from app.knowledge.schema import FileBatch, VectorStore, VectorStoreFile
from app.ledger.storage.database import Database

log = logging.getLogger("clawbot.knowledge")

FILE_STATUSES = ("in_progress", "completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class FileCounts:
    """How many of a store's (or batch's) files are in each state."""

    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        """All of them."""
        return self.in_progress + self.completed + self.failed + self.cancelled


@dataclass(frozen=True, slots=True)
class StoreView:
    """A vector store with what is computed from its files."""

    store: VectorStore
    counts: FileCounts
    usage_bytes: int

    @property
    def status(self) -> str:
        """expired, in_progress (files still being ingested) or completed."""
        if expired(self.store):
            return "expired"
        return "in_progress" if self.counts.in_progress else "completed"


@dataclass(frozen=True, slots=True)
class BatchView:
    """A file batch with its files' counts."""

    batch: FileBatch
    counts: FileCounts

    @property
    def status(self) -> str:
        """cancelled, in_progress, failed (all done, any failed) or completed."""
        if self.batch.cancelled:
            return "cancelled"
        if self.counts.in_progress:
            return "in_progress"
        return "failed" if self.counts.failed and not self.counts.completed else "completed"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A file to add to a store: its id, attributes and chunking strategy."""

    file_id: str
    attributes: Mapping[str, Any] | None = None
    chunking_strategy: Mapping[str, Any] | None = None


@dataclass(slots=True)
class StoreEdit:
    """What a modify call changes (`None` fields are left as they are)."""

    name: str | None = None
    metadata: dict[str, str] | None = None
    expires_after: dict[str, Any] | None = None
    clear_expiry: bool = False


@dataclass(slots=True)
class NewStore:
    """What a create call asks for."""

    name: str | None = None
    metadata: dict[str, str] | None = None
    expires_after: dict[str, Any] | None = None
    files: list[FileSpec] = field(default_factory=list)
    chunking_strategy: Mapping[str, Any] | None = None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _check_expiry(expires_after: Mapping[str, Any] | None) -> None:
    if expires_after is None:
        return
    if expires_after.get("anchor") != "last_active_at":
        raise InvalidRequest(
            "expires_after.anchor must be 'last_active_at'", param="expires_after.anchor"
        )
    days = expires_after.get("days")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 365:
        raise InvalidRequest(
            "expires_after.days must be an integer from 1 to 365", param="expires_after.days"
        )


def _expiry(expires_after: Mapping[str, Any] | None, active: datetime) -> datetime | None:
    return None if expires_after is None else active + timedelta(days=int(expires_after["days"]))


class Stores:
    """The Vector Stores API's record keeping (ingestion and search live beside it)."""

    def __init__(
        self,
        db: Database,
        settings: KnowledgeSettings,
        embedding_model: Callable[[], str],
        wake: Callable[[], None],
    ) -> None:
        self.db = db
        self.settings = settings
        self.embedding_model = embedding_model
        """The model new stores embed with (resolved when first needed)."""
        self.wake = wake
        """Tells ingestion that work is waiting."""

    # -- stores --------------------------------------------------------------------------

    async def create(self, principal: Principal, new: NewStore) -> StoreView:
        """A new store, with its first files queued for ingestion."""
        check_metadata(new.metadata)
        _check_expiry(new.expires_after)
        if new.name is not None and len(new.name) > 512:
            raise InvalidRequest("name is over 512 characters", param="name")
        now = datetime.now(UTC)
        store = VectorStore(
            id=new_id("vs_"),
            owner=principal.owner,
            name=new.name,
            meta=new.metadata or {},
            embedding_model=self.embedding_model(),
            expires_after=new.expires_after,
            expires_at=_expiry(new.expires_after, now),
            created_at=now,
            last_active_at=now,
            generation=0,
            purges=0,
        )
        async with self.db.session() as session, session.begin():
            session.add(store)
            await session.flush()
            await self._add_files(session, principal, store, new.files, new.chunking_strategy)
        self.wake()
        log.info("vector store %s created (%d files)", store.id, len(new.files))
        return await self.view(principal, store.id)

    async def view(self, principal: Principal, store_id: str) -> StoreView:
        """A store the caller may see, with counts; 404 otherwise."""
        async with self.db.session() as session:
            store = await visible_store(session, principal, store_id)
            counts, usage = await _counts(session, VectorStoreFile.store_id == store_id)
        return StoreView(store, counts, usage)

    async def page(
        self, principal: Principal, *, limit: int, order: str, after: str | None, before: str | None
    ) -> Page[StoreView]:
        """The caller's stores."""
        query = select(VectorStore)
        if not principal.sees_all:
            query = query.where(VectorStore.owner == principal.owner)
        async with self.db.session() as session:
            page = await page_of(
                session, query, VectorStore, limit=limit, order=order, after=after, before=before
            )
            views = []
            for store in page.items:
                counts, usage = await _counts(session, VectorStoreFile.store_id == store.id)
                views.append(StoreView(store, counts, usage))
        return Page(views, page.has_more)

    async def modify(self, principal: Principal, store_id: str, edit: StoreEdit) -> StoreView:
        """Rename, re-tag or change the expiry of a store."""
        check_metadata(edit.metadata)
        _check_expiry(edit.expires_after)
        async with self.db.session() as session, session.begin():
            store = await visible_store(session, principal, store_id)
            if edit.name is not None:
                store.name = edit.name
            if edit.metadata is not None:
                store.meta = edit.metadata
            if edit.clear_expiry:
                store.expires_after = store.expires_at = None
            elif edit.expires_after is not None:
                store.expires_after = edit.expires_after
                store.expires_at = _expiry(edit.expires_after, _aware(store.last_active_at))
        return await self.view(principal, store_id)

    async def delete(self, principal: Principal, store_id: str) -> None:
        """Delete a store, its chunks and its file links (the files themselves stay)."""
        async with self.db.session() as session, session.begin():
            store = await visible_store(session, principal, store_id)
            await delete_chunks(session, store_id)
            await session.execute(
                delete(VectorStoreFile).where(VectorStoreFile.store_id == store_id)
            )
            await session.execute(delete(FileBatch).where(FileBatch.store_id == store_id))
            await session.delete(store)
        log.info("vector store %s deleted", store_id)

    async def touch(self, store: VectorStore) -> None:
        """Note activity (a search): it moves an `expires_after` expiry. Written at most once
        a minute per store: a write per search would serialize searches on SQLite."""
        now = datetime.now(UTC)
        if now - _aware(store.last_active_at) < timedelta(minutes=1):
            return
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(VectorStore)
                .where(VectorStore.id == store.id)
                .values(last_active_at=now, expires_at=_expiry(store.expires_after, now))
            )

    # -- files in stores ---------------------------------------------------------------

    async def _add_files(
        self,
        session: AsyncSession,
        principal: Principal,
        store: VectorStore,
        files: Sequence[FileSpec],
        default_chunking: Mapping[str, Any] | None,
        batch_id: str | None = None,
    ) -> list[VectorStoreFile]:
        added = []
        now = datetime.now(UTC)
        for i, spec in enumerate(files):
            await visible_file(session, principal, spec.file_id)
            check_attributes(spec.attributes, f"files[{i}].attributes")
            chunking = resolve_chunking(
                spec.chunking_strategy or default_chunking,
                size=self.settings.chunk_size_tokens,
                overlap=self.settings.chunk_overlap_tokens,
                param="chunking_strategy",
            )
            existing = await session.get(VectorStoreFile, (store.id, spec.file_id))
            if existing is not None:
                # Adding a file again re-ingests it (its chunks are replaced, never doubled).
                existing.status, existing.last_error = "in_progress", None
                existing.attributes = dict(spec.attributes or existing.attributes or {})
                existing.chunking, existing.batch_id = chunking, batch_id
                existing.claimed_by = existing.lease_until = None
                existing.attempts = 0
                added.append(existing)
                continue
            row = VectorStoreFile(
                store_id=store.id,
                file_id=spec.file_id,
                batch_id=batch_id,
                status="in_progress",
                attributes=dict(spec.attributes or {}),
                chunking=chunking,
                usage_bytes=0,
                created_at=now,
                attempts=0,
            )
            session.add(row)
            added.append(row)
        return added

    async def add_file(
        self, principal: Principal, store_id: str, spec: FileSpec
    ) -> VectorStoreFile:
        """Queue a file for ingestion into a store."""
        async with self.db.session() as session, session.begin():
            store = await visible_store(session, principal, store_id)
            (row,) = await self._add_files(session, principal, store, [spec], None)
        self.wake()
        return row

    async def get_file(self, principal: Principal, store_id: str, file_id: str) -> VectorStoreFile:
        """A file of a store; 404 when either is not the caller's."""
        async with self.db.session() as session:
            await visible_store(session, principal, store_id)
            return await store_file(session, store_id, file_id)

    async def update_file(
        self, principal: Principal, store_id: str, file_id: str, attributes: dict[str, Any] | None
    ) -> VectorStoreFile:
        """Replace a store file's attributes."""
        check_attributes(attributes)
        async with self.db.session() as session, session.begin():
            await visible_store(session, principal, store_id)
            row = await store_file(session, store_id, file_id)
            row.attributes = attributes or {}
        return row

    async def remove_file(self, principal: Principal, store_id: str, file_id: str) -> None:
        """Take a file out of a store (its chunks go; the file stays)."""
        async with self.db.session() as session, session.begin():
            await visible_store(session, principal, store_id)
            row = await store_file(session, store_id, file_id)
            await delete_chunks(session, store_id, file_id)
            await session.delete(row)

    async def list_files(
        self,
        principal: Principal,
        store_id: str,
        *,
        status: str | None,
        batch_id: str | None = None,
        limit: int,
        order: str,
        after: str | None,
        before: str | None,
    ) -> Page[VectorStoreFile]:
        """A store's (or a batch's) files."""
        if status is not None and status not in FILE_STATUSES:
            raise InvalidRequest(
                f"filter must be one of {list(FILE_STATUSES)}, not {status!r}", param="filter"
            )
        async with self.db.session() as session:
            await visible_store(session, principal, store_id)
            query = select(VectorStoreFile).where(VectorStoreFile.store_id == store_id)
            if status is not None:
                query = query.where(VectorStoreFile.status == status)
            if batch_id is not None:
                query = query.where(VectorStoreFile.batch_id == batch_id)
            return await page_of(
                session,
                query,
                VectorStoreFile,
                limit=limit,
                order=order,
                after=after,
                before=before,
                id_column=VectorStoreFile.file_id,
            )

    # -- batches -----------------------------------------------------------------------

    async def create_batch(
        self,
        principal: Principal,
        store_id: str,
        files: Sequence[FileSpec],
        chunking_strategy: Mapping[str, Any] | None,
    ) -> BatchView:
        """Queue several files at once."""
        if not files:
            raise InvalidRequest(
                "file_ids (or files) must name at least one file", param="file_ids"
            )
        if len(files) > 2000:
            raise InvalidRequest("a batch holds at most 2000 files", param="file_ids")
        batch = FileBatch(
            id=new_id("vsfb_"), store_id=store_id, created_at=datetime.now(UTC), cancelled=False
        )
        async with self.db.session() as session, session.begin():
            store = await visible_store(session, principal, store_id)
            session.add(batch)
            await self._add_files(session, principal, store, files, chunking_strategy, batch.id)
        self.wake()
        return await self.batch(principal, store_id, batch.id)

    async def batch(self, principal: Principal, store_id: str, batch_id: str) -> BatchView:
        """A batch with its counts."""
        async with self.db.session() as session:
            await visible_store(session, principal, store_id)
            batch = await session.get(FileBatch, batch_id)
            if batch is None or batch.store_id != store_id:
                raise NotFound(
                    f"vector store {store_id!r} has no file batch {batch_id!r}", param="batch_id"
                )
            counts, _ = await _counts(session, VectorStoreFile.batch_id == batch_id)
        return BatchView(batch, counts)

    async def cancel_batch(self, principal: Principal, store_id: str, batch_id: str) -> BatchView:
        """Stop a batch: its files not yet ingested are cancelled."""
        await self.batch(principal, store_id, batch_id)
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(FileBatch).where(FileBatch.id == batch_id).values(cancelled=True)
            )
            await session.execute(
                update(VectorStoreFile)
                .where(
                    VectorStoreFile.batch_id == batch_id, VectorStoreFile.status == "in_progress"
                )
                .values(status="cancelled", claimed_by=None, lease_until=None)
            )
        return await self.batch(principal, store_id, batch_id)


async def store_file(session: AsyncSession, store_id: str, file_id: str) -> VectorStoreFile:
    """A file of a store (already checked visible); 404 when it is not in it."""
    row = await session.get(VectorStoreFile, (store_id, file_id))
    if row is None:
        raise NotFound(f"vector store {store_id!r} has no file {file_id!r}", param="file_id")
    return row


async def searchable_store(
    session: AsyncSession, principal: Principal, store_id: str
) -> VectorStore:
    """A store the caller may search: 404 if it may not see it, 400 once it has expired."""
    store = await visible_store(session, principal, store_id)
    if expired(store):
        raise InvalidRequest(f"vector store {store_id!r} has expired", param="vector_store_id")
    return store


def expired(store: VectorStore) -> bool:
    """Whether the store's `expires_after` has run out."""
    return store.expires_at is not None and _aware(store.expires_at) <= datetime.now(UTC)


async def visible_store(session: AsyncSession, principal: Principal, store_id: str) -> VectorStore:
    """The store with this id if the caller may see it; 404 (never 403) otherwise."""
    store = await session.get(VectorStore, store_id)
    if store is None or not principal.may_see(store.owner):
        raise NotFound(f"no vector store with id {store_id!r}", param="vector_store_id")
    return store


async def _counts(session: AsyncSession, where: Any) -> tuple[FileCounts, int]:
    columns = [
        func.coalesce(func.sum(case((VectorStoreFile.status == s, 1), else_=0)), 0)
        for s in FILE_STATUSES
    ]
    row = (
        await session.execute(
            select(*columns, func.coalesce(func.sum(VectorStoreFile.usage_bytes), 0)).where(where)
        )
    ).one()
    values = [int(v) for v in row]
    return FileCounts(*values[:4]), values[4]
