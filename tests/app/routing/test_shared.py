"""Routing state shared through a real Redis: two gateways (replicas) in one process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import coredis
import msgspec
import pytest

from app.config import parse_config
from app.core.gateway import Gateway
from app.protocol import ChatCompletionRequest, ChatMessage
from app.routing.pool import Deployment, Pool
from app.routing.shared import RouterState
from tests.conftest import MASTER_KEY, until
from tests.services import REDIS_URL, require_redis

FAILING = {"name": "a", "backend": "mock:", "options": {"fail_with": "unavailable"}}
BACKUP = {"name": "b", "backend": "mock:", "priority": 1}


def config(prefix: str, deployments: list[dict[str, Any]], **routing: Any) -> Any:
    return parse_config(
        {
            "auth": {"api_key": MASTER_KEY},
            "database": {"url": "sqlite+aiosqlite://"},
            "audit": {"enabled": False},
            "router": {"state": REDIS_URL, "sync_interval_s": 0.05, "key_prefix": prefix},
            "models": [
                {
                    "id": "m",
                    "routing": {"failures_to_trip": 2, "cooldown_s": 30, **routing},
                    "deployments": deployments,
                }
            ],
        }
    )


@pytest.fixture
async def redis() -> AsyncIterator[coredis.Redis[str]]:
    require_redis()
    client: coredis.Redis[str] = coredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.connection_pool.disconnect()


@pytest.fixture
async def prefix(redis: coredis.Redis[str]) -> AsyncIterator[str]:
    prefix = f"clawbot-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(keys)


async def replicas(cfg: Any) -> tuple[Gateway, Gateway]:
    one, two = Gateway.from_config(cfg), Gateway.from_config(cfg)
    await one.start()
    await two.start()
    return one, two


def pool_of(gateway: Gateway) -> Pool:
    return gateway.models[0].pool


def deployment(gateway: Gateway, name: str) -> Deployment:
    return pool_of(gateway).deployment(name)


async def test_a_cooldown_on_one_replica_takes_the_deployment_out_on_the_other(
    prefix: str,
) -> None:
    one, two = await replicas(config(prefix, [FAILING, BACKUP], health_check_interval_s=0))
    try:
        req = ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content="hi")])
        for _ in range(2):
            await pool_of(one).call(lambda d: d.backend.chat(req))
        assert deployment(one, "a").state(pool_of(one).clock()) == "open"
        two_a = deployment(two, "a")
        await until(lambda: two_a.state(pool_of(two).clock()) == "open")
        remaining = two_a.cooldown_remaining(pool_of(two).clock())
        assert 28 < remaining <= 30
        assert two_a.total_failures == 0, "replica two never sent it a request"
    finally:
        await one.aclose()
        await two.aclose()


@pytest.fixture
async def sick_pair(prefix: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two replicas of a pool whose deployment `a` fails its health check; one has checked."""
    sick = {"name": "a", "backend": "mock:", "options": {"healthy": False}}
    one, two = await replicas(config(prefix, [sick, BACKUP], health_check_interval_s=30))
    try:
        await one.monitor.check_all()
        yield one, two
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_failed_health_check_is_shared_and_a_recovery_clears_it(
    sick_pair: tuple[Gateway, Gateway], redis: coredis.Redis[str]
) -> None:
    one, two = sick_pair
    assert not deployment(one, "a").healthy
    two_a = deployment(two, "a")
    await until(lambda: not two_a.healthy)
    assert two_a.check_error == "reported by another replica: the backend reports it cannot serve"
    backend = deployment(one, "a").backend
    backend.options = msgspec.structs.replace(backend.options, healthy=True)  # type: ignore[attr-defined]
    await one.monitor.check_all()
    assert deployment(one, "a").healthy
    state = one.router_state
    assert state is not None
    key = state.key(pool_of(one), deployment(one, "a"), "down")
    await until_async(lambda: redis.exists([key]), 0)
    backend = two_a.backend
    backend.options = msgspec.structs.replace(backend.options, healthy=True)  # type: ignore[attr-defined]
    await two.monitor.check_all()
    assert two_a.healthy, "its own check sees it serve, and nothing marks it down again"
    await asyncio.sleep(0.2)
    assert two_a.healthy


async def until_async(probe: Any, expected: Any, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if await probe() == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_redis_down_keeps_routing_on_local_state(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(
        {
            "database": {"url": "sqlite+aiosqlite://"},
            "audit": {"enabled": False},
            "router": {"state": "redis://127.0.0.1:1/0", "sync_interval_s": 0.05},
            "models": [{"id": "m", "deployments": [FAILING, BACKUP]}],
        }
    )
    gateway = Gateway.from_config(cfg)
    await gateway.start()
    try:
        state = gateway.router_state
        assert isinstance(state, RouterState)
        await until(lambda: "routing on local state" in caplog.text)
        assert caplog.text.count("routing on local state") == 1, "logged once, not per sync"
        pool = pool_of(gateway)
        for _ in range(3):
            pool.deployment("a").record_failure(pool.clock(), pool.breaker, trial=False)
        assert pool.deployment("a").state(pool.clock()) == "open"
    finally:
        await gateway.aclose()


def test_router_state_must_be_memory_or_redis() -> None:
    from app.config import ConfigError

    with pytest.raises(ConfigError, match=r"router\.state"):
        parse_config({"router": {"state": "etcd://x"}, "models": [{"id": "m", "backend": "mock:"}]})


async def test_a_recovery_is_not_undone_by_a_sync_reading_the_mark_being_deleted(
    sick_pair: tuple[Gateway, Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, _ = sick_pair
    state = one.router_state
    assert state is not None
    key = state.key(pool_of(one), deployment(one, "a"), "down")
    await until_async(lambda: state._client.exists([key]), 1)
    real_delete = state._client.delete

    async def slow_delete(keys: Any) -> Any:
        await asyncio.sleep(0.3)
        return await real_delete(keys)

    monkeypatch.setattr(state._client, "delete", slow_delete)
    backend = deployment(one, "a").backend
    backend.options = msgspec.structs.replace(backend.options, healthy=True)  # type: ignore[attr-defined]
    await one.monitor.check_all()
    assert deployment(one, "a").healthy
    # The deletion is under way: the mark is still in Redis when this sync reads it.
    assert await state._client.exists([key]) == 1
    await state.sync()
    assert deployment(one, "a").healthy, "its own recovery wins over its own stale mark"
    await until_async(lambda: state._client.exists([key]), 0)
