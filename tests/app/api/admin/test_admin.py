"""The admin API, API keys and tokens, limits and budgets, end to end through the routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.api.admin import router as admin_router
from app.api.app import create_app
from app.core.gateway import Gateway
from app.ledger.storage.schema import ApiKey, AuditRecord
from tests.conftest import (
    AUTH,
    MASTER_KEY,
    AppClient,
    away_from_minute_boundary,
    make_config,
    post_scope,
    receive_body,
)
from tests.serving import serve

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def gateway_client() -> AsyncIterator[tuple[Gateway, AppClient]]:
    gateway = Gateway.from_config(make_config())
    async with AppClient(create_app(gateway)) as client:
        yield gateway, client


async def new_key(client: AppClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/admin/keys", json={"name": "test", **fields}, headers=AUTH)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_create_use_list_revoke(gateway_client: Any) -> None:
    gateway, client = gateway_client
    created = await new_key(client, owner="team-a", metadata={"env": "test"})
    key = created["key"]
    assert key.startswith("sk-clawbot-")
    assert created["id"].startswith("key_")
    r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200
    listed = (await client.get("/admin/keys", headers=AUTH)).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert all(key not in str(v) for v in listed[0].values())
    async with gateway.db.session() as session:
        row = (await session.execute(select(ApiKey))).scalar_one()
        assert key not in str([getattr(row, c.key) for c in ApiKey.__table__.columns])
    r = await client.post(f"/admin/keys/{created['id']}/revoke", headers=AUTH)
    assert r.json()["revoked"] is True
    r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_admin_needs_the_master_key(gateway_client: Any) -> None:
    _, client = gateway_client
    key = (await new_key(client))["key"]
    assert (await client.get("/admin/keys")).status_code == 401
    assert (await client.get("/admin/keys", headers=bearer("nope"))).status_code == 401
    r = await client.get("/admin/keys", headers=bearer(key))
    assert r.status_code == 403


async def test_unknown_and_expired_keys_are_401(gateway_client: Any) -> None:
    _, client = gateway_client
    r = await client.post(
        "/v1/chat/completions", json=CHAT, headers=bearer("sk-clawbot-" + "x" * 43)
    )
    assert r.status_code == 401
    expired = await new_key(client, expires_at="2020-01-01T00:00:00Z")
    r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(expired["key"]))
    assert r.status_code == 401
    assert "expired" in r.json()["error"]["message"]


async def test_model_permission_respects_aliases(gateway_client: Any) -> None:
    _, client = gateway_client
    key = (await new_key(client, models=["gpt-4o-mini"]))["key"]  # alias of "mock"
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    ).status_code == 200
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "fixed"}, headers=bearer(key)
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed"
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=bearer(key)
    )
    assert r.status_code == 404


async def test_update_changes_limits_now(gateway_client: Any) -> None:
    await away_from_minute_boundary()
    _, client = gateway_client
    created = await new_key(client)
    r = await client.patch(
        f"/admin/keys/{created['id']}",
        json={"requests_per_minute": 1, "name": "renamed"},
        headers=AUTH,
    )
    assert r.status_code == 200
    assert r.json()["name"] == "renamed"
    key = bearer(created["key"])
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200
    r = await client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert r.status_code == 429
    bad = await client.patch(f"/admin/keys/{created['id']}", json={"colour": "red"}, headers=AUTH)
    assert bad.status_code == 400
    missing = await client.patch("/admin/keys/key_000000000000", json={"name": "x"}, headers=AUTH)
    assert missing.status_code == 404


async def test_rate_limit_429_and_headers(gateway_client: Any) -> None:
    await away_from_minute_boundary()
    _, client = gateway_client
    key = bearer((await new_key(client, requests_per_minute=2, tokens_per_minute=10_000))["key"])
    first = await client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert "x-ratelimit-reset-requests" in first.headers
    await client.post("/v1/chat/completions", json=CHAT, headers=key)
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.slow
async def test_parallel_limit(tmp_path: Path) -> None:
    # A real server: Litestar's test client does not hand over a stream until it has ended.
    slow = {"id": "slow", "backend": "mock:", "options": {"reply": "w " * 40, "token_delay_ms": 25}}
    config = {"auth": {"api_key": MASTER_KEY}, "models": [slow]}
    with serve(config, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
            r = await client.post(
                "/admin/keys", json={"name": "p", "max_parallel": 1}, headers=AUTH
            )
            key = bearer(r.json()["key"])
            body = {**CHAT, "model": "slow", "stream": True}
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=key
            ) as held:
                assert held.status_code == 200
                lines = held.aiter_lines()
                await anext(lines)  # the first request holds the only slot
                refused = await client.post("/v1/chat/completions", json=body, headers=key)
                assert refused.status_code == 429
                assert "parallel" in refused.json()["error"]["message"]
                async for _ in lines:
                    pass
            # the finished stream gave its slot back
            r = await client.post(
                "/v1/chat/completions", json={**body, "stream": False}, headers=key
            )
            assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_the_parallel_slot_is_free_when_the_answer_arrives(
    gateway_client: Any, stream: bool
) -> None:
    """A client that sends its next request as soon as it has read the answer is not refused:
    the slot is released before the last byte leaves (after it, a busy machine refused one)."""
    _, client = gateway_client
    key = (await new_key(client, max_parallel=1))["key"]
    body = json.dumps({**CHAT, "stream": stream}).encode()
    scope = post_scope("/v1/chat/completions", f"Bearer {key}")
    next_status: list[int] = []
    answered = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            next_status.append(r.status_code)
            answered.set()

    await client.app(scope, receive_body(body, answered), send)
    assert next_status == [200]


async def test_total_budget(gateway_client: Any) -> None:
    gateway, client = gateway_client
    created = await new_key(client, budget_total_tokens=5)
    key = bearer(created["key"])
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200
    await gateway.audit.aclose(timeout_s=5)  # flush: the writer adds the 6 spent tokens
    await gateway.key_cache.refresh()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "insufficient_quota"
    await client.patch(
        f"/admin/keys/{created['id']}", json={"budget_total_tokens": 100}, headers=AUTH
    )
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200
    gateway.audit = None


async def test_token_exchange(gateway_client: Any) -> None:
    _, client = gateway_client
    created = await new_key(client, models=["mock"])
    r = await client.post("/v1/auth/token", headers=bearer(created["key"]))
    assert r.status_code == 200
    body = r.json()
    assert body["token"].startswith("tok-clawbot-")
    assert body["token_type"] == "bearer"
    assert 3500 <= body["expires_in"] <= 3600
    token = bearer(body["token"])
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=token)).status_code == 200
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "fixed"}, headers=token)
    assert r.status_code == 403  # carries the key's permissions
    await client.post(f"/admin/keys/{created['id']}/revoke", headers=AUTH)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=token)
    assert r.status_code == 401
    assert (await client.post("/v1/auth/token", headers=AUTH)).status_code == 400
    r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("tok-clawbot-e30.AAAA"))
    assert r.status_code == 401


async def test_rotate_with_grace(gateway_client: Any) -> None:
    _, client = gateway_client
    created = await new_key(client)
    r = await client.post(
        f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 600}, headers=AUTH
    )
    assert r.status_code == 201
    rotated = r.json()
    assert rotated["previous"]["rotated_to"] == rotated["id"]
    for key in (created["key"], rotated["key"]):
        assert (
            await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        ).status_code == 200
    r = await client.post(
        f"/admin/keys/{rotated['id']}/rotate", json={"grace_seconds": 0}, headers=AUTH
    )
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(rotated["key"]))
    ).status_code == 401
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(r.json()["key"]))
    ).status_code == 200


async def test_audit_rows_and_usage(gateway_client: Any) -> None:
    gateway, client = gateway_client
    created = await new_key(client)
    key = bearer(created["key"])
    await client.post("/v1/chat/completions", json=CHAT, headers=key)
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=key)
    await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=key)
    await client.post("/v1/chat/completions", json=CHAT, headers=bearer("wrong"))
    await client.get("/health")
    await gateway.audit.aclose(timeout_s=5)
    async with gateway.db.session() as session:
        rows = (await session.execute(select(AuditRecord).order_by(AuditRecord.id))).scalars().all()
    chats = [r for r in rows if r.route == "/v1/chat/completions"]
    assert [r.status for r in chats] == [200, 200, 404, 401]
    ok, streamed, missing, denied = chats
    assert ok.key_id == created["id"]
    assert ok.model == "mock"
    assert ok.backend == "mock:"
    assert (ok.prompt_tokens, ok.completion_tokens) == (2, 4)
    assert ok.stream is False
    assert ok.ttft_ms is None
    assert streamed.stream is True
    assert streamed.ttft_ms is not None
    assert streamed.completion_tokens == 4
    assert missing.error_type == "model_not_found"
    assert denied.error_type == "invalid_api_key"
    assert denied.key_id is None
    assert all(r.request_body is None for r in rows)
    assert not any(r.route == "/health" for r in rows)
    assert all(created["key"] not in str(vars(r)) and MASTER_KEY not in str(vars(r)) for r in rows)
    gateway.audit = None


async def test_streams_without_include_usage_do_not_show_it(gateway_client: Any) -> None:
    _, client = gateway_client
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert '"usage"' not in r.text
    assert r.text.endswith("data: [DONE]\n\n")


async def test_every_admin_route_needs_the_master_key(gateway_client: Any) -> None:
    """The router's one guard covers each of its routes: 401 without a key or with a wrong
    one, 403 with an API key; the master key gets past it (to the route's own answer)."""
    _, client = gateway_client
    api_key = bearer((await new_key(client))["key"])
    routes = [
        (method, route.path.replace("{key_id:str}", "key_nope"))
        for route in admin_router.routes
        for method in sorted(route.methods - {"OPTIONS", "HEAD"})
    ]
    assert len(routes) == 11
    for method, path in routes:
        assert (await client.request(method, path)).status_code == 401, path
        assert (await client.request(method, path, headers=bearer("wrong"))).status_code == 401
        assert (await client.request(method, path, headers=api_key)).status_code == 403, path
        allowed = await client.request(method, path, headers=AUTH)
        assert allowed.status_code not in (401, 403), (path, allowed.text)
