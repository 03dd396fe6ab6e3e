"""The batched audit writer and the usage summary, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import OperationalError

from app.ledger.audit import AuditEntry, AuditWriter, UsageRow, as_utc, usage_summary
from app.ledger.storage.database import Database
from app.ledger.storage.schema import ApiKey, AuditRecord

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def entry(n: int = 0, **fields: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "request_id": f"req-{n}",
        "ts": T0 + timedelta(seconds=n),
        "route": "/v1/chat/completions",
        "status": 200,
        "latency_ms": 12.5,
        "model": "mock",
        "prompt_tokens": 3,
        "completion_tokens": 4,
    }
    values.update(fields)
    return AuditEntry(**values)


async def rows(db: Database) -> list[AuditRecord]:
    async with db.session() as s:
        return list((await s.scalars(select(AuditRecord).order_by(AuditRecord.id))).all())


async def count(db: Database) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(AuditRecord)) or 0)


async def add_key(db: Database, key_id: str, last_used_at: datetime | None = None) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(
            insert(ApiKey.__table__).values(
                id=key_id,
                prefix=key_id,
                key_hash=secrets.token_hex(32),
                name=key_id,
                created_at=T0,
                updated_at=T0,
                last_used_at=last_used_at,
            )
        )


async def key_row(db: Database, key_id: str) -> ApiKey:
    async with db.session() as s:
        key = await s.get(ApiKey, key_id)
        assert key is not None
        return key


def fail_inserts(db: Database, times: int | None) -> list[int]:
    """Make the next `times` audit inserts fail as an outage would (None: all of them)."""
    attempts = [0]

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_LOG"):
            attempts[0] += 1
            if times is None or attempts[0] <= times:
                raise OperationalError(statement, None, ConnectionRefusedError("database down"))

    event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    return attempts


async def test_submitted_rows_all_land_and_round_trip(db: Database) -> None:
    writer = AuditWriter(db, flush_interval_s=0.01)
    writer.start()
    plus2 = timezone(timedelta(hours=2))
    full = entry(
        1,
        ts=datetime(2026, 1, 5, 14, 30, 15, 123456, tzinfo=plus2),
        key_id="k1",
        client_ip="10.0.0.1",
        backend="http://backend:8000/v1",
        status=429,
        error_type="rate_limit_exceeded",
        ttft_ms=3.25,
        stream=True,
        request_body='{"model": "mock"}',
        response_body="data: [DONE]",
    )
    sparse = entry(2, model=None, prompt_tokens=None, completion_tokens=None)
    for e in [full, sparse, *(entry(n) for n in range(3, 50))]:
        writer.submit(e)
    await writer.aclose()

    got = await rows(db)
    assert len(got) == 49
    assert writer.written == 49
    assert writer.dropped == 0
    first = got[0]
    if not db.is_sqlite:
        assert first.ts.tzinfo is not None  # SQLite keeps no offset: the writer stores UTC
    assert as_utc(first.ts) == full.ts
    for name in AuditEntry.__struct_fields__:
        if name != "ts":
            assert getattr(first, name) == getattr(full, name), name
    assert got[1].model is None
    assert got[1].prompt_tokens is None


async def test_rows_are_written_in_batches_of_one_insert(db: Database) -> None:
    inserts = [0]

    def after(conn: Any, clause: Any, *args: Any) -> None:
        if getattr(clause, "table", None) is AuditRecord.__table__ and clause.is_insert:
            inserts[0] += 1

    event.listen(db.engine.sync_engine, "after_execute", after)
    writer = AuditWriter(db, batch_size=500, flush_interval_s=0.05)
    for n in range(1200):
        writer.submit(entry(n))
    assert writer.queue_depth == 1200
    writer.start()
    await writer.aclose()
    assert await count(db) == 1200
    assert writer.batches == 3
    assert inserts[0] == 3


async def test_batches_add_tokens_and_last_use_to_keys(db: Database) -> None:
    await add_key(db, "k1")
    await add_key(db, "k2", last_used_at=T0 + timedelta(days=1))
    writer = AuditWriter(db, flush_interval_s=0.01)
    writer.start()
    writer.submit(entry(1, key_id="k1", prompt_tokens=10, completion_tokens=5))
    writer.submit(entry(9, key_id="k1", prompt_tokens=1, completion_tokens=None))
    writer.submit(entry(5, key_id="k1", prompt_tokens=None, completion_tokens=None, status=500))
    writer.submit(entry(2, key_id="k2", prompt_tokens=7, completion_tokens=0))
    writer.submit(entry(3, key_id="master", prompt_tokens=100))
    writer.submit(entry(4, key_id=None))
    await asyncio.sleep(0.2)
    writer.submit(entry(7, key_id="k1", prompt_tokens=2, completion_tokens=2))  # a later batch
    await writer.aclose()

    assert await count(db) == 7
    k1, k2 = await key_row(db, "k1"), await key_row(db, "k2")
    assert k1.spent_tokens == 10 + 5 + 1 + 4
    assert k1.last_used_at is not None
    assert as_utc(k1.last_used_at) == T0 + timedelta(seconds=9)  # never moved back by ts=7
    assert k2.spent_tokens == 7
    assert k2.last_used_at is not None
    assert as_utc(k2.last_used_at) == T0 + timedelta(days=1)


async def test_overflow_is_counted_and_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(db, max_queue=5)
    with caplog.at_level(logging.WARNING, logger="clawbot.audit"):
        for n in range(12):
            writer.submit(entry(n))
    assert writer.queue_depth == 5
    assert writer.dropped == 7
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: one line for the burst
    assert "dropped" in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clawbot.audit"):
        await writer.aclose()  # never started: close still writes what was queued
        writer.submit(entry(99))
    assert await count(db) == 5
    assert writer.written == 5
    assert writer.dropped == 8
    # The 6 drops after the first warning are reported at close.
    assert any("6 rows dropped" in r.getMessage() for r in caplog.records)


async def test_outage_keeps_and_retries_the_batch(db: Database) -> None:
    attempts = fail_inserts(db, times=4)
    writer = AuditWriter(db, flush_interval_s=0.01, retry_max_s=0.05)
    writer.start()
    for n in range(30):
        writer.submit(entry(n, key_id="k1"))
    await asyncio.sleep(0.05)
    for n in range(30, 60):
        writer.submit(entry(n))  # queued behind the failing batch
    await writer.aclose()
    assert attempts[0] > 4
    assert writer.failed_attempts == 4
    assert await count(db) == 60
    assert writer.written == 60
    assert writer.dropped == 0


async def test_close_flushes_the_queue(db: Database) -> None:
    writer = AuditWriter(db)
    writer.start()
    for n in range(100):
        writer.submit(entry(n))
    await writer.aclose()
    assert await count(db) == 100
    assert writer.queue_depth == 0


async def test_close_from_another_event_loop_is_refused_at_once() -> None:
    """The writer's futures belong to its own loop: a close from another loop would wait for
    wakeups that never cross threads (a test hung so for minutes), so it is refused."""
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    db = Database("sqlite+aiosqlite://")
    writer = AuditWriter(db)

    async def start() -> None:
        writer.start()

    try:
        asyncio.run_coroutine_threadsafe(start(), other).result(timeout=5)
        with pytest.raises(RuntimeError, match="loop the writer does not run on"):
            await writer.aclose(timeout_s=0.1)
        asyncio.run_coroutine_threadsafe(writer.aclose(), other).result(timeout=5)
        assert writer.dropped == 0
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(timeout=5)
        other.close()
        await db.aclose()


async def test_close_gives_up_at_the_deadline_and_counts_the_loss(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    fail_inserts(db, times=None)
    writer = AuditWriter(db, batch_size=10, flush_interval_s=0.01, retry_max_s=0.05)
    writer.start()
    for n in range(25):
        writer.submit(entry(n))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="clawbot.audit"):
        await writer.aclose(timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    assert writer.written == 0
    assert writer.dropped == 25
    assert writer.failed_attempts > 0
    assert writer.queue_depth == 0
    assert any("25 rows not written" in r.getMessage() for r in caplog.records)


async def test_unreachable_database_loses_rows_only_at_the_deadline() -> None:
    db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        writer = AuditWriter(db, flush_interval_s=0.01, retry_max_s=0.02)
        writer.start()
        writer.submit(entry(1))
        for _ in range(200):
            if writer.failed_attempts:
                break
            await asyncio.sleep(0.01)
        assert writer.queue_depth == 1
        assert writer.failed_attempts > 0
        await writer.aclose(timeout_s=0.1)
        assert writer.dropped == 1
    finally:
        await db.aclose()


async def test_usage_summary_groups_sums_and_filters_by_time(db: Database) -> None:
    writer = AuditWriter(db)
    for e in [
        entry(0, key_id="a", model="m1", prompt_tokens=10, completion_tokens=20),
        entry(1, key_id="a", model="m1", prompt_tokens=1, completion_tokens=None, status=500),
        entry(2, key_id="a", model="m2", prompt_tokens=100, completion_tokens=100),
        entry(3, key_id="b", model="m1", prompt_tokens=None, completion_tokens=None, status=429),
        entry(4, key_id=None, model="m2", prompt_tokens=5, completion_tokens=5),
        entry(3600, key_id="a", model="m1", prompt_tokens=1000, completion_tokens=0),  # later
        entry(-3600, key_id="b", model="m1", prompt_tokens=1000, completion_tokens=0),  # earlier
    ]:
        writer.submit(e)
    await writer.aclose()
    since, until = T0, T0 + timedelta(hours=1)  # [since, until): excludes ts=T0+1h

    assert await usage_summary(db, since=since, until=until) == [
        UsageRow(
            key_id="a",
            model="m2",
            requests=1,
            errors=0,
            prompt_tokens=100,
            completion_tokens=100,
            total_tokens=200,
        ),
        UsageRow(
            key_id="a",
            model="m1",
            requests=2,
            errors=1,
            prompt_tokens=11,
            completion_tokens=20,
            total_tokens=31,
        ),
        UsageRow(
            key_id=None,
            model="m2",
            requests=1,
            errors=0,
            prompt_tokens=5,
            completion_tokens=5,
            total_tokens=10,
        ),
        UsageRow(
            key_id="b",
            model="m1",
            requests=1,
            errors=1,
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
        ),
    ]
    by_model = await usage_summary(db, since=since, until=until, group_by=["model"])
    assert [(r.model, r.key_id, r.requests, r.errors, r.total_tokens) for r in by_model] == [
        ("m2", None, 2, 0, 210),
        ("m1", None, 3, 2, 31),
    ]
    # A time in another zone is the same instant.
    plus2 = timezone(timedelta(hours=2))
    everything = await usage_summary(
        db,
        since=since.astimezone(plus2) - timedelta(hours=2),
        until=until + timedelta(hours=1),
        group_by=(),
    )
    assert [(r.requests, r.errors, r.prompt_tokens, r.total_tokens) for r in everything] == [
        (7, 2, 2116, 2241)
    ]
    assert (
        await usage_summary(
            db, since=until + timedelta(days=1), until=until + timedelta(days=2), group_by=()
        )
        == []
    )
    assert await usage_summary(db, since=since, until=since, group_by=["key_id"]) == []
    with pytest.raises(ValueError, match="cannot group"):
        await usage_summary(db, since=since, until=until, group_by=["route"])  # type: ignore[list-item]


async def test_a_row_the_database_rejects_is_dropped_alone(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(db, flush_interval_s=0.01)
    for n in range(10):
        writer.submit(entry(n, route=None) if n == 4 else entry(n))  # NOT NULL violated
    writer.submit(entry(10, request_id="x" * 500))  # too long for PostgreSQL: clipped
    with caplog.at_level(logging.ERROR, logger="clawbot.audit"):
        await writer.aclose()
    assert await count(db) == 10
    assert writer.written == 10
    assert writer.dropped == 1
    assert writer.failed_attempts == 0
    assert any("req-4 rejected" in r.getMessage() for r in caplog.records)
    assert (await rows(db))[-1].request_id == "x" * 128
