"""Requests-, tokens- and concurrency limits over a `limits` storage (`memory://` or `redis://`).

Strategy: limits' sliding window counter. Its Redis acquire is one Lua script, so any number of
gateway replicas sharing a Redis admit exactly the configured amount per window; it keeps two
integers per key whatever the limit, where the moving window keeps one list entry per unit of
cost (a 1M tokens-per-minute limit would be a 1M-entry Redis list, pushed ~1k entries a request).
Its one approximation is in time, not across replicas: the previous window's count is assumed
spread evenly over it.

Tokens are charged up front from the estimate; `Admission.release` charges the difference to
real usage, refunds included (limits has no refund call, so `_adjust` moves the current window's
counter directly, never below zero; this ties us to limits 5.x key layout, which the contract
tests pin down).

`memory://` skips limits' storage, whose every call takes a lock and schedules an expiry task:
`_LocalWindows` does the same arithmetic on plain dicts, synchronously (one event loop thread,
no await between a read and its write), and a test replays random traffic against both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerMinute,
    RateLimitItemPerMonth,
)
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.coredis import CoredisBridge
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.typing import AsyncCoRedisClient

from app.errors import RateLimited, ServiceUnavailable

log = logging.getLogger("clawbot.ratelimit")

_ADJUST = """
local d = tonumber(ARGV[1])
local v = redis.call('get', KEYS[1])
if not v then
    if d > 0 then redis.call('set', KEYS[1], d, 'PX', ARGV[2]) end
    return 0
end
local n = math.max(0, tonumber(v) + d)
redis.call('set', KEYS[1], n, 'KEEPTTL')
return n
"""

_SLOT_ACQUIRE = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[3], ARGV[4])
redis.call('pexpire', KEYS[1], ARGV[5])
return 1
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-subject limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None
    tokens_per_period: int | None = None
    """A token budget per calendar-ish `period` (a day or a month long window)."""
    period: Literal["day", "month"] | None = None


@dataclass(slots=True)
class _Window:
    kind: Literal["requests", "tokens", "budget"]
    subject: str
    item: RateLimitItem
    expiry: int
    cost: int
    remaining: int = 0
    reset_s: float = 0.0

    def local_key(self) -> tuple[str, str, int]:
        """The window's key in `_LocalWindows`: the parts of limits' `key_for` that vary."""
        return (self.item.namespace, self.subject, self.item.amount)


class _LocalWindows:
    """Sliding window counters in this process, with limits' `MemoryStorage` arithmetic.

    Windows are numbered `int(now / expiry)` (aligned to the epoch, like limits' keys); each key
    keeps `[current window number, its count, the previous window's count, expiry]`. A clock
    stepping back more than a window loses the older counts limits would still have had.
    """

    SWEEP_EVERY_S = 60.0

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], list[int]] = {}
        self._next_sweep = 0.0

    def window(
        self, key: tuple[str, str, int], expiry: int, now: float
    ) -> tuple[int, float, int, float]:
        """(previous count, its ttl, current count, its ttl), as limits' `get_sliding_window`."""
        previous = current = 0
        entry = self._counts.get(key)
        if entry is not None:
            previous = _count(entry, int((now - expiry) / expiry))
            current = _count(entry, int(now / expiry))
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def hit(
        self, key: tuple[str, str, int], limit: int, expiry: int, cost: int, now: float
    ) -> bool:
        """Charge `cost` if it fits, as limits' `acquire_sliding_window_entry`."""
        if cost > limit:
            return False
        previous, previous_ttl, current, _ = self.window(key, expiry, now)
        if math.floor(previous * previous_ttl / expiry + current) + cost > limit:
            return False
        current = self.add(key, expiry, now, cost)
        if math.floor(previous * previous_ttl / expiry + current) > limit:
            self.add(key, expiry, now, -cost)
            return False
        return True

    def add(self, key: tuple[str, str, int], expiry: int, now: float, delta: int) -> int:
        """Move the current window's count by `delta`, never below zero; the new count."""
        number = int(now / expiry)
        entry = self._counts.get(key)
        if entry is None:
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._counts[key] = [number, 0, 0, expiry]
        elif number != entry[0]:
            if number == entry[0] - 1:  # the clock stepped back a window
                entry[2] = max(0, entry[2] + delta)
                return entry[2]
            if number < entry[0]:
                return 0
            entry[2] = entry[1] if number == entry[0] + 1 else 0
            entry[0], entry[1] = number, 0
        entry[1] = max(0, entry[1] + delta)
        return entry[1]

    def _sweep(self, now: float) -> None:
        """Forget keys whose current and previous windows have both passed."""
        self._next_sweep = now + self.SWEEP_EVERY_S
        stale = [k for k, e in self._counts.items() if e[0] + 1 < int(now / e[3])]
        for key in stale:
            del self._counts[key]

    async def reset(self) -> int:
        """Forget every counter; how many keys there were."""
        count = len(self._counts)
        self._counts.clear()
        return count


def _count(entry: list[int], number: int) -> int:
    if number == entry[0]:
        return entry[1]
    if number == entry[0] - 1:
        return entry[2]
    return 0


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go style): `20ms`, `1s`, `6m0s`."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Admission:
    """What `RateLimiter.admit` granted: headers to send and a slot to release."""

    def __init__(
        self, limiter: RateLimiter, windows: list[_Window], slots: list[tuple[str, str]]
    ) -> None:
        self._limiter = limiter
        self._windows = windows
        self._slots = slots
        self._released = False

    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the tightest window of each kind that is set."""
        out: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            windows = [w for w in self._windows if w.kind == kind]
            if not windows:
                continue
            w = min(windows, key=lambda w: (w.remaining, -w.reset_s))
            out[f"x-ratelimit-limit-{kind}"] = str(w.item.amount)
            out[f"x-ratelimit-remaining-{kind}"] = str(w.remaining)
            out[f"x-ratelimit-reset-{kind}"] = format_duration(w.reset_s)
        return out

    async def release(self, actual_tokens: int | None = None) -> None:
        """Free the parallel slot and charge the token windows with real usage; idempotent."""
        if self._released:
            return
        self._released = True
        token_windows = [w for w in self._windows if w.kind in ("tokens", "budget")]
        await self._limiter._finish(
            self._slots,
            token_windows,
            None if actual_tokens is None else max(0, actual_tokens),
        )


class RateLimiter:
    """Admits requests against per-subject limits kept in memory or in Redis."""

    def __init__(
        self,
        uri: str = "memory://",
        *,
        on_storage_error: Literal["open", "closed"] = "open",
        timeout: float = 0.25,
        key_prefix: str = "clawbot",
        slot_ttl: float = 900.0,
        warn_interval: float = 30.0,
        _limits_memory: bool = False,
    ) -> None:
        if not uri.startswith(("memory://", "redis://", "rediss://")):
            raise ValueError(f"unsupported rate-limit storage {uri!r}: use memory:// or redis://")
        self._storage: _LocalWindows | MemoryStorage | RedisStorage
        self._errors: tuple[type[BaseException], ...] = (StorageError, TimeoutError, OSError)
        if uri.startswith("memory") and not _limits_memory:
            self._storage = _LocalWindows()
        else:
            options: dict[str, Any] = {}
            if not uri.startswith("memory"):
                options["key_prefix"] = key_prefix
            storage = storage_from_string(f"async+{uri}", wrap_exceptions=True, **options)
            if not isinstance(storage, MemoryStorage | RedisStorage):
                raise ValueError(
                    f"unsupported rate-limit storage {uri!r}: use memory:// or redis://"
                )
            self._storage = storage
            self._strategy = SlidingWindowCounterRateLimiter(storage)
            self._errors += _as_tuple(storage.base_exceptions)
        self.on_storage_error = on_storage_error
        self.timeout = timeout
        self.slot_ttl = slot_ttl
        """Seconds a parallel slot lives in Redis if its holder dies without releasing it."""
        self.warn_interval = warn_interval
        self.storage_failures = 0
        """Storage calls that failed or timed out since start."""
        self._last_warning = -math.inf
        self._local_slots: dict[str, int] = {}
        self._items: dict[tuple[str, int], tuple[RateLimitItem, int]] = {}

    async def warm_up(self, within_s: float = 5.0) -> bool:
        """Connect to the storage and load its scripts before the first request needs them.

        Otherwise the first rate-limited request pays for connecting within `self.timeout`,
        on a slow start, is let through uncounted (fail open) or refused (fail closed).
        """
        if isinstance(self._storage, _LocalWindows):
            return True
        probe = RateLimitItemPerMinute(1, namespace="warm-up")
        try:
            async with asyncio.timeout(within_s):
                await self._strategy.get_window_stats(probe, "warm-up")
        except self._errors as exc:
            mode = self.on_storage_error
            log.warning("rate-limit storage is not answering (%r); failing %s", exc, mode)
            return False
        return True

    async def admit(self, subject: str, limits: Limits, tokens_estimate: int) -> Admission:
        """Admit one request for `subject` or raise RateLimited; refusing consumes nothing."""
        return await self.admit_all([(subject, limits)], tokens_estimate)

    async def admit_all(
        self, subjects_and_limits: Sequence[tuple[str, Limits]], tokens_estimate: int
    ) -> Admission:
        """Admit against every (subject, limits) pair, or raise and consume none of them."""
        cost = max(1, tokens_estimate)
        windows: list[_Window] = []
        parallel: list[tuple[str, int]] = []
        for subject, limits in subjects_and_limits:
            if limits.requests_per_minute is not None:
                item, expiry = self._item(
                    RateLimitItemPerMinute, "requests", limits.requests_per_minute
                )
                windows.append(_Window("requests", subject, item, expiry, 1))
            if limits.tokens_per_minute is not None:
                item, expiry = self._item(
                    RateLimitItemPerMinute, "tokens", limits.tokens_per_minute
                )
                windows.append(_Window("tokens", subject, item, expiry, cost))
            if limits.max_parallel is not None:
                parallel.append((subject, limits.max_parallel))
            if limits.tokens_per_period is not None and limits.period is not None:
                per = RateLimitItemPerDay if limits.period == "day" else RateLimitItemPerMonth
                item, expiry = self._item(per, f"budget-{limits.period}", limits.tokens_per_period)
                windows.append(_Window("budget", subject, item, expiry, cost))
        for w in windows:
            if w.cost > w.item.amount:
                raise RateLimited(
                    f"{_label(w.kind)} limit is {w.item.amount} for {w.subject}; this request"
                    f" needs {w.cost} and can never fit",
                    # retrying cannot help; the openai SDKs honour this header
                    headers={"x-should-retry": "false"},
                )
        if isinstance(self._storage, _LocalWindows):
            return self._admit_local(self._storage, windows, parallel)
        slots: list[tuple[str, str]] = []
        hit: list[_Window] = []
        try:
            async with self._guard():
                for w in windows:
                    wait = await self._probe(w)
                    if wait is not None:
                        raise _refusal(w, wait)
                for subject, limit in parallel:
                    token = await self._acquire_slot(subject, limit)
                    if token is None:
                        raise _no_slot(subject, limit)
                    slots.append((subject, token))
                for w in windows:
                    if not await self._strategy.hit(w.item, w.subject, cost=w.cost):
                        wait = await self._probe(w)
                        raise _refusal(w, wait if wait is not None else 0.001)
                    hit.append(w)
        except RateLimited:
            await self._undo(slots, hit)
            raise
        except _StorageDown:
            await self._undo(slots, hit)
            return Admission(self, [], [])
        return Admission(self, windows, slots)

    def _admit_local(
        self, store: _LocalWindows, windows: list[_Window], parallel: list[tuple[str, int]]
    ) -> Admission:
        """`admit_all`'s steps on `_LocalWindows`: nothing there can fail or wait."""
        slots: list[tuple[str, str]] = []
        hit: list[_Window] = []
        try:
            for w in windows:
                wait = _judge(w, *store.window(w.local_key(), w.expiry, time.time()))
                if wait is not None:
                    raise _refusal(w, wait)
            for subject, limit in parallel:
                if not self._take_local_slot(subject, limit):
                    raise _no_slot(subject, limit)
                slots.append((subject, subject))
            for w in windows:
                key = w.local_key()
                if not store.hit(key, w.item.amount, w.expiry, w.cost, time.time()):
                    wait = _judge(w, *store.window(key, w.expiry, time.time()))
                    raise _refusal(w, wait if wait is not None else 0.001)
                hit.append(w)
        except RateLimited:
            for w in hit:
                store.add(w.local_key(), w.expiry, time.time(), -w.cost)
            for subject, _ in slots:
                self._free_local_slot(subject)
            raise
        return Admission(self, windows, slots)

    def _item(
        self, per: type[RateLimitItem], namespace: str, amount: int
    ) -> tuple[RateLimitItem, int]:
        """The (cached) limits item for `amount` per `per`'s period, and its expiry."""
        cached = self._items.get((namespace, amount))
        if cached is None:
            item = per(amount, namespace=namespace)
            cached = self._items[(namespace, amount)] = (item, item.get_expiry())
        return cached

    async def aclose(self) -> None:
        """Close the storage's connections."""
        storage = self._storage
        if isinstance(storage, RedisStorage):
            _client(storage).connection_pool.disconnect()
        elif isinstance(storage, MemoryStorage) and storage.timer is not None:
            storage.timer.cancel()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Bound storage calls by `timeout`; map failures to the configured open/closed mode."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except self._errors as exc:
            self.storage_failures += 1
            now = time.monotonic()
            if now - self._last_warning >= self.warn_interval:
                self._last_warning = now
                log.warning(
                    "rate-limit storage failed (%s: %s); failing %s (%d failures so far)",
                    type(exc).__name__,
                    exc,
                    self.on_storage_error,
                    self.storage_failures,
                )
            if self.on_storage_error == "closed":
                raise ServiceUnavailable(
                    "rate-limit storage is unavailable",
                    code="rate_limit_storage_unavailable",
                    retry_after=1,
                ) from exc
            raise _StorageDown from exc

    async def _probe(self, w: _Window) -> float | None:
        """Fill in the window's state as if `w.cost` were charged; seconds to wait if it can't."""
        assert not isinstance(self._storage, _LocalWindows)
        window = await self._storage.get_sliding_window(w.item.key_for(w.subject), w.expiry)
        return _judge(w, *window)

    def _take_local_slot(self, subject: str, limit: int) -> bool:
        held = self._local_slots.get(subject, 0)
        if held >= limit:
            return False
        self._local_slots[subject] = held + 1
        return True

    def _free_local_slot(self, subject: str) -> None:
        held = self._local_slots.get(subject, 0) - 1
        if held > 0:
            self._local_slots[subject] = held
        else:
            self._local_slots.pop(subject, None)

    async def _acquire_slot(self, subject: str, limit: int) -> str | None:
        storage = self._storage
        assert not isinstance(storage, _LocalWindows)
        if isinstance(storage, MemoryStorage):
            return subject if self._take_local_slot(subject, limit) else None
        token = uuid.uuid4().hex
        now = time.time()
        ok = await _client(storage).eval(
            _SLOT_ACQUIRE,
            keys=[self._slot_key(storage, subject)],
            args=[now, limit, now + self.slot_ttl, token, int(self.slot_ttl * 1000)],
        )
        return token if ok else None

    async def _release_slot(self, subject: str, token: str) -> None:
        storage = self._storage
        assert not isinstance(storage, _LocalWindows)
        if isinstance(storage, MemoryStorage):
            self._free_local_slot(subject)
            return
        await _client(storage).zrem(self._slot_key(storage, subject), [token])

    @staticmethod
    def _slot_key(storage: RedisStorage, subject: str) -> str:
        return storage.bridge.prefixed_key(f"parallel/{subject}")

    async def _adjust(self, w: _Window, delta: int) -> None:
        """Move the current window's counter by `delta` without a limit check, floored at 0."""
        storage = self._storage
        assert not isinstance(storage, _LocalWindows)
        key = w.item.key_for(w.subject)
        expiry = w.expiry
        if isinstance(storage, MemoryStorage):
            _, current = storage.sliding_window_keys(key, expiry, time.time())
            if delta > 0:
                await storage.incr(current, 2 * expiry, delta)
            else:
                await storage.decr(current, -delta)
            return
        await _client(storage).eval(
            _ADJUST,
            keys=[storage.bridge.prefixed_key(f"{{{key}}}")],
            args=[delta, 2 * expiry * 1000],
        )

    async def _undo(self, slots: list[tuple[str, str]], hit: list[_Window]) -> None:
        """Best-effort rollback of a refused or failed admission."""
        try:
            async with self._guard():
                for w in hit:
                    await self._adjust(w, -w.cost)
                for subject, token in slots:
                    await self._release_slot(subject, token)
        except (_StorageDown, ServiceUnavailable):
            pass

    async def _finish(
        self, slots: list[tuple[str, str]], tokens: list[_Window], actual: int | None
    ) -> None:
        store = self._storage
        if isinstance(store, _LocalWindows):
            for subject, _ in slots:
                self._free_local_slot(subject)
            if actual is not None:
                for w in tokens:
                    if actual != w.cost:
                        store.add(w.local_key(), w.expiry, time.time(), actual - w.cost)
            return
        try:
            async with self._guard():
                for subject, token in slots:
                    await self._release_slot(subject, token)
                if actual is not None:
                    for w in tokens:
                        if actual != w.cost:
                            await self._adjust(w, actual - w.cost)
        except (_StorageDown, ServiceUnavailable):
            pass


class _StorageDown(Exception):
    """The storage failed and the limiter fails open."""


def _label(kind: str) -> str:
    return f"{kind} per minute"


def _judge(w: _Window, prev: int, prev_ttl: float, cur: int, cur_ttl: float) -> float | None:
    """Fill in the window's state as if `w.cost` were charged; seconds to wait if it can't."""
    expiry = w.expiry
    limit = w.item.amount
    weighted = math.floor(prev * prev_ttl / expiry) + cur
    shift = cur_ttl - expiry if cur_ttl > expiry else expiry  # until `cur` becomes previous
    if weighted + w.cost > limit:
        if cur + w.cost <= limit:
            wait = prev_ttl - (limit - w.cost - cur + 1) * expiry / prev
        else:
            wait = shift + expiry - (limit - w.cost + 1) * expiry / cur
        return max(wait, 0.0) + 0.001  # the inequality is strict
    w.remaining = limit - weighted - w.cost
    w.reset_s = shift + expiry
    return None


def _no_slot(subject: str, limit: int) -> RateLimited:
    return RateLimited(f"parallel requests limit of {limit} reached for {subject}", retry_after=1)


def _refusal(w: _Window, wait: float) -> RateLimited:
    if w.kind == "budget":
        period = w.item.GRANULARITY.name
        return RateLimited(
            f"token budget of {w.item.amount} per {period} used up for {w.subject}",
            code="insufficient_quota",
            retry_after=math.ceil(wait),
        )
    # OpenAI sends the x-ratelimit headers on the refusal too: here for the window that refused.
    headers = {
        f"x-ratelimit-limit-{w.kind}": str(w.item.amount),
        f"x-ratelimit-remaining-{w.kind}": str(max(0, w.remaining)),
        f"x-ratelimit-reset-{w.kind}": format_duration(wait),
    }
    return RateLimited(
        f"rate limit reached for {w.subject}: {w.item.amount} {_label(w.kind)}",
        retry_after=math.ceil(wait * 1000) / 1000,
        headers=headers,
    )


def _client(storage: RedisStorage) -> AsyncCoRedisClient:
    """The coredis client under limits' Redis storage (the `async-redis` extra's default)."""
    bridge = storage.bridge
    if not isinstance(bridge, CoredisBridge):
        raise TypeError(f"expected limits' coredis bridge, got {type(bridge).__name__}")
    return bridge.get_connection()


def _as_tuple(
    exc: type[BaseException] | tuple[type[BaseException], ...],
) -> tuple[type[BaseException], ...]:
    return exc if isinstance(exc, tuple) else (exc,)
