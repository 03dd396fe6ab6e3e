"""Where the bytes of uploaded files live, chosen by URL (`knowledge.blobs`).

`file:///dir`: a directory, one file per upload, written to a temporary name and renamed so a
reader never sees half of one. The default beside a SQLite database.
`database:`: rows of the database itself, in 1 MiB parts. The default with PostgreSQL: every
replica already reaches it, a file's bytes commit or roll back with its record (no orphans, no
dangling ids after a crash) and one backup holds everything; a shared directory would need
its own mount on every node and its own backup. Uploads are capped (`max_file_mb`), so the
rows stay reasonable.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from sqlalchemy import delete, select

from app.config import ConfigError
from app.knowledge.schema import FilePart
from app.ledger.storage.database import Database

PART_BYTES = 1 << 20


class BlobStore(Protocol):
    """Bytes by file id."""

    url: str

    async def put(self, file_id: str, data: bytes) -> None:
        """Store a file's bytes (replacing any under the same id)."""
        ...

    async def get(self, file_id: str) -> bytes:
        """A file's bytes; FileNotFoundError if there are none."""
        ...

    async def delete(self, file_id: str) -> None:
        """Forget a file's bytes (none is fine)."""
        ...


class DirectoryBlobs:
    """One file per upload in a directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = folder.as_uri()

    def _path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").replace("_", "").isalnum():
            raise FileNotFoundError(file_id)  # ids are ours; anything else never names a path
        return self.folder / file_id

    async def put(self, file_id: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(file_id), data)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    async def get(self, file_id: str) -> bytes:
        return await asyncio.to_thread(self._path(file_id).read_bytes)

    async def delete(self, file_id: str) -> None:
        await asyncio.to_thread(self._path(file_id).unlink, missing_ok=True)


class DatabaseBlobs:
    """File bytes as rows of `file_parts`."""

    url = "database:"

    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, file_id: str, data: bytes) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(delete(FilePart).where(FilePart.file_id == file_id))
            for seq, at in enumerate(range(0, max(len(data), 1), PART_BYTES)):
                session.add(FilePart(file_id=file_id, seq=seq, data=data[at : at + PART_BYTES]))

    async def get(self, file_id: str) -> bytes:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(FilePart.data).where(FilePart.file_id == file_id).order_by(FilePart.seq)
            )
            parts = list(rows)
        if not parts:
            raise FileNotFoundError(file_id)
        return b"".join(parts)

    async def delete(self, file_id: str) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(delete(FilePart).where(FilePart.file_id == file_id))


def open_blobs(url: str, db: Database) -> BlobStore:
    """The blob store a `knowledge.blobs` URL names (already anchored to clawbot.json's
    folder); unset: a directory beside a SQLite file, else the database."""
    if not url:
        if db.sqlite_file:
            return DirectoryBlobs(Path(db.sqlite_file).resolve().parent / "clawbot-files")
        return DatabaseBlobs(db)
    if url == "database:":
        return DatabaseBlobs(db)
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path:
        return DirectoryBlobs(Path(unquote(parts.path)))
    raise ConfigError(f"knowledge.blobs: {url!r} is neither file:///directory nor database:")
