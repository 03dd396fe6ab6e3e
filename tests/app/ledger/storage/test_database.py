"""The Alembic-owned schema, applied at start-up and by `clawbot db upgrade`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from app.api.app import create_app
from app.config import ConfigError, parse_config
from app.core.gateway import Gateway
from app.ledger.storage.database import Database, head_revision
from app.ops.cli import main
from tests.conftest import AppClient

TABLES = {"api_keys", "audit_log"}
AUDIT_INDEXES = {"ix_audit_log_ts", "ix_audit_log_key_ts", "ix_audit_log_model_ts"}


async def schema_of(db: Database) -> tuple[set[str], set[str]]:
    async with db.engine.connect() as conn:

        def read(sync_conn: Any) -> tuple[set[str], set[str]]:
            inspector = inspect(sync_conn)
            tables = set(inspector.get_table_names())
            indexes = {i["name"] for i in inspector.get_indexes("audit_log")}
            return tables, indexes

        return await conn.run_sync(read)


async def test_upgrade_creates_the_schema_and_is_idempotent(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert await db.revision() is None
        assert await db.upgrade() == head_revision()
        tables, indexes = await schema_of(db)
        assert tables >= TABLES
        assert indexes >= AUDIT_INDEXES
        assert await db.upgrade() == head_revision()
        assert await db.ping()
    finally:
        await db.aclose()


async def test_in_memory_sqlite_keeps_its_schema_across_sessions() -> None:
    db = Database("sqlite+aiosqlite://")
    try:
        await db.upgrade()
        tables, _ = await schema_of(db)
        assert tables >= TABLES
    finally:
        await db.aclose()


async def test_gateway_start_applies_migrations(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    config = parse_config({"database": {"url": url}, "models": [{"id": "m", "backend": "mock:"}]})
    gateway = Gateway.from_config(config)
    async with AppClient(create_app(gateway)):
        assert await gateway.db.revision() == head_revision()


async def test_unreachable_database_is_reported() -> None:
    db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        assert not await db.ping()
    finally:
        await db.aclose()


@pytest.mark.parametrize("url", ["not a url", "nosuchdialect://x"])
def test_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"database\.url"):
        Database(url)


def test_cli_db_upgrade_next_to_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "clawbot.json"
    config.write_text(json.dumps({"models": [{"id": "m", "backend": "mock:"}]}))
    assert main(["db", "current", "--config", str(config)]) == 0
    assert "revision none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "clawbot.db").is_file()


def test_cli_db_upgrade_failure_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "clawbot.json"
    config.write_text(
        json.dumps(
            {
                "database": {"url": "postgresql+asyncpg://nobody@127.0.0.1:1/none"},
                "models": [{"id": "m", "backend": "mock:"}],
            }
        )
    )
    assert main(["db", "upgrade", "--config", str(config)]) == 1
    assert "failed" in capsys.readouterr().err


async def test_replicas_migrating_together_do_not_collide(postgres_url: str) -> None:
    replicas = [Database(postgres_url) for _ in range(4)]
    try:
        revisions = await asyncio.gather(*(db.upgrade() for db in replicas))
        assert revisions == [head_revision()] * 4
    finally:
        await asyncio.gather(*(db.aclose() for db in replicas))
