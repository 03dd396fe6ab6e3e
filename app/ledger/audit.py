"""The audit log: rows queued on the request path, written in batches by one background task.

`AuditWriter.submit` never waits: it puts the row on a bounded queue and, when the queue is full,
drops it, counts it in `dropped` and logs a warning (at most one line per 10 s). The writer task
takes up to `batch_size` rows (or what arrived within `flush_interval_s`), inserts them with one
executemany and, in the same transaction, adds their tokens to `api_keys.spent_tokens` and moves
`last_used_at` forward. While the database is down the batch is kept and retried with exponential
backoff; new rows wait in the queue meanwhile. `aclose` flushes what is left within its timeout
and counts what it could not write.

Times are stored in UTC (SQLite keeps no offset, so every writer must agree on one; a naive
time is taken to be UTC already).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    Table,
    bindparam,
    case,
    cast,
    extract,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql import ColumnElement

from app.ledger.storage.database import Database
from app.ledger.storage.schema import ApiKey, AuditRecord

log = logging.getLogger("clawbot.audit")

DROP_LOG_INTERVAL_S = 10.0
"""At most one overflow warning, and one outage warning, per this many seconds."""

_TRANSIENT = (SQLAlchemyError, OSError, ConnectionError)

_AUDIT: Table = AuditRecord.__table__  # type: ignore[assignment]
_KEYS: Table = ApiKey.__table__  # type: ignore[assignment]


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One audit row: one answered API request, success or failure."""

    request_id: str
    ts: datetime
    """When the request arrived (timezone-aware; a naive time is taken as UTC)."""
    route: str
    status: int
    latency_ms: float
    key_id: str | None = None
    client_ip: str | None = None
    model: str | None = None
    backend: str | None = None
    error_type: str | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream: bool = False
    request_body: str | None = None
    response_body: str | None = None


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """Requests and tokens of one group (a field not grouped by is None)."""

    key_id: str | None = None
    model: str | None = None
    requests: int
    errors: int
    """Answers with status >= 400."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def as_utc(ts: datetime) -> datetime:
    """`ts` in UTC; a naive time is taken to be UTC already."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _string_limits() -> dict[str, int]:
    return {
        c.name: c.type.length
        for c in _AUDIT.columns
        if isinstance(c.type, String) and c.type.length is not None
    }


class AuditWriter:
    """Queues audit rows without waiting and writes them in batches from one background task."""

    def __init__(
        self,
        db: Database,
        *,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be positive")
        self._db = db
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._retry_max_s = retry_max_s
        self._limits = _string_limits()
        self._pending: list[AuditEntry] = []
        """The batch being gathered or written; kept until it is in the database."""
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._accepting = True
        self._last_drop_log = -math.inf
        self._unlogged_drops = 0
        self.written = 0
        """Rows in the database."""
        self.dropped = 0
        """Rows lost: queue full, submitted after close, rejected by the database, or unwritten
        at the close deadline."""
        self.failed_attempts = 0
        """Batch writes that failed and were retried."""
        self.batches = 0
        """Batches written (one insert each)."""

    @property
    def queue_depth(self) -> int:
        """Rows waiting, the batch in hand included."""
        return self._queue.qsize() + len(self._pending)

    def submit(self, entry: AuditEntry) -> None:
        """Queue one row; never waits. A row that does not fit is dropped, counted and logged."""
        if self._accepting:
            try:
                self._queue.put_nowait(entry)
                return
            except asyncio.QueueFull:
                pass
        self._count_drop()

    def start(self) -> None:
        """Start the background writer (inside the running event loop)."""
        if not self._accepting:
            raise RuntimeError("the audit writer is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="clawbot-audit-writer"
            )

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Stop accepting rows, write what is queued within `timeout_s`, then stop.

        Awaited on the loop the writer runs on: from another loop nothing would wake either
        one (asyncio is not thread-safe), and the close could wait forever."""
        if self._task is not None and self._task.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError("AuditWriter.aclose() awaited on a loop the writer does not run on")
        self._accepting = False
        self._closing.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            await asyncio.wait({task})
            lost = len(self._pending) + self._queue.qsize()
            self._pending = []
            while not self._queue.empty():
                self._queue.get_nowait()
            self.dropped += lost
            log.error(
                "audit writer: %d rows not written within %.1f s of shutdown, lost "
                "(%d failed attempts)",
                lost,
                timeout_s,
                self.failed_attempts,
            )
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.error("audit writer stopped on an error", exc_info=exc)
        if self._unlogged_drops:
            self._log_drops()

    def _count_drop(self) -> None:
        self.dropped += 1
        self._unlogged_drops += 1
        if time.monotonic() - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._log_drops()

    def _log_drops(self) -> None:
        reason = "queue full" if self._accepting else "writer closed"
        log.warning(
            "audit log: %d rows dropped (%s, max_queue=%d); %d dropped in total",
            self._unlogged_drops,
            reason,
            self._queue.maxsize,
            self.dropped,
        )
        self._unlogged_drops = 0
        self._last_drop_log = time.monotonic()

    async def _run(self) -> None:
        while True:
            if not self._pending:
                await self._gather()
                if not self._pending:
                    return  # closing, and nothing is left
            try:
                await self._flush()
            except Exception:  # a bug, not an outage: retrying would never end
                log.exception(
                    "audit writer: %d rows lost to an unexpected error", len(self._pending)
                )
                self.dropped += len(self._pending)
                self._pending = []

    async def _gather(self) -> None:
        """Wait for one row, let the flush interval fill the batch, then take up to batch_size.

        One timer per batch, not per row: at low rates a per-row wait costs more than the insert.
        """
        if not await self._take(None):
            return
        if self._queue.qsize() + len(self._pending) < self._batch_size:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._flush_interval_s)
        while not self._queue.empty() and len(self._pending) < self._batch_size:
            self._pending.append(self._queue.get_nowait())

    async def _take(self, wait_s: float | None) -> bool:
        """Move one row into the batch; False after `wait_s`, or when closing with none left."""
        if not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
            return True
        if self._closing.is_set():
            return False
        getter = asyncio.ensure_future(self._queue.get())
        closer = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait(
                (getter, closer), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closer.cancel()
            if getter.done():
                # Even when we are being cancelled: the row is ours now, and must be counted.
                self._pending.append(getter.result())
            else:
                getter.cancel()  # Queue.get leaves the row in the queue when cancelled
        return getter.done()

    async def _flush(self) -> None:
        """Write the batch in hand, retrying with backoff while the database is unavailable."""
        delay = min(0.1, self._retry_max_s)
        failures = 0
        last_log = -math.inf
        while self._pending:
            try:
                try:
                    await self._insert(self._pending)
                    self.written += len(self._pending)
                    self.batches += 1
                    self._pending = []
                except (DataError, IntegrityError) as exc:
                    log.warning("audit batch rejected (%s); writing its rows one by one", exc)
                    await self._insert_singly()
            except _TRANSIENT as exc:
                failures += 1
                self.failed_attempts += 1
                now = time.monotonic()
                if now - last_log >= DROP_LOG_INTERVAL_S:
                    last_log = now
                    log.warning(
                        "audit database unavailable (%s: %s); %d rows kept, %d failed attempts, "
                        "retrying every %.2f s at most",
                        type(exc).__name__,
                        exc,
                        self.queue_depth,
                        failures,
                        self._retry_max_s,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        if failures:
            log.info("audit database back after %d failed attempts", failures)

    async def _insert_singly(self) -> None:
        """Write the batch a row at a time, dropping (and counting) rows the database rejects."""
        while self._pending:
            entry = self._pending[0]
            try:
                await self._insert([entry])
            except (DataError, IntegrityError) as exc:
                self.dropped += 1
                log.error("audit row %s rejected by the database, lost: %s", entry.request_id, exc)
            else:
                self.written += 1
                self.batches += 1
            self._pending.pop(0)

    async def _insert(self, entries: Sequence[AuditEntry]) -> None:
        """One transaction: the rows in one executemany, then every key's token total."""
        rows = [self._row(entry) for entry in entries]
        spent: dict[str, tuple[int, datetime]] = {}
        for row in rows:
            key_id = row["key_id"]
            if key_id is None:
                continue
            tokens = (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0)
            previous = spent.get(key_id)
            if previous is None:
                spent[key_id] = (tokens, row["ts"])
            else:
                spent[key_id] = (previous[0] + tokens, max(previous[1], row["ts"]))
        now = datetime.now(UTC)
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(_AUDIT), rows)
            if spent:
                await conn.execute(
                    _SPEND,
                    [
                        {"b_key": k, "b_tokens": n, "b_ts": ts, "b_now": now}
                        for k, (n, ts) in spent.items()
                    ],
                )

    def _row(self, entry: AuditEntry) -> dict[str, Any]:
        row = msgspec.structs.asdict(entry)
        row["ts"] = as_utc(entry.ts)
        for name, length in self._limits.items():
            value = row[name]
            if value is not None and len(value) > length:
                row[name] = value[:length]  # PostgreSQL would reject the whole batch
        return row


_TS = bindparam("b_ts", type_=DateTime(timezone=True))
_SPEND = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("b_key", type_=String()))
    .values(
        spent_tokens=_KEYS.c.spent_tokens + bindparam("b_tokens", type_=BigInteger()),
        last_used_at=case(
            (or_(_KEYS.c.last_used_at.is_(None), _KEYS.c.last_used_at < _TS), _TS),
            else_=_KEYS.c.last_used_at,
        ),
        # A new spend is a change: key caches poll updated_at, and budgets need the new total.
        updated_at=bindparam("b_now", type_=DateTime(timezone=True)),
    )
)
"""Adds a batch's tokens to a key and moves `last_used_at` forward, never back (an unknown key,
such as the master key, matches no row)."""

_GROUPS = ("key_id", "model")


def _groups(group_by: Sequence[str]) -> list[str]:
    """`group_by` without repeats; ValueError for a column usage cannot be grouped by."""
    groups = list(dict.fromkeys(group_by))
    for name in groups:
        if name not in _GROUPS:
            raise ValueError(f"cannot group usage by {name!r}; choose from {_GROUPS}")
    return groups


async def usage_summary(
    db: Database,
    *,
    since: datetime,
    until: datetime,
    group_by: Sequence[Literal["key_id", "model"]] = ("key_id", "model"),
) -> list[UsageRow]:
    """Requests, errors and tokens in `[since, until)`, per group, most tokens first."""
    groups = _groups(group_by)
    columns = [_AUDIT.c[name] for name in groups]
    prompt = func.coalesce(func.sum(_AUDIT.c.prompt_tokens), 0)
    completion = func.coalesce(func.sum(_AUDIT.c.completion_tokens), 0)
    errors = func.coalesce(func.sum(case((_AUDIT.c.status >= 400, 1), else_=0)), 0)
    total = prompt + completion
    stmt = (
        select(
            *columns,
            func.count().label("requests"),
            errors.label("errors"),
            prompt.label("prompt_tokens"),
            completion.label("completion_tokens"),
        )
        .where(_AUDIT.c.ts >= as_utc(since), _AUDIT.c.ts < as_utc(until))
        .group_by(*columns)
        .order_by(total.desc(), *columns)
    )
    async with db.engine.connect() as conn:
        result = await conn.execute(stmt)
        rows = result.mappings().all()
    summary = []
    for row in rows:
        if not row["requests"]:
            continue  # the one row an ungrouped aggregate returns over no rows
        summary.append(UsageRow(**_usage_fields(row, groups)))
    return summary


def _usage_fields(row: Any, groups: Sequence[str]) -> dict[str, Any]:
    """A usage query row's fields, as `UsageRow` (and `SeriesPoint`) take them."""
    p, c = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return {
        "key_id": row["key_id"] if "key_id" in groups else None,
        "model": row["model"] if "model" in groups else None,
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
    }


class SeriesPoint(UsageRow, frozen=True, kw_only=True):
    """Requests and tokens of one group in one time bucket (a field not grouped by is None)."""

    bucket: datetime
    """The bucket's start, in UTC."""


def _bucket_start(db: Database, seconds: int) -> ColumnElement[int]:
    """Each row's bucket: its time in seconds since the Unix epoch, floored to `seconds`."""
    if db.is_sqlite:
        # Stored as UTC text; integer division floors the (positive) epoch seconds.
        return cast(func.strftime("%s", _AUDIT.c.ts), Integer) // seconds * seconds
    return cast(func.floor(extract("epoch", _AUDIT.c.ts) / seconds), BigInteger) * seconds


async def usage_series(
    db: Database,
    *,
    since: datetime,
    until: datetime,
    bucket: timedelta,
    group_by: Sequence[Literal["key_id", "model"]] = ("key_id", "model"),
    route_prefix: str | None = "/v1/",
) -> list[SeriesPoint]:
    """Requests, errors and tokens in `[since, until)` per `bucket` of time and per group.

    Buckets are aligned to the Unix epoch (hourly ones start on the hour, UTC); empty ones are
    left out. Only routes starting with `route_prefix` count (by default the API's, not the
    admin API's own calls). Sorted by bucket, then group.
    """
    groups = _groups(group_by)
    seconds = int(bucket.total_seconds())
    if seconds < 1 or seconds != bucket.total_seconds():
        raise ValueError(f"a bucket is a whole number of seconds, not {bucket}")
    conditions = [_AUDIT.c.ts >= as_utc(since), _AUDIT.c.ts < as_utc(until)]
    if route_prefix is not None:
        conditions.append(_AUDIT.c.route.startswith(route_prefix, autoescape=True))
    # Grouping by the bucket of an inner select keeps PostgreSQL from seeing two different
    # expressions (each with its own bound `seconds`) in SELECT and GROUP BY.
    rows = (
        select(
            _bucket_start(db, seconds).label("bucket"),
            *(_AUDIT.c[name] for name in groups),
            _AUDIT.c.status,
            _AUDIT.c.prompt_tokens,
            _AUDIT.c.completion_tokens,
        )
        .where(*conditions)
        .subquery()
    )
    columns = [rows.c.bucket, *(rows.c[name] for name in groups)]
    stmt = select(
        *columns,
        func.count().label("requests"),
        func.coalesce(func.sum(case((rows.c.status >= 400, 1), else_=0)), 0).label("errors"),
        func.coalesce(func.sum(rows.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(rows.c.completion_tokens), 0).label("completion_tokens"),
    ).group_by(*columns)
    async with db.engine.connect() as conn:
        result = await conn.execute(stmt)
        found = result.mappings().all()
    points = []
    for row in found:
        start = datetime.fromtimestamp(int(row["bucket"]), UTC)
        points.append(SeriesPoint(bucket=start, **_usage_fields(row, groups)))
    points.sort(key=lambda p: (p.bucket, p.key_id or "", p.model or ""))
    return points


class ErrorRow(msgspec.Struct, frozen=True, kw_only=True):
    """One request answered with status >= 400, as the audit log has it."""

    ts: datetime
    request_id: str
    route: str
    status: int
    error_type: str | None
    model: str | None
    key_id: str | None
    backend: str | None
    latency_ms: float


async def recent_errors(db: Database, *, limit: int) -> list[ErrorRow]:
    """The latest `limit` requests answered with status >= 400, newest first."""
    fields = list(ErrorRow.__struct_fields__)
    stmt = (
        select(*(_AUDIT.c[name] for name in fields))
        .where(_AUDIT.c.status >= 400)
        .order_by(_AUDIT.c.ts.desc(), _AUDIT.c.id.desc())
        .limit(limit)
    )
    async with db.engine.connect() as conn:
        result = await conn.execute(stmt)
        found = result.mappings().all()
    return [
        ErrorRow(**{name: row[name] for name in fields if name != "ts"}, ts=as_utc(row["ts"]))
        for row in found
    ]
