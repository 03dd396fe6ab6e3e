"""The async engine, its sessions, and Alembic upgrades applied through it."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from app.config import ConfigError

log = logging.getLogger("clawbot.db")


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's config for the packaged migrations (on `connection`, when given)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration shipped with this version."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


_MIGRATION_LOCK = 0x636C6177  # "claw": replicas starting together migrate one at a time


def _upgrade(connection: Connection) -> str | None:
    if connection.dialect.name == "postgresql":
        # Held until this transaction commits; the others then find the schema up to date.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    command.upgrade(alembic_config(connection), "head")
    return MigrationContext.configure(connection).get_current_revision()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


class Database:
    """One async engine for the configured URL (`sqlite+aiosqlite://…`, `postgresql+asyncpg://…`)."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except Exception as exc:  # sqlalchemy raises ArgumentError and ValueError alike
            raise ConfigError(f"database.url: cannot parse {url!r}: {exc}") from exc
        kwargs: dict[str, Any] = {}
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.sqlite_file = (
            parsed.database
            if self.is_sqlite and parsed.database not in (None, "", ":memory:")
            else None
        )
        if self.is_sqlite and parsed.database in (None, "", ":memory:"):
            # One shared connection, or every connection would see its own empty database.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        try:
            self.engine: AsyncEngine = create_async_engine(parsed, **kwargs)
        except Exception as exc:
            raise ConfigError(f"database.url: {url!r}: {exc}") from exc
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.url = parsed.render_as_string(hide_password=True)

    def session(self) -> AsyncSession:
        """A new session (use as `async with db.session() as s`)."""
        return self.sessions()

    async def upgrade(self) -> str | None:
        """Apply every pending migration; returns the revision now current.

        Processes starting together (workers, replicas) migrate one at a time: PostgreSQL
        through an advisory lock, a SQLite file through a lock file next to it.
        """
        if self.sqlite_file is None:
            return await self._upgrade()
        path = f"{self.sqlite_file}.migrate-lock"
        lock = await asyncio.to_thread(os.open, path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            return await self._upgrade()
        finally:
            os.close(lock)  # closing releases the lock

    async def _upgrade(self) -> str | None:
        async with self.engine.begin() as connection:
            revision = await connection.run_sync(_upgrade)
        log.info("database %s at revision %s", self.url, revision)
        return revision

    async def revision(self) -> str | None:
        """The revision the database is at (None before the first upgrade)."""
        async with self.engine.connect() as connection:
            return await connection.run_sync(_current)

    async def ping(self) -> bool:
        """Whether the database answers."""
        try:
            async with self.engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        except (SQLAlchemyError, OSError):
            return False
        return True

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the audit writer insert while requests read keys; busy_timeout waits out locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
