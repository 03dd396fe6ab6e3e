"""`clawbot backup` and `clawbot restore`: round trips on SQLite and PostgreSQL, checksums."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.config import Config, load_config
from app.ledger.audit import AuditEntry, AuditWriter
from app.ledger.keys import KeyStore
from app.ledger.storage.database import Database, head_revision
from app.ops.backup import MANIFEST, Manifest
from app.ops.cli import main
from backends.llamacpp.backend import embedded_model_path

MASTER = "sk-backup-master"
ClientFactory = Any


async def clawbot(*argv: str | Path) -> int:
    """Run the CLI off the event loop (it runs its own)."""
    return await asyncio.to_thread(main, [str(a) for a in argv])


def write_config(
    folder: Path, database_url: str, models: list[dict[str, Any]] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clawbot.json"
    config = {
        "auth": {"api_key": MASTER},
        "database": {"url": database_url},
        "models": models or [{"id": "m", "backend": "mock:"}],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


async def seed(url: str) -> dict[str, str]:
    """Two keys (one revoked) and five audit rows, through the app's own stores."""
    db = Database(url)
    try:
        await db.upgrade()
        store = KeyStore(db)
        kept, kept_key = await store.create(
            name="kept",
            models=["m"],
            metadata={"team": "search"},
            requests_per_minute=60,
            expires_at=datetime.now(UTC) + timedelta(days=30),
        )
        gone, gone_key = await store.create(name="gone")
        await store.revoke(gone.id)
        writer = AuditWriter(db)
        writer.start()
        for i in range(5):
            writer.submit(
                AuditEntry(
                    request_id=f"req-{i}",
                    ts=datetime.now(UTC),
                    route="/v1/chat/completions",
                    status=200,
                    latency_ms=1.5 + i,
                    key_id=kept.id,
                    model="m",
                    prompt_tokens=10,
                    completion_tokens=i,
                )
            )
        await writer.aclose()
        assert writer.written == 5
    finally:
        await db.aclose()
    return {"kept": kept_key, "gone": gone_key}


async def table_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    db = Database(url)
    try:
        async with db.engine.connect() as connection:
            out = {}
            for name, order in (("api_keys", "id"), ("audit_log", "id")):
                table = sa.table(name, sa.column(order))
                query = sa.select(sa.text("*")).select_from(table).order_by(sa.column(order))
                out[name] = [dict(r._mapping) for r in await connection.execute(query)]
            return out
    finally:
        await db.aclose()


async def assert_keys_authenticate(
    make_client: ClientFactory, config: Config, keys: dict[str, str]
) -> None:
    async with make_client(config) as client:
        ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {keys['kept']}"})
        assert ok.status_code == 200, ok.text
        revoked = await client.get(
            "/v1/models", headers={"Authorization": f"Bearer {keys['gone']}"}
        )
        assert revoked.status_code == 401
        assert revoked.json()["error"]["code"] == "invalid_api_key"


def read_manifest(root: Path) -> Manifest:
    import msgspec

    return msgspec.json.decode((root / MANIFEST).read_bytes(), type=Manifest)


@pytest.mark.parametrize("target", ["backup-dir", "backup.tar.gz"])
async def test_sqlite_round_trip(tmp_path: Path, make_client: ClientFactory, target: str) -> None:
    site = tmp_path / "site"
    path = write_config(site, "sqlite+aiosqlite:///clawbot.db")  # relative: next to the config
    url = load_config(path).database.url
    keys = await seed(url)
    before = await table_rows(url)
    out = tmp_path / target
    assert await clawbot("backup", "--config", path, "--out", out) == 0
    assert out.is_dir() if target == "backup-dir" else tarfile.is_tarfile(out)
    original = path.read_bytes()
    shutil.rmtree(site)  # config, database, WAL: all gone

    assert await clawbot("restore", "--from", out, "--config", path) == 0
    assert path.read_bytes() == original
    assert await table_rows(url) == before
    await assert_keys_authenticate(make_client, load_config(path), keys)


async def test_sqlite_backup_is_consistent_while_the_database_is_open(tmp_path: Path) -> None:
    """Rows still in the WAL (the writer's connection open) are in the copy."""
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db")
    url = load_config(path).database.url
    db = Database(url)
    try:
        await db.upgrade()
        await KeyStore(db).create(name="in-the-wal")
        wal = url.partition(":///")[2] + "-wal"
        assert await asyncio.to_thread(os.path.getsize, wal) > 0
        assert await clawbot("backup", "--config", path, "--out", tmp_path / "b") == 0
    finally:
        await db.aclose()
    manifest = read_manifest(tmp_path / "b")
    assert manifest.database.tables["api_keys"] == 1
    assert manifest.database.dialect == "sqlite"
    assert manifest.alembic_revision == head_revision()


async def test_postgres_round_trip(
    tmp_path: Path, postgres_url: str, make_client: ClientFactory
) -> None:
    path = write_config(tmp_path / "site", postgres_url)
    keys = await seed(postgres_url)
    before = await table_rows(postgres_url)
    out = tmp_path / "pg.tar.gz"
    assert await clawbot("backup", "--config", path, "--out", out) == 0
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"manifest.json", "clawbot.json", "database/api_keys.jsonl"} <= names
    assert "database/audit_log.jsonl" in names

    db = Database(postgres_url)  # wipe: no tables, no schema revision
    async with db.engine.begin() as connection:
        await connection.exec_driver_sql("DROP SCHEMA public CASCADE")
        await connection.exec_driver_sql("CREATE SCHEMA public")
    await db.aclose()

    assert await clawbot("restore", "--from", out, "--config", path) == 0
    assert await table_rows(postgres_url) == before
    await assert_keys_authenticate(make_client, load_config(path), keys)
    db = Database(postgres_url)
    try:
        assert await db.revision() == head_revision()
        writer = AuditWriter(db)  # new rows get ids after the restored ones
        writer.start()
        writer.submit(
            AuditEntry(request_id="after", ts=datetime.now(UTC), route="/v1/x", status=200,
                       latency_ms=1.0)
        )  # fmt: skip
        await writer.aclose()
        assert (writer.written, writer.dropped) == (1, 0)
    finally:
        await db.aclose()
    ids = [row["id"] for row in (await table_rows(postgres_url))["audit_log"]]
    assert ids[-1] > max(row["id"] for row in before["audit_log"])


async def test_postgres_restore_replaces_data_only_with_force(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "site", postgres_url)
    await seed(postgres_url)
    before = await table_rows(postgres_url)
    assert await clawbot("backup", "--config", path, "--out", tmp_path / "b") == 0
    db = Database(postgres_url)
    try:
        await KeyStore(db).create(name="made-after-the-backup")
    finally:
        await db.aclose()

    assert await clawbot("restore", "--from", tmp_path / "b", "--config", path) == 1
    assert "already holds data (8 rows); pass --force" in capsys.readouterr().err
    assert len((await table_rows(postgres_url))["api_keys"]) == 3
    args = ("restore", "--from", tmp_path / "b", "--config", path, "--force")
    assert await clawbot(*args) == 0
    assert await table_rows(postgres_url) == before


async def test_tampered_file_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db")
    await seed(load_config(path).database.url)
    backup = tmp_path / "b"
    assert await clawbot("backup", "--config", path, "--out", backup) == 0
    with (backup / "database.sqlite3").open("r+b") as file:
        file.seek(100)
        file.write(b"\x00tampered")
    target = tmp_path / "elsewhere" / "clawbot.json"

    assert await clawbot("restore", "--from", backup, "--config", target) == 1
    err = capsys.readouterr().err
    assert "database.sqlite3: SHA-256 mismatch" in err
    assert "nothing was restored" in err
    assert not (tmp_path / "elsewhere").exists()


async def test_tampered_archive_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db")
    await seed(load_config(path).database.url)
    assert await clawbot("backup", "--config", path, "--out", tmp_path / "b.tar.gz") == 0
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    config = unpacked / "clawbot.json"
    config.write_text(config.read_text().replace(MASTER, "sk-someone-elses"))
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for item in sorted(unpacked.iterdir()):
            tar.add(item, arcname=item.name)
    target = tmp_path / "elsewhere" / "clawbot.json"

    assert await clawbot("restore", "--from", tmp_path / "evil.tar.gz", "--config", target) == 1
    assert "clawbot.json: SHA-256 mismatch" in capsys.readouterr().err
    assert not target.exists()


async def test_restore_keeps_a_different_config_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db")
    await seed(load_config(path).database.url)
    assert await clawbot("backup", "--config", path, "--out", tmp_path / "b") == 0
    (tmp_path / "site" / "clawbot.db").unlink()
    edited = path.read_text().replace('"m"', '"renamed"')
    path.write_text(edited)

    assert await clawbot("restore", "--from", tmp_path / "b", "--config", path) == 1
    assert "differs from the backup's config; pass --force" in capsys.readouterr().err
    assert path.read_text() == edited
    assert not (tmp_path / "site" / "clawbot.db").exists()  # the database was not touched
    assert await clawbot("restore", "--from", tmp_path / "b", "--config", path, "--force") == 0
    assert '"m"' in path.read_text()


async def test_backup_refuses_an_existing_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db")
    await seed(load_config(path).database.url)
    (tmp_path / "taken.tar.gz").write_bytes(b"precious")
    assert await clawbot("backup", "--config", path, "--out", tmp_path / "taken.tar.gz") == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken.tar.gz").read_bytes() == b"precious"


async def test_manifest_lists_the_embedded_model_with_its_checksum(tmp_path: Path) -> None:
    models = [{"id": "smol", "backend": "llamacpp:embedded"}]
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db", models)
    await seed(load_config(path).database.url)
    assert await clawbot("backup", "--config", path, "--out", tmp_path / "b") == 0
    manifest = read_manifest(tmp_path / "b")
    gguf = embedded_model_path()
    (model,) = manifest.models
    assert model.path == str(gguf)
    assert model.embedded is True
    assert model.used_by == ["smol/default"]
    assert model.size == gguf.stat().st_size
    with gguf.open("rb") as file:
        assert model.sha256 == hashlib.file_digest(file, "sha256").hexdigest()
    assert model.archived_as is None  # not copied without --include-models
    assert not (tmp_path / "b" / "models").exists()
    assert {f.path for f in manifest.files} == {"clawbot.json", "database.sqlite3"}
    assert manifest.clawbot_version == "0.1.0"
    assert datetime.fromisoformat(manifest.created) <= datetime.now(UTC)


async def test_model_files_are_checked_and_included_ones_restored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "models" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    original = gguf.read_bytes()
    other = tmp_path / "models" / "other.gguf"
    other.write_bytes(b"GGUF other")
    models = [{"id": "tiny", "backend": f"llamacpp:{gguf}"},
              {"id": "other", "backend": f"llamacpp:{other}"}]  # fmt: skip
    path = write_config(tmp_path / "site", "sqlite+aiosqlite:///clawbot.db", models)
    await seed(load_config(path).database.url)
    args = ("backup", "--config", path, "--include-models")
    assert await clawbot(*args, "--out", tmp_path / "with.tar.gz") == 0
    assert await clawbot(*args[:-1], "--out", tmp_path / "without") == 0
    capsys.readouterr()

    gguf.unlink()  # lost: comes back from the backup that holds it
    other.write_bytes(b"GGUF changed")  # changed: a warning
    (tmp_path / "site" / "clawbot.db").unlink()
    assert await clawbot("restore", "--from", tmp_path / "with.tar.gz", "--config", path) == 0
    captured = capsys.readouterr()
    assert gguf.read_bytes() == original
    assert f"model file {gguf} restored" in captured.out
    assert f"warning: model file {other} differs from the one backed up" in captured.err

    gguf.unlink()
    (tmp_path / "site" / "clawbot.db").unlink()
    assert await clawbot("restore", "--from", tmp_path / "without", "--config", path) == 0
    err = capsys.readouterr().err
    assert f"warning: model file {gguf} is missing (used by tiny/default)" in err
    assert not gguf.exists()
