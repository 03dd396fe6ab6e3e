"""Real processes: graceful shutdown under load, replicas sharing PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coredis
import httpx
import pytest

from tests.services import require_redis
from tests.serving import Server, serve

MASTER_KEY = "sk-replicas-master-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
CHAT_ROUTE = "/v1/chat/completions"
REDIS_DB = 12
DOWN_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def mock_model(token_delay_ms: float = 0) -> dict[str, Any]:
    return {"id": "m", "backend": "mock:", "options": {"token_delay_ms": token_delay_ms}}


def chat(text: str = "hello", *, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def new_key(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/admin/keys", json={"name": "k", **fields}, headers=AUTH)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def poll(
    attempt: Callable[[], Awaitable[httpx.Response]],
    done: Callable[[httpx.Response], bool],
    *,
    within_s: float,
    every_s: float = 0.05,
) -> list[httpx.Response]:
    """Call `attempt` until `done` holds for its answer; every answer, the last one done."""
    deadline = time.monotonic() + within_s
    answers: list[httpx.Response] = []
    while True:
        answers.append(await attempt())
        if done(answers[-1]):
            return answers
        if time.monotonic() > deadline:
            last = answers[-1]
            pytest.fail(f"not done within {within_s} s; last answer {last.status_code} {last.text}")
        await asyncio.sleep(every_s)


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """Redis database 12, flushed before and after (rate-limit keys have a fixed prefix)."""
    require_redis()
    client = coredis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    await client.flushdb()
    try:
        yield f"redis://127.0.0.1:6379/{REDIS_DB}"
    finally:
        await client.flushdb()
        client.connection_pool.disconnect()


# ---- graceful shutdown under load


@dataclass
class Outcome:
    """One load request: answered (a whole response), cut (headers, then no end) or refused."""

    kind: str
    request_id: str | None = None
    status: int | None = None
    stream: bool = False
    ended_at: float = 0.0


async def one_request(client: httpx.AsyncClient, i: int) -> Outcome:
    stream = i % 2 == 1
    body = chat(f"request number {i}", stream=stream)
    try:
        async with client.stream("POST", CHAT_ROUTE, json=body, headers=AUTH) as r:
            rid, status = r.headers["x-request-id"], r.status_code
            try:
                text = (await r.aread()).decode()
            except httpx.TransportError:
                return Outcome("cut", rid, status, stream, time.monotonic())
    except httpx.TransportError:
        return Outcome("refused", stream=stream, ended_at=time.monotonic())
    assert status == 200, text
    if stream:
        complete = text.rstrip().endswith("data: [DONE]")
    else:
        complete = (
            json.loads(text)["choices"][0]["message"]["content"]
            == f"You said: {body['messages'][0]['content']}"
        )
    return Outcome("answered" if complete else "cut", rid, status, stream, time.monotonic())


def audit_rows(db_path: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute(
            "SELECT request_id, status FROM audit_log WHERE route = ?", (CHAT_ROUTE,)
        ).fetchall()
    return [(str(rid), int(status)) for rid, status in rows]


@pytest.mark.slow
async def test_sigterm_mid_load_keeps_one_audit_row_per_answered_request(tmp_path: Path) -> None:
    total, concurrency, cut_after = 300, 20, 100
    db_path = tmp_path / "audit.db"
    config = {
        "auth": {"api_key": MASTER_KEY},
        "database": {"url": f"sqlite+aiosqlite:///{db_path}"},
        "audit": {"enabled": True},
        "models": [mock_model(token_delay_ms=5)],
    }
    with serve(config, tmp_path) as server:
        outcomes: list[Outcome] = []
        pending = iter(range(total))
        sigterm_at: list[float] = []

        async def worker(client: httpx.AsyncClient) -> None:
            for i in pending:
                outcome = await one_request(client, i)
                outcomes.append(outcome)
                answered = sum(o.kind == "answered" for o in outcomes)
                if answered >= cut_after and not sigterm_at:
                    sigterm_at.append(time.monotonic())
                    server.process.send_signal(signal.SIGTERM)

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.root, timeout=30, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        returncode = await asyncio.to_thread(server.process.wait, 35)

    assert returncode in (0, -signal.SIGTERM), server.log()[-3000:]
    assert sigterm_at, "the load ended before SIGTERM was sent"
    assert len(outcomes) == total
    answered = [o for o in outcomes if o.kind == "answered"]
    refused = [o for o in outcomes if o.kind == "refused"]
    cut = [o for o in outcomes if o.kind == "cut"]
    # uvicorn finishes in-flight requests (streams included) before it stops.
    assert not cut, f"{len(cut)} responses were cut: {cut[:3]}"
    assert refused, "no request was refused: SIGTERM did not cut the load"
    assert all(o.ended_at >= sigterm_at[0] for o in refused), "refused before SIGTERM"
    assert len(answered) >= cut_after
    assert any(o.stream for o in answered)
    assert any(not o.stream for o in answered)

    rows = audit_rows(db_path)
    ids = [rid for rid, _ in rows]
    assert len(ids) == len(set(ids)), "duplicate audit rows"
    expected = {o.request_id: o.status for o in answered}
    assert len(expected) == len(answered), "x-request-id repeated across answers"
    missing = expected.keys() - set(ids)
    extra = set(ids) - expected.keys()
    assert not missing, f"{len(missing)} answered requests have no audit row"
    assert not extra, f"{len(extra)} audit rows belong to no answered request"
    assert dict(rows) == expected


# ---- replicas sharing PostgreSQL (keys) and Redis (rate limits)


@pytest.mark.slow
async def test_two_replicas_share_rate_limits_and_keys(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    limit = 10
    config = {
        "auth": {"api_key": MASTER_KEY, "key_cache_poll_s": 0.2},
        "database": {"url": postgres_url},
        "rate_limits": {"storage": redis_url},
        "models": [mock_model()],
    }
    # One after the other: the first migrates the empty database.
    with serve(config, tmp_path / "a") as a, serve(config, tmp_path / "b") as b:
        async with (
            httpx.AsyncClient(base_url=a.root, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.root, timeout=10) as on_b,
        ):
            # Warm both replicas' Redis pools with another key first: the limiter gives each
            # call 0.25 s, and a timeout on a cold connection fails open, uncounted.
            warm = bearer((await new_key(on_a, requests_per_minute=10_000))["key"])
            await poll(
                lambda: on_b.post(CHAT_ROUTE, json=chat(), headers=warm),
                lambda r: r.status_code != 401,
                within_s=5,
            )
            await asyncio.gather(
                *(c.post(CHAT_ROUTE, json=chat(), headers=warm) for c in (on_a, on_b) * 15)
            )

            created = await new_key(on_a, requests_per_minute=limit)
            key = bearer(created["key"])
            # B learns of the key from the database within its poll interval.
            probes = await poll(
                lambda: on_b.post(CHAT_ROUTE, json=chat(), headers=key),
                lambda r: r.status_code != 401,
                within_s=5,
            )
            assert probes[-1].status_code == 200, probes[-1].text

            burst = await asyncio.gather(
                *(
                    (on_a if i % 2 == 0 else on_b).post(CHAT_ROUTE, json=chat(), headers=key)
                    for i in range(30)
                )
            )
            assert {r.status_code for r in burst} <= {200, 429}, [r.text for r in burst]
            admitted = [r for r in (*probes, *burst) if r.status_code == 200]
            uncounted = [r for r in admitted if "x-ratelimit-limit-requests" not in r.headers]
            assert not uncounted, "admitted without counting: rate-limit storage timed out"
            assert len(admitted) == limit, [r.status_code for r in burst]
            for r in burst:
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert int(r.headers["retry-after"]) >= 1

            r = await on_a.post(f"/admin/keys/{created['id']}/revoke", headers=AUTH)
            assert r.status_code == 200, r.text
            r = await on_a.post(CHAT_ROUTE, json=chat(), headers=key)
            assert r.status_code == 401  # at once on the replica that revoked it
            await poll(
                lambda: on_b.post(CHAT_ROUTE, json=chat(), headers=key),
                lambda r: r.status_code == 401,
                within_s=1,
            )
    for server in (a, b):
        assert server.process.returncode in (0, -signal.SIGTERM), server.log()[-3000:]


async def check_storage_down(server: Server, mode: str) -> None:
    async with httpx.AsyncClient(base_url=server.root, timeout=10) as client:
        key = bearer((await new_key(client, requests_per_minute=3))["key"])
        for _ in range(5):  # more than the limit: an open limiter counts nothing
            started = time.monotonic()
            r = await client.post(CHAT_ROUTE, json=chat(), headers=key)
            elapsed = time.monotonic() - started
            assert elapsed < 2, f"{mode}: answered in {elapsed:.2f} s"
            if mode == "open":
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "rate_limit_storage_unavailable"
                assert int(r.headers["retry-after"]) >= 1


@pytest.mark.slow
async def test_redis_down_fail_open_and_closed(tmp_path: Path) -> None:
    for mode in ("open", "closed"):
        config = {
            "auth": {"api_key": MASTER_KEY},
            "rate_limits": {"storage": DOWN_REDIS, "on_storage_error": mode},
            "models": [mock_model()],
        }
        with serve(config, tmp_path / mode) as server:
            await check_storage_down(server, mode)


# ---- secrets stay out of the logs


@pytest.mark.slow
async def test_keys_never_reach_logs(tmp_path: Path) -> None:
    config = {
        "auth": {"api_key": MASTER_KEY},
        "logging": {"level": "DEBUG", "format": "text"},
        "models": [mock_model()],
    }
    with serve(config, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=10) as client:
            created = await new_key(client, requests_per_minute=100)
            plaintext = created["key"]
            key = bearer(plaintext)
            assert (await client.post(CHAT_ROUTE, json=chat(), headers=key)).status_code == 200
            r = await client.post(CHAT_ROUTE, json=chat(stream=True), headers=key)
            assert r.status_code == 200
            r = await client.post("/v1/auth/token", headers=key)
            assert r.status_code == 200, r.text
            token = r.json()["token"]
            assert (
                await client.post(CHAT_ROUTE, json=chat(), headers=bearer(token))
            ).status_code == 200
            assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200
            # Failures log too: a key on the admin API, a wrong model, then after revocation.
            assert (await client.get("/admin/keys", headers=key)).status_code == 403
            bad_model = {**chat(), "model": "nope"}
            assert (await client.post(CHAT_ROUTE, json=bad_model, headers=key)).status_code == 404
            r = await client.post(f"/admin/keys/{created['id']}/revoke", headers=AUTH)
            assert r.status_code == 200, r.text
            assert (await client.post(CHAT_ROUTE, json=chat(), headers=key)).status_code == 401
            r = await client.post(CHAT_ROUTE, json=chat(), headers=bearer(token))
            assert r.status_code == 401
    log = server.log()  # the whole of it, shutdown included
    assert " DEBUG " in log, "DEBUG logging is not on"
    for name, secret in (("key", plaintext), ("token", token), ("master key", MASTER_KEY)):
        assert secret not in log, f"the {name} is in the log"
