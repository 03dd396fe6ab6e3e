"""API keys: the store on SQLite and PostgreSQL, the polling cache, and signed tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text, update

from app.errors import AuthenticationFailed, InvalidRequest, NotFound
from app.ledger.keys import (
    KEY_PREFIX,
    KeyCache,
    KeyRecord,
    KeyStore,
    TokenSigner,
    hash_key,
    token_secret,
)
from app.ledger.storage.database import Database
from app.ledger.storage.schema import ApiKey

FAST = 0.05


@pytest.fixture
async def other_db(db: Database, database_url: str) -> AsyncIterator[Database]:
    """A second engine on the same database: another replica."""
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.aclose()


@pytest.fixture
def store(db: Database) -> KeyStore:
    """The store under test."""
    return KeyStore(db)


def now() -> datetime:
    return datetime.now(UTC)


async def eventually(check: Callable[[], bool], within: float = 5.0) -> float:
    """Wait until `check()` holds; returns how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > within:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.005)
    return loop.time() - start


async def test_create_returns_the_plaintext_once_and_stores_only_its_hash(
    store: KeyStore, db: Database
) -> None:
    record, plaintext = await store.create(
        name="ci", owner="ops", metadata={"team": "ml"}, models=["mock"], requests_per_minute=60
    )
    assert plaintext.startswith(KEY_PREFIX)
    assert len(plaintext) == len(KEY_PREFIX) + 43
    assert record.id.startswith("key_")
    assert len(record.id) == 16
    int(record.id[4:], 16)
    assert record.prefix == plaintext[:19]
    assert record.models == ("mock",)
    assert record.metadata == {"team": "ml"}
    assert record.created_at.tzinfo is not None
    assert record.updated_at == record.created_at
    assert not hasattr(record, "key_hash")
    assert "hash" not in record.public()

    async with db.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys"))).mappings().all()
    assert len(rows) == 1
    row = dict(rows[0])
    secret_part = plaintext[len(KEY_PREFIX) :]
    for column, value in row.items():
        assert plaintext not in str(value), column
        assert secret_part not in str(value), column
    assert row["key_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()
    assert row["prefix"] == plaintext[:19]

    again = await store.get(record.id)
    assert again == record


async def test_find_by_prefix_and_hash(store: KeyStore) -> None:
    record, plaintext = await store.create(name="a")
    await store.create(name="b")
    assert await store.find(plaintext) == record
    # Same lookup prefix, different key: the hash decides.
    assert await store.find(plaintext[:19] + "x" * 35) is None
    assert await store.find("sk-other-" + plaintext) is None


async def test_list_get_and_update(store: KeyStore) -> None:
    first, _ = await store.create(name="first")
    second, _ = await store.create(name="second", budget_period_tokens=1000, budget_period="day")
    assert [k.id for k in await store.list()] == [first.id, second.id]
    assert await store.get("key_000000000000") is None

    expires = now() + timedelta(days=1)
    updated = await store.update(
        first.id, name="renamed", models=["a", "b"], tokens_per_minute=5000, expires_at=expires
    )
    assert updated.name == "renamed"
    assert updated.models == ("a", "b")
    assert updated.tokens_per_minute == 5000
    assert updated.expires_at == expires
    assert updated.updated_at > first.updated_at
    assert updated.created_at == first.created_at
    assert await store.get(first.id) == updated

    back = await store.update(first.id, models=None)
    assert back.models is None
    assert back.updated_at > updated.updated_at

    public = back.public()
    json.dumps(public)
    assert public["expires_at"] == expires.isoformat()
    assert public["id"] == first.id


@pytest.mark.parametrize(
    "changes",
    [
        {"key_hash": "0" * 64},
        {"revoked": False},
        {"spent_tokens": 0},
        {"nonsense": 1},
        {"requests_per_minute": 0},
        {"requests_per_minute": True},
        {"budget_period": "week"},
        {"budget_period_tokens": 10},
        {"models": "gpt"},
        {"models": 5},
        {"name": ""},
        {"expires_at": datetime(2030, 1, 1)},  # naive
    ],
)
async def test_update_rejects_bad_and_read_only_fields(
    store: KeyStore, changes: dict[str, Any]
) -> None:
    record, _ = await store.create(name="k")
    with pytest.raises(InvalidRequest):
        await store.update(record.id, **changes)
    assert await store.get(record.id) == record


async def test_missing_keys_are_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        await store.update("key_000000000000", name="x")
    with pytest.raises(NotFound):
        await store.revoke("key_000000000000")
    with pytest.raises(NotFound):
        await store.rotate("key_000000000000", 60)


async def test_revoke(store: KeyStore) -> None:
    record, _ = await store.create(name="k")
    assert record.usable(now()) is None
    revoked = await store.revoke(record.id)
    assert revoked.revoked
    assert revoked.revoked_at is not None
    assert revoked.usable(now()) == "revoked"
    assert revoked.updated_at > record.updated_at
    assert await store.revoke(record.id) == revoked  # idempotent
    assert [k.id for k in await store.list(include_revoked=False)] == []
    assert [k.id for k in await store.list()] == [record.id]


async def test_expiry(store: KeyStore) -> None:
    expires = now() + timedelta(hours=1)
    record, _ = await store.create(name="k", expires_at=expires)
    assert record.usable(expires - timedelta(seconds=1)) is None
    assert record.usable(expires) == "expired"
    assert record.usable(expires + timedelta(days=1)) == "expired"


async def test_rotate_with_grace(store: KeyStore) -> None:
    old, old_plain = await store.create(
        name="svc", models=["mock"], max_parallel=4, budget_total_tokens=10_000
    )
    before = now()
    new, new_plain = await store.rotate(old.id, grace_s=60)
    after = now()
    assert new_plain != old_plain
    assert new.id != old.id
    assert (new.name, new.models, new.max_parallel, new.budget_total_tokens) == (
        "svc",
        ("mock",),
        4,
        10_000,
    )
    assert new.usable(now()) is None
    rotated = await store.get(old.id)
    assert rotated is not None
    assert rotated.rotated_to == new.id
    assert rotated.expires_at is not None
    assert before + timedelta(seconds=60) <= rotated.expires_at <= after + timedelta(seconds=60)
    assert rotated.usable(now()) is None
    assert rotated.usable(after + timedelta(seconds=61)) == "expired"
    assert new.usable(after + timedelta(seconds=61)) is None
    assert await store.find(new_plain) == new


async def test_rotate_keeps_an_earlier_expiry(store: KeyStore) -> None:
    soon = now() + timedelta(seconds=30)
    old, _ = await store.create(name="k", expires_at=soon)
    new, _ = await store.rotate(old.id, grace_s=3600)
    rotated = await store.get(old.id)
    assert rotated is not None
    assert rotated.expires_at == soon
    assert new.expires_at == soon


async def test_rotate_with_no_grace_revokes_now(store: KeyStore) -> None:
    old, _ = await store.create(name="k")
    new, _ = await store.rotate(old.id, grace_s=0)
    rotated = await store.get(old.id)
    assert rotated is not None
    assert rotated.usable(now()) == "revoked"
    assert rotated.rotated_to == new.id
    assert new.usable(now()) is None
    with pytest.raises(InvalidRequest):
        await store.rotate(old.id, grace_s=10)
    with pytest.raises(InvalidRequest):
        await store.rotate(new.id, grace_s=-1)


async def test_changed_since_and_latest_change(store: KeyStore) -> None:
    assert await store.latest_change() is None
    assert await store.changed_since(None) == []
    a, _ = await store.create(name="a")
    b, _ = await store.create(name="b")
    assert {k.id for k in await store.changed_since(None)} == {a.id, b.id}
    revoked = await store.revoke(a.id)
    assert await store.latest_change() == revoked.updated_at
    since = await store.changed_since(revoked.updated_at)
    assert since == [revoked]  # >=: the row at the cursor itself, revoked included
    later = revoked.updated_at + timedelta(hours=1)
    assert await store.changed_since(later) == []


async def test_cache_lookups_never_touch_the_database(
    store: KeyStore, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, plaintext = await store.create(name="k")
    revoked, revoked_plain = await store.create(name="gone")
    revoked = await store.revoke(revoked.id)
    cache = KeyCache(store, poll_interval_s=3600)
    await cache.start()
    try:

        def no_database() -> Any:
            raise AssertionError("the request path touched the database")

        monkeypatch.setattr(db, "session", no_database)
        await db.aclose()
        assert cache.lookup(plaintext) == record
        assert cache.lookup(revoked_plain) == revoked  # returned, `usable` says why not
        assert cache.lookup(plaintext + "x") is None
        assert cache.lookup("not-a-key") is None
        assert cache.by_id(record.id) == record
        assert len(cache) == 2
    finally:
        await cache.aclose()


async def test_cache_polls_changes_made_by_another_replica(
    store: KeyStore, other_db: Database
) -> None:
    elsewhere = KeyStore(other_db)
    cache = KeyCache(store, poll_interval_s=FAST)
    await cache.start()
    try:
        assert len(cache) == 0
        record, plaintext = await elsewhere.create(name="remote")
        await eventually(lambda: cache.lookup(plaintext) is not None)
        assert cache.lookup(plaintext) == record

        new, new_plain = await elsewhere.rotate(record.id, grace_s=0)
        waited = await eventually(lambda: cache.lookup(new_plain) is not None)
        assert waited < 2.0
        old = cache.lookup(plaintext)
        assert old is not None
        assert old.usable(now()) == "revoked"
        assert old.rotated_to == new.id

        await elsewhere.revoke(new.id)
        await eventually(lambda: (cache.lookup(new_plain) or new).revoked)
        found = cache.by_id(new.id)
        assert found is not None
        assert found.usable(now()) == "revoked"
    finally:
        await cache.aclose()


async def test_cache_rereads_rows_sharing_the_last_timestamp(
    store: KeyStore, db: Database, other_db: Database
) -> None:
    first, _ = await store.create(name="first")
    cache = KeyCache(store, poll_interval_s=3600, overlap_s=0)
    await cache.start()
    try:
        second, plaintext = await KeyStore(other_db).create(name="second")
        # Another replica's clock stamped the same microsecond as the row already seen.
        async with db.session() as session, session.begin():
            await session.execute(
                update(ApiKey).where(ApiKey.id == second.id).values(updated_at=first.updated_at)
            )
        assert await cache.refresh() == 2
        found = cache.lookup(plaintext)
        assert found is not None
        assert found.id == second.id
        assert await cache.refresh() == 2  # idempotent
        assert cache.lookup(plaintext) == found
    finally:
        await cache.aclose()


async def test_cache_overlap_catches_a_slow_replica_clock(
    store: KeyStore, db: Database, other_db: Database
) -> None:
    first, _ = await store.create(name="first")
    cache = KeyCache(store, poll_interval_s=3600, overlap_s=2.0)
    await cache.start()
    try:
        second, plaintext = await KeyStore(other_db).create(name="late")
        async with db.session() as session, session.begin():
            await session.execute(
                update(ApiKey)
                .where(ApiKey.id == second.id)
                .values(updated_at=first.updated_at - timedelta(seconds=1))
            )
        await cache.refresh()
        assert cache.lookup(plaintext) is not None
    finally:
        await cache.aclose()


async def test_apply_makes_local_changes_visible_at_once(store: KeyStore) -> None:
    cache = KeyCache(store, poll_interval_s=3600)
    await cache.start()
    try:
        record, plaintext = await store.create(name="k")
        assert cache.lookup(plaintext) is None
        cache.apply(record, plaintext)
        assert cache.lookup(plaintext) == record

        revoked = await store.revoke(record.id)
        cache.apply(revoked)
        assert cache.lookup(plaintext) == revoked
        cache.apply(record)  # an older version never replaces a newer one
        assert cache.lookup(plaintext) == revoked

        other, other_plain = await store.create(name="no plaintext given")
        cache.apply(other)
        assert cache.by_id(other.id) == other
        assert cache.lookup(other_plain) is None
        await cache.refresh()
        assert cache.lookup(other_plain) == other
    finally:
        await cache.aclose()


async def test_poll_failures_are_logged_rate_limited_and_retried(
    store: KeyStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = KeyCache(store, poll_interval_s=0.01, log_interval_s=3600)
    await cache.start()
    real = store.changed_since_with_hashes
    calls = 0

    async def broken(ts: datetime | None) -> Any:
        nonlocal calls
        calls += 1
        raise OSError("database down")

    try:
        with caplog.at_level(logging.INFO, logger="clawbot.keys"):
            monkeypatch.setattr(store, "changed_since_with_hashes", broken)
            await eventually(lambda: calls >= 5)
            failures = [r for r in caplog.records if "poll failed" in r.getMessage()]
            assert len(failures) == 1
            assert failures[0].exc_info is not None

            monkeypatch.setattr(store, "changed_since_with_hashes", real)
            record, plaintext = await store.create(name="after the outage")
            await eventually(lambda: cache.lookup(plaintext) is not None)
            assert cache.lookup(plaintext) == record
            assert any("recovered" in r.getMessage() for r in caplog.records)
    finally:
        await cache.aclose()


async def test_start_fails_when_the_database_does_not_answer() -> None:
    db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    cache = KeyCache(KeyStore(db))
    try:
        with pytest.raises(OSError, match="Connect call failed"):
            await cache.start()
    finally:
        await cache.aclose()
        await db.aclose()


def key_record(**overrides: Any) -> KeyRecord:
    created = datetime(2030, 1, 1, tzinfo=UTC)
    fields: dict[str, Any] = {
        "id": "key_0123456789ab",
        "prefix": "sk-clawbot-abcdefgh",
        "name": "k",
        "owner": None,
        "metadata": None,
        "models": None,
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "max_parallel": None,
        "budget_total_tokens": None,
        "budget_period_tokens": None,
        "budget_period": None,
        "spent_tokens": 0,
        "expires_at": None,
        "revoked": False,
        "revoked_at": None,
        "rotated_to": None,
        "created_at": created,
        "updated_at": created,
        "last_used_at": None,
    }
    fields.update(overrides)
    return KeyRecord(**fields)


T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


def test_token_round_trip() -> None:
    signer = TokenSigner(b"s" * 32, ttl_s=300)
    key = key_record()
    token, expires = signer.issue(key, T0)
    assert token.startswith("tok-clawbot-")
    assert expires == int(T0.timestamp()) + 300
    assert signer.verify(token, T0) == key.id
    assert signer.verify(token, T0 + timedelta(seconds=299)) == key.id
    payload = token.removeprefix("tok-clawbot-").split(".")[0]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims == {"k": key.id, "e": expires}


def test_token_expires() -> None:
    signer = TokenSigner(b"s" * 32, ttl_s=300)
    token, _ = signer.issue(key_record(), T0)
    with pytest.raises(AuthenticationFailed, match="token expired"):
        signer.verify(token, T0 + timedelta(seconds=300))


def test_token_is_capped_at_the_key_expiry() -> None:
    signer = TokenSigner(b"s" * 32, ttl_s=3600)
    key = key_record(expires_at=T0 + timedelta(seconds=90))
    token, expires = signer.issue(key, T0)
    assert expires == int(T0.timestamp()) + 90
    assert signer.verify(token, T0 + timedelta(seconds=89)) == key.id
    with pytest.raises(AuthenticationFailed, match="token expired"):
        signer.verify(token, T0 + timedelta(seconds=90))


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (key_record(revoked=True), "revoked"),
        (key_record(expires_at=T0), "expired"),
        (key_record(expires_at=T0 + timedelta(milliseconds=500)), "expired"),
    ],
)
def test_no_token_for_an_unusable_key(key: KeyRecord, reason: str) -> None:
    with pytest.raises(AuthenticationFailed, match=reason):
        TokenSigner(b"s" * 32, ttl_s=60).issue(key, T0)


def _forge(payload: dict[str, Any], secret: bytes) -> str:
    encoded = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    sig = hmac.new(secret, encoded.encode(), hashlib.sha256).digest()
    return f"tok-clawbot-{encoded}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def tampered_tokens(token: str) -> list[str]:
    body = token.removeprefix("tok-clawbot-")
    payload, sig = body.split(".")
    other_payload = (
        base64.urlsafe_b64encode(json.dumps({"k": "key_ffffffffffff", "e": 4_000_000_000}).encode())
        .rstrip(b"=")
        .decode()
    )
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    return [
        f"tok-clawbot-{other_payload}.{sig}",
        f"tok-clawbot-{payload}.{flipped}",
        f"tok-clawbot-{payload}",
        f"tok-clawbot-{payload}.",
        f"tok-clawbot-.{sig}",
        f"sk-clawbot-{body}",
        f"tok-clawbot-{payload}.{sig}x",
        f"tok-clawbot-{payload}.{sig}é",
        "",
        "tok-clawbot-" + "a" * 5000,
    ]


def test_tampered_tokens_are_rejected() -> None:
    signer = TokenSigner(b"s" * 32, ttl_s=300)
    token, _ = signer.issue(key_record(), T0)
    for bad in tampered_tokens(token):
        with pytest.raises(AuthenticationFailed, match="invalid token"):
            signer.verify(bad, T0)


@pytest.mark.parametrize(
    "claims",
    [{"k": "key_x"}, {"k": 1, "e": 4_000_000_000}, {"k": "key_x", "e": "soon"}, ["key_x", 1]],
)
def test_correctly_signed_garbage_is_rejected(claims: Any) -> None:
    secret = b"s" * 32
    with pytest.raises(AuthenticationFailed, match="invalid token"):
        TokenSigner(secret, ttl_s=300).verify(_forge(claims, secret), T0)


def test_tokens_from_another_secret_do_not_verify() -> None:
    token, _ = TokenSigner(b"a" * 32, ttl_s=300).issue(key_record(), T0)
    with pytest.raises(AuthenticationFailed, match="invalid token"):
        TokenSigner(b"b" * 32, ttl_s=300).verify(token, T0)


def test_token_secret(caplog: pytest.LogCaptureFixture) -> None:
    assert token_secret("sk-master", "explicit-secret") == b"explicit-secret"
    derived = token_secret("sk-master", None)
    assert derived == hmac.new(b"sk-master", b"clawbot-token-v1", hashlib.sha256).digest()
    assert token_secret("sk-master", None) == derived  # same on every replica
    assert token_secret("sk-other", None) != derived
    assert derived != b"sk-master"
    with caplog.at_level(logging.WARNING, logger="clawbot.keys"):
        first = token_secret("", None)
    assert len(first) == 32
    assert token_secret("", None) != first
    assert any("only work on this process" in r.getMessage() for r in caplog.records)


def test_signer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="secret"):
        TokenSigner(b"", ttl_s=60)
    with pytest.raises(ValueError, match="ttl"):
        TokenSigner(b"s", ttl_s=0)


def test_hash_key_matches_the_stored_form() -> None:
    assert hash_key("sk-clawbot-x") == hashlib.sha256(b"sk-clawbot-x").hexdigest()
