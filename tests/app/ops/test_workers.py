"""`clawbot serve --workers N`: the storage rules, and real worker processes on one port."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import coredis
import httpx
import pytest

from app.config import ConfigError, parse_config
from app.ops.workers import check_workers
from tests.services import REDIS_URL, require_redis
from tests.serving import serve

MASTER_KEY = "sk-workers-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
REDIS_DB = 11
MODEL = {"id": "m", "backend": "mock:"}


def config(**sections: Any) -> Any:
    return parse_config({"models": [MODEL], **sections})


def test_one_worker_needs_nothing_shared() -> None:
    check_workers(config(), 1)


def test_memory_rate_limits_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        check_workers(config(), 4)
    assert "rate_limits.storage on redis://" in str(caught.value)
    assert "4 times each limit" in str(caught.value)


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
def test_an_in_memory_database_is_refused(url: str) -> None:
    shared = config(rate_limits={"storage": "redis://127.0.0.1:6379/0"}, database={"url": url})
    with pytest.raises(ConfigError, match="in-memory SQLite"):
        check_workers(shared, 2)


def test_memory_router_state_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    shared = config(rate_limits={"storage": "redis://127.0.0.1:6379/0"})
    with caplog.at_level(logging.WARNING):
        check_workers(shared, 2)
    assert "learns backend cooldowns by itself" in caplog.text
    caplog.clear()
    check_workers(
        config(
            rate_limits={"storage": "redis://127.0.0.1:6379/0"},
            router={"state": "redis://127.0.0.1:6379/0"},
        ),
        2,
    )
    assert caplog.text == ""


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()}


def until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition never held")


@pytest.mark.slow
async def test_workers_share_the_port_and_the_limits(tmp_path: Path) -> None:
    require_redis()
    redis_url = REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client_redis: coredis.Redis[str] = coredis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    client_redis.connection_pool.disconnect()
    settings = {
        "model_server": {"workers": 2},
        "auth": {"api_key": MASTER_KEY, "key_cache_poll_s": 0.2},
        "rate_limits": {"storage": redis_url},
        "router": {"state": redis_url},
        "models": [MODEL],
    }
    with serve(settings, tmp_path) as server:
        parent = server.process.pid
        workers = children(parent)
        assert len(workers) == 2, "two worker processes"
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
            r = await client.post("/admin/keys", json={"name": "k", "requests_per_minute": 10})
            assert r.status_code == 401
            r = await client.post(
                "/admin/keys", json={"name": "k", "requests_per_minute": 10}, headers=AUTH
            )
            key = {"Authorization": f"Bearer {r.json()['key']}"}
            await asyncio.sleep(0.6)  # the other worker's key cache polls every 0.2 s
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

            async def one() -> int:
                # A new connection per request, so the kernel spreads them over the workers.
                async with httpx.AsyncClient(base_url=server.root, timeout=30) as fresh:
                    reply = await fresh.post("/v1/chat/completions", json=body, headers=key)
                    return reply.status_code

            statuses = await asyncio.gather(*(one() for _ in range(30)))
        assert sorted(statuses).count(200) == 10, "one limit for both workers together"
        assert statuses.count(429) == 20

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        until(lambda: len(children(parent)) == 2 and victim not in children(parent))
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
            for _ in range(5):
                r = await client.get("/v1/models", headers=AUTH)
                assert r.status_code == 200
        assert "exited unexpectedly" in server.log()

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0
        assert children_or_empty(parent) == set()


def children_or_empty(pid: int) -> set[int]:
    try:
        return children(pid)
    except OSError:
        return set()
