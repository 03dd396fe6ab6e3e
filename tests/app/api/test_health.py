"""GET /health and GET /ready."""

from __future__ import annotations

from app.api.app import create_app
from app.core.gateway import Gateway
from tests.conftest import AppClient, make_config


async def test_health_needs_no_auth(client: AppClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_after_start(client: AppClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200
    assert r.json()["models"] == ["mock", "fixed", "broken"]


async def test_not_ready_is_503_with_retry_after() -> None:
    gateway = Gateway.from_config(make_config())
    async with AppClient(create_app(gateway)) as c:
        gateway.models[1].ready = False
        r = await c.get("/ready")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "fixed" in r.json()["error"]["message"]


async def test_retry_after_also_in_milliseconds() -> None:
    gateway = Gateway.from_config(make_config())
    async with AppClient(create_app(gateway)) as c:
        gateway.models[0].ready = False
        r = await c.get("/ready")
        assert r.headers["retry-after-ms"] == "1000"
