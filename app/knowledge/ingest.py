"""Background ingestion: claim a queued file, extract, chunk, embed, index; with a bounded pool.

The queue is the `vector_store_files` table itself: a row `in_progress` whose lease is unset
or has run out is free to claim. A worker claims one with a conditional UPDATE (one winner,
even across replicas), renews the lease while it works, and writes the chunks and the
`completed` status in one transaction that first checks it still holds the claim. So a file
whose process died mid-way is picked up again once its lease runs out, and a file is never
indexed twice: the writing transaction replaces the file's chunks in that store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from app.config import KnowledgeSettings
from app.errors import GatewayError
from app.knowledge.blobs import BlobStore
from app.knowledge.chunking import chunk_pages
from app.knowledge.extract import ExtractionFailed, Extractor
from app.knowledge.index import write_chunks
from app.knowledge.records import new_id
from app.knowledge.schema import StoredFile, VectorStore, VectorStoreFile
from app.ledger.storage.database import Database

log = logging.getLogger("clawbot.knowledge")

Embed = Callable[[str, list[str]], Awaitable[list[list[float]]]]
"""Embeds texts with a model (by id): the core supplies it, through the model's pool."""

MAX_ATTEMPTS = 3
"""Claims of one file before it is marked failed (a file that keeps killing its process)."""


@dataclass(slots=True)
class IngestStats:
    """Counters since start, for /metrics and the log."""

    files_completed: int = 0
    files_failed: int = 0
    chunks_indexed: int = 0
    seconds: float = 0.0


class _LostClaim(Exception):
    """Another worker took the file over (this one's lease ran out)."""


class _Stopping(Exception):
    """The process is stopping: the file goes back to the queue."""


class Ingestor:
    """A pool of `settings.workers` tasks draining the queue of files to ingest."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        settings: KnowledgeSettings,
        embed: Embed,
        extractor: Extractor | None = None,
        *,
        poll_interval_s: float = 2.0,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.embed = embed
        self.extractor = extractor or Extractor()
        self.poll_interval_s = poll_interval_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{new_id('')[:8]}"
        self.stats = IngestStats()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        """Start the workers (they find files left by a previous run first)."""
        if self._tasks:
            return
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._work(), name=f"ingest-{i}")
            for i in range(self.settings.workers)
        ]

    def wake(self) -> None:
        """Work was queued: idle workers look now rather than at their next poll."""
        self._wake.set()

    @property
    def busy(self) -> int:
        """Workers running (0 before start)."""
        return len(self._tasks)

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop the workers: each finishes its database step and hands its file back (queued
        again at once); one still busy after `grace_s` is cancelled and its file waits for its
        lease. Workers are not cancelled straight away because a cancelled database call
        closes its connection, and with an in-memory SQLite the database with it."""
        tasks, self._tasks = self._tasks, []
        self._stopping = True
        self._wake.set()
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _work(self) -> None:
        while not self._stopping:
            try:
                claimed = await self._claim()
            except Exception:
                log.exception("ingestion could not read its queue")
                claimed = None
            if claimed is None:
                if self._stopping:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
                continue
            await self._ingest(*claimed)

    def _mine(self, store_id: str, file_id: str) -> tuple[Any, ...]:
        """Conditions of a statement on a file this worker holds the claim of."""
        return (
            VectorStoreFile.store_id == store_id,
            VectorStoreFile.file_id == file_id,
            VectorStoreFile.claimed_by == self.worker_id,
        )

    async def _claim(self) -> tuple[str, str] | None:
        """Claim the oldest free file: (store id, file id), or None when there is none."""
        now = datetime.now(UTC)
        free = and_(
            VectorStoreFile.status == "in_progress",
            or_(VectorStoreFile.lease_until.is_(None), VectorStoreFile.lease_until < now),
        )
        async with self.db.session() as session, session.begin():
            candidates = (
                await session.execute(
                    select(VectorStoreFile.store_id, VectorStoreFile.file_id)
                    .where(free)
                    .order_by(VectorStoreFile.created_at)
                    .limit(8)
                )
            ).all()
            for store_id, file_id in candidates:
                won = await session.execute(
                    update(VectorStoreFile)
                    .where(
                        VectorStoreFile.store_id == store_id,
                        VectorStoreFile.file_id == file_id,
                        free,
                    )
                    .values(
                        claimed_by=self.worker_id,
                        lease_until=now + timedelta(seconds=self.settings.lease_s),
                        attempts=VectorStoreFile.attempts + 1,
                    )
                )
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    return store_id, file_id
        return None

    async def _ingest(self, store_id: str, file_id: str) -> None:
        started = time.perf_counter()
        done = asyncio.Event()
        renew = asyncio.create_task(self._renew(store_id, file_id, done))
        try:
            chunks = await self._index(store_id, file_id)
        except _LostClaim:
            log.warning("file %s in %s: claim lost to another worker", file_id, store_id)
        except _Stopping:
            await self._release(store_id, file_id)
        except ExtractionFailed as exc:
            await self._fail(store_id, file_id, exc.code, str(exc))
        except GatewayError as exc:
            await self._retry_or_fail(store_id, file_id, "server_error", exc.message)
        except Exception as exc:  # a bug or a broken file must not stop the worker
            log.exception("file %s in %s: ingestion failed", file_id, store_id)
            reason = f"{type(exc).__name__}: {exc}"
            await self._retry_or_fail(store_id, file_id, "server_error", reason)
        else:
            elapsed = time.perf_counter() - started
            self.stats.files_completed += 1
            self.stats.chunks_indexed += chunks
            self.stats.seconds += elapsed
            log.info(
                "file %s indexed in %s: %d chunks in %.2fs", file_id, store_id, chunks, elapsed
            )
        finally:
            done.set()
            await asyncio.gather(renew, return_exceptions=True)

    async def _renew(self, store_id: str, file_id: str, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.lease_s / 3)
            if done.is_set():
                return
            async with self.db.session() as session, session.begin():
                await session.execute(
                    update(VectorStoreFile)
                    .where(*self._mine(store_id, file_id))
                    .values(
                        lease_until=datetime.now(UTC) + timedelta(seconds=self.settings.lease_s)
                    )
                )

    async def _release(self, store_id: str, file_id: str) -> None:
        """Hand a claimed file back to the queue (this process is stopping)."""
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(VectorStoreFile)
                .where(*self._mine(store_id, file_id))
                .values(claimed_by=None, lease_until=None, attempts=VectorStoreFile.attempts - 1)
            )
        log.info("file %s in %s: handed back (stopping)", file_id, store_id)

    async def _index(self, store_id: str, file_id: str) -> int:
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store_id, file_id))
            record = await session.get(StoredFile, file_id)
            store = await session.get(VectorStore, store_id)
        if row is None or store is None:
            raise _LostClaim  # removed while queued
        if record is None:
            raise ExtractionFailed("the file was deleted", code="invalid_file")
        if row.attempts > MAX_ATTEMPTS:
            raise ExtractionFailed(
                f"ingestion of this file was interrupted {row.attempts - 1} times",
                code="server_error",
            )
        try:
            data = await self.blobs.get(file_id)
        except FileNotFoundError:
            raise ExtractionFailed(
                "the file's bytes are missing from the blob store", code="invalid_file"
            ) from None
        pages = await asyncio.to_thread(self.extractor.extract, data, record.filename)
        size = row.chunking["max_chunk_size_tokens"]
        overlap = row.chunking["chunk_overlap_tokens"]
        chunks = await asyncio.to_thread(chunk_pages, pages, size, overlap)
        vectors: list[list[float]] = []
        batch = self.settings.embed_batch
        for at in range(0, len(chunks), batch):
            if self._stopping:
                raise _Stopping
            vectors += await self.embed(
                store.embedding_model, [c.text for c in chunks[at : at + batch]]
            )
        usage = sum(len(c.text.encode()) + 4 * len(v) for c, v in zip(chunks, vectors, strict=True))
        async with self.db.session() as session, session.begin():
            done = await session.execute(
                update(VectorStoreFile)
                .where(
                    VectorStoreFile.store_id == store_id,
                    VectorStoreFile.file_id == file_id,
                    VectorStoreFile.claimed_by == self.worker_id,
                    VectorStoreFile.status == "in_progress",
                )
                .values(
                    status="completed",
                    last_error=None,
                    usage_bytes=usage,
                    claimed_by=None,
                    lease_until=None,
                )
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise _LostClaim
            await write_chunks(session, store_id, file_id, chunks, vectors)
        return len(chunks)

    async def _retry_or_fail(self, store_id: str, file_id: str, code: str, message: str) -> None:
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store_id, file_id))
        if row is not None and row.attempts < MAX_ATTEMPTS:
            log.warning(
                "file %s in %s: attempt %d failed (%s); will retry",
                file_id,
                store_id,
                row.attempts,
                message,
            )
            async with self.db.session() as session, session.begin():
                await session.execute(
                    update(VectorStoreFile)
                    .where(*self._mine(store_id, file_id))
                    .values(
                        claimed_by=None,
                        lease_until=datetime.now(UTC) + timedelta(seconds=2 * row.attempts),
                    )
                )
            return
        await self._fail(store_id, file_id, code, message)

    async def _fail(self, store_id: str, file_id: str, code: str, message: str) -> None:
        self.stats.files_failed += 1
        log.warning("file %s in %s failed: %s (%s)", file_id, store_id, message, code)
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(VectorStoreFile)
                .where(
                    VectorStoreFile.store_id == store_id,
                    VectorStoreFile.file_id == file_id,
                    VectorStoreFile.status == "in_progress",
                )
                .values(
                    status="failed",
                    last_error={"code": code, "message": message[:1000]},
                    claimed_by=None,
                    lease_until=None,
                )
            )
