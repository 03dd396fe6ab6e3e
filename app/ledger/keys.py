"""API keys: the store over `api_keys`, the request path's in-memory cache, and signed tokens.

A key is `sk-clawbot-` plus 43 random URL-safe characters (256 bits). Only its SHA-256 and its
first 19 characters (the lookup prefix, also what admins see) are stored; the plaintext is
returned once, by `KeyStore.create` and `KeyStore.rotate`. Keys are random, so a plain hash is
enough: there is nothing to brute-force that a salt or a slow hash would protect.

Requests never read the database: `KeyCache` holds every key in memory and polls the rows whose
`updated_at` moved, so a change made by any replica sharing the database is seen everywhere
within one poll interval. `TokenSigner` issues short-lived bearer tokens checked with a shared
secret, again without a database round-trip.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AuthenticationFailed, InvalidRequest, NotFound
from app.ledger.storage.database import Database
from app.ledger.storage.schema import ApiKey

log = logging.getLogger("clawbot.keys")

KEY_PREFIX: Final = "sk-clawbot-"
TOKEN_PREFIX: Final = "tok-clawbot-"
LOOKUP_PREFIX_LENGTH: Final = len(KEY_PREFIX) + 8
BUDGET_PERIODS: Final = ("day", "month")
UPDATABLE: Final = frozenset(
    {
        "name",
        "owner",
        "metadata",
        "models",
        "requests_per_minute",
        "tokens_per_minute",
        "max_parallel",
        "budget_total_tokens",
        "budget_period_tokens",
        "budget_period",
        "expires_at",
    }
)
"""Fields `KeyStore.update` accepts; revocation, rotation and spend have their own paths."""

_MAX_TOKEN_LENGTH: Final = 1024


def new_key() -> str:
    """A fresh plaintext API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)[:43]


def hash_key(plaintext: str) -> str:
    """The SHA-256 hex digest stored for a key."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def _new_id() -> str:
    return "key_" + secrets.token_hex(6)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we write is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored, without its hash; datetimes are UTC."""

    id: str
    prefix: str
    name: str
    owner: str | None
    metadata: dict[str, Any] | None
    models: tuple[str, ...] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_parallel: int | None
    budget_total_tokens: int | None
    budget_period_tokens: int | None
    budget_period: str | None
    spent_tokens: int
    expires_at: datetime | None
    revoked: bool
    revoked_at: datetime | None
    rotated_to: str | None
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyRecord:
        """The record of an `api_keys` row."""
        return cls(
            id=row.id,
            prefix=row.prefix,
            name=row.name,
            owner=row.owner,
            metadata=dict(row.meta) if row.meta is not None else None,
            models=tuple(row.models) if row.models is not None else None,
            requests_per_minute=row.requests_per_minute,
            tokens_per_minute=row.tokens_per_minute,
            max_parallel=row.max_parallel,
            budget_total_tokens=row.budget_total_tokens,
            budget_period_tokens=row.budget_period_tokens,
            budget_period=row.budget_period,
            spent_tokens=row.spent_tokens or 0,
            expires_at=_utc_or_none(row.expires_at),
            revoked=bool(row.revoked),
            revoked_at=_utc_or_none(row.revoked_at),
            rotated_to=row.rotated_to,
            created_at=_utc(row.created_at),
            updated_at=_utc(row.updated_at),
            last_used_at=_utc_or_none(row.last_used_at),
        )

    def usable(self, now: datetime) -> str | None:
        """None when the key may be used at `now`, else why not ("revoked" or "expired")."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None

    def public(self) -> dict[str, Any]:
        """The record as JSON-able data for the admin API (ISO datetimes, never a hash)."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "owner": self.owner,
            "metadata": self.metadata,
            "models": list(self.models) if self.models is not None else None,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_parallel": self.max_parallel,
            "budget_total_tokens": self.budget_total_tokens,
            "budget_period_tokens": self.budget_period_tokens,
            "budget_period": self.budget_period,
            "spent_tokens": self.spent_tokens,
            "expires_at": _iso(self.expires_at),
            "revoked": self.revoked,
            "revoked_at": _iso(self.revoked_at),
            "rotated_to": self.rotated_to,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_used_at": _iso(self.last_used_at),
        }


def _check(field: str, value: Any) -> Any:
    """The value to store for an updatable field, or InvalidRequest naming it."""
    if field == "name":
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise InvalidRequest(
                "name must be a non-empty string of at most 200 characters", param=field
            )
        return value
    if field == "owner":
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise InvalidRequest("owner must be a string of at most 200 characters", param=field)
        return value
    if field == "metadata":
        if value is not None and not isinstance(value, dict):
            raise InvalidRequest("metadata must be an object", param=field)
        return None if value is None else dict(value)
    if field == "models":
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not all(isinstance(m, str) and m for m in value):
            raise InvalidRequest("models must be a list of model ids, or null for all", param=field)
        return list(value)
    if field == "budget_period":
        if value is not None and value not in BUDGET_PERIODS:
            raise InvalidRequest('budget_period must be "day" or "month"', param=field)
        return value
    if field == "expires_at":
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise InvalidRequest("expires_at must be a timezone-aware datetime", param=field)
        return _utc(value)
    if field in UPDATABLE:  # the integer limits
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise InvalidRequest(f"{field} must be a positive integer or null", param=field)
        return value
    raise InvalidRequest(f"unknown or read-only key field {field!r}", param=field)


def _check_budget(row: ApiKey) -> None:
    if row.budget_period_tokens is not None and row.budget_period is None:
        raise InvalidRequest("budget_period_tokens needs budget_period", param="budget_period")


def _set(row: ApiKey, field: str, value: Any) -> None:
    setattr(row, "meta" if field == "metadata" else field, value)


def _bump(row: ApiKey, now: datetime) -> None:
    # Strictly increasing per row even if the clock steps back: caches keep the newest version.
    previous = _utc(row.updated_at)
    row.updated_at = max(now, previous + timedelta(microseconds=1))


def _now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    """API keys in the database; the admin side (create, update, revoke, rotate) and polling."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        *,
        name: str,
        owner: str | None = None,
        metadata: dict[str, Any] | None = None,
        models: builtins.list[str] | tuple[str, ...] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_parallel: int | None = None,
        budget_total_tokens: int | None = None,
        budget_period_tokens: int | None = None,
        budget_period: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its plaintext, which is never available again."""
        settings = {
            "name": name,
            "owner": owner,
            "metadata": metadata,
            "models": models,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "max_parallel": max_parallel,
            "budget_total_tokens": budget_total_tokens,
            "budget_period_tokens": budget_period_tokens,
            "budget_period": budget_period,
            "expires_at": expires_at,
        }
        plaintext = new_key()
        row = self._new_row(plaintext, _now())
        for field, value in settings.items():
            _set(row, field, _check(field, value))
        _check_budget(row)
        async with self.db.session() as session, session.begin():
            session.add(row)
        return KeyRecord.from_row(row), plaintext

    async def list(self, include_revoked: bool = True) -> builtins.list[KeyRecord]:
        """Every key, oldest first."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked.is_(False))
        async with self.db.session() as session:
            rows = (await session.scalars(query)).all()
        return [KeyRecord.from_row(row) for row in rows]

    async def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id, if any."""
        async with self.db.session() as session:
            row = await session.get(ApiKey, key_id)
        return None if row is None else KeyRecord.from_row(row)

    async def find(self, plaintext: str) -> KeyRecord | None:
        """The key this plaintext is, by prefix then hash (admin tooling; requests use KeyCache)."""
        if not plaintext.startswith(KEY_PREFIX):
            return None
        digest = hash_key(plaintext)
        query = select(ApiKey).where(ApiKey.prefix == plaintext[:LOOKUP_PREFIX_LENGTH])
        async with self.db.session() as session:
            rows = (await session.scalars(query)).all()
        for row in rows:
            if hmac.compare_digest(row.key_hash, digest):
                return KeyRecord.from_row(row)
        return None

    async def update(self, key_id: str, **changes: Any) -> KeyRecord:
        """Change some of the `UPDATABLE` fields; NotFound or InvalidRequest otherwise."""
        async with self.db.session() as session, session.begin():
            row = await self._row(session, key_id)
            checked = {field: _check(field, value) for field, value in changes.items()}
            if checked:
                for field, value in checked.items():
                    _set(row, field, value)
                _check_budget(row)
                _bump(row, _now())
        return KeyRecord.from_row(row)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke the key now (idempotent)."""
        async with self.db.session() as session, session.begin():
            row = await self._row(session, key_id)
            if not row.revoked:
                now = _now()
                row.revoked = True
                row.revoked_at = now
                _bump(row, now)
        return KeyRecord.from_row(row)

    async def rotate(self, key_id: str, grace_s: int) -> tuple[KeyRecord, str]:
        """A new key with the old one's settings (and spend); the old one ends after `grace_s`.

        The old key gets `rotated_to` and `expires_at = min(its expiry, now + grace_s)`; a grace
        of 0 revokes it at once. The new key keeps the old expiry: rotation replaces the
        secret, it does not extend the key's life or reset its budget.
        """
        if isinstance(grace_s, bool) or not isinstance(grace_s, int) or grace_s < 0:
            raise InvalidRequest("grace must be a non-negative number of seconds", param="grace_s")
        now = _now()
        plaintext = new_key()
        async with self.db.session() as session, session.begin():
            old = await self._row(session, key_id)
            reason = KeyRecord.from_row(old).usable(now)
            if reason is not None:
                raise InvalidRequest(f"cannot rotate a key that is {reason}", param="key_id")
            new = self._new_row(plaintext, now)
            for field in UPDATABLE:
                attribute = "meta" if field == "metadata" else field
                setattr(new, attribute, getattr(old, attribute))
            new.spent_tokens = old.spent_tokens or 0
            session.add(new)
            old.rotated_to = new.id
            if grace_s == 0:
                old.revoked = True
                old.revoked_at = now
            else:
                ends = now + timedelta(seconds=grace_s)
                current = _utc_or_none(old.expires_at)
                old.expires_at = ends if current is None else min(current, ends)
            _bump(old, now)
        return KeyRecord.from_row(new), plaintext

    async def changed_since(self, ts: datetime | None) -> builtins.list[KeyRecord]:
        """Keys (revoked included) with `updated_at >= ts`; every key when `ts` is None."""
        return [record for _, record in await self.changed_since_with_hashes(ts)]

    async def changed_since_with_hashes(
        self, ts: datetime | None
    ) -> builtins.list[tuple[str, KeyRecord]]:
        """Like `changed_since`, paired with each key's hash (for `KeyCache` only)."""
        query = select(ApiKey).order_by(ApiKey.updated_at)
        if ts is not None:
            query = query.where(ApiKey.updated_at >= _utc(ts))
        async with self.db.session() as session:
            rows = (await session.scalars(query)).all()
        return [(row.key_hash, KeyRecord.from_row(row)) for row in rows]

    async def latest_change(self) -> datetime | None:
        """The newest `updated_at` of any key; None without keys."""
        async with self.db.session() as session:
            latest = await session.scalar(select(func.max(ApiKey.updated_at)))
        return _utc_or_none(latest)

    @staticmethod
    def _new_row(plaintext: str, now: datetime) -> ApiKey:
        return ApiKey(
            id=_new_id(),
            prefix=plaintext[:LOOKUP_PREFIX_LENGTH],
            key_hash=hash_key(plaintext),
            spent_tokens=0,
            revoked=False,
            created_at=now,
            updated_at=now,
        )

    @staticmethod
    async def _row(session: AsyncSession, key_id: str) -> ApiKey:
        row = await session.get(ApiKey, key_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}", param="key_id")
        return row


class KeyCache:
    """Every key in memory for the request path, kept fresh by polling `updated_at`.

    `lookup` and `by_id` never touch the database. After `start`, a background task asks the
    store every `poll_interval_s` for rows with `updated_at >= last seen - overlap_s`, so a change
    made by any replica sharing the database (PostgreSQL) reaches this one within one poll
    interval (plus the query's time): that is the bound on staleness, revocation included.
    Re-reading with `>=` and an overlap is idempotent and catches rows that share a timestamp
    with the last one seen, that committed late, or that a replica with a slightly slow clock
    stamped. `apply` makes this replica's own admin changes visible at once. A failed poll is
    logged (at most once per `log_interval_s`) and retried; the cache keeps serving what it has.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        poll_interval_s: float = 5.0,
        overlap_s: float = 2.0,
        log_interval_s: float = 60.0,
    ) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.overlap_s = overlap_s
        self.log_interval_s = log_interval_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._hash_of: dict[str, str] = {}
        self._cursor: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._last_failure_log = -math.inf

    async def start(self) -> None:
        """Load every key (errors propagate), then start polling."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="clawbot-key-cache")

    async def refresh(self) -> int:
        """Read the rows changed since the last poll; returns how many were read."""
        since = None if self._cursor is None else self._cursor - timedelta(seconds=self.overlap_s)
        entries = await self.store.changed_since_with_hashes(since)
        for key_hash, record in entries:
            self._put(key_hash, record)
            if self._cursor is None or record.updated_at > self._cursor:
                self._cursor = record.updated_at
        return len(entries)

    def lookup(self, plaintext: str) -> KeyRecord | None:
        """The key this plaintext is, revoked or expired ones included (check `usable`)."""
        if not plaintext.startswith(KEY_PREFIX):
            return None
        return self._by_hash.get(hash_key(plaintext))

    def by_id(self, key_id: str) -> KeyRecord | None:
        """The cached key with this id."""
        return self._by_id.get(key_id)

    def apply(self, record: KeyRecord, plaintext: str | None = None) -> None:
        """Take an admin change made on this replica now; pass the plaintext of a new key."""
        key_hash = hash_key(plaintext) if plaintext is not None else self._hash_of.get(record.id)
        if key_hash is None:
            # Unknown key without its plaintext: by id now, by plaintext after the next poll.
            current = self._by_id.get(record.id)
            if current is None or record.updated_at >= current.updated_at:
                self._by_id[record.id] = record
            return
        self._put(key_hash, record)

    def __len__(self) -> int:
        return len(self._by_id)

    async def aclose(self) -> None:
        """Stop polling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _put(self, key_hash: str, record: KeyRecord) -> None:
        current = self._by_id.get(record.id)
        if current is not None and record.updated_at < current.updated_at:
            return  # an older version than one already applied
        self._by_id[record.id] = record
        self._by_hash[key_hash] = record
        self._hash_of[record.id] = key_hash

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                self._failed()
            else:
                if self._failures:
                    log.info("key cache poll recovered after %d failures", self._failures)
                    self._failures = 0

    def _failed(self) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_failure_log >= self.log_interval_s:
            self._last_failure_log = now
            log.warning(
                "key cache poll failed (%d in a row); serving cached keys, retrying every %gs",
                self._failures,
                self.poll_interval_s,
                exc_info=True,
            )


class _Claims(msgspec.Struct):
    k: str
    e: int


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Short-lived bearer tokens `tok-clawbot-<payload>.<sig>` signed with HMAC-SHA256.

    Stateless on purpose: verifying needs no database round-trip, and every replica verifies
    any replica's tokens with the shared secret. A token names its key, so the caller follows
    `verify` with a `KeyCache` check: revoking or expiring the key stops its tokens as well,
    within the cache's poll interval on other replicas. A token never outlives its key's expiry.
    """

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if not secret:
            raise ValueError("token secret must not be empty")
        if ttl_s <= 0:
            raise ValueError("token ttl must be positive")
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, key: KeyRecord, now: datetime) -> tuple[str, int]:
        """A token for `key` and its expiry (unix seconds), capped at the key's own expiry."""
        reason = key.usable(now)
        if reason is not None:
            raise AuthenticationFailed(f"API key {reason}")
        expires = int(now.timestamp()) + self.ttl_s
        if key.expires_at is not None:
            expires = min(expires, math.floor(key.expires_at.timestamp()))
        if expires <= now.timestamp():
            raise AuthenticationFailed("API key expired")
        payload = _b64encode(msgspec.json.encode(_Claims(k=key.id, e=expires)))
        return f"{TOKEN_PREFIX}{payload}.{self._sign(payload)}", expires

    def verify(self, token: str, now: datetime) -> str:
        """The key id a valid, unexpired token names; AuthenticationFailed otherwise."""
        if (
            len(token) > _MAX_TOKEN_LENGTH
            or not token.isascii()
            or not token.startswith(TOKEN_PREFIX)
        ):
            raise AuthenticationFailed("invalid token")
        payload, dot, signature = token[len(TOKEN_PREFIX) :].partition(".")
        if not dot or not hmac.compare_digest(self._sign(payload).encode(), signature.encode()):
            raise AuthenticationFailed("invalid token")
        try:
            claims = msgspec.json.decode(_b64decode(payload), type=_Claims)
        except (ValueError, msgspec.DecodeError) as exc:
            raise AuthenticationFailed("invalid token") from exc
        if now.timestamp() >= claims.e:
            raise AuthenticationFailed("token expired")
        return claims.k

    def _sign(self, payload: str) -> str:
        return _b64encode(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())


def token_secret(master_key: str | None, explicit: str | None) -> bytes:
    """The token signing secret: `explicit`, else derived from the master key, else random."""
    if explicit:
        return explicit.encode()
    if master_key:
        return hmac.new(master_key.encode(), b"clawbot-token-v1", hashlib.sha256).digest()
    log.warning(
        "no token secret and no master key: using a random one; tokens only work on this process"
    )
    return secrets.token_bytes(32)
