"""Authentication by the master key, through the routes and on its own."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import AuthenticationFailed
from app.ledger.keys import KeyCache, KeyStore, TokenSigner
from app.ledger.storage.database import Database
from policies.api_key import ApiKeyPolicy
from policies.context import RequestContext, credential_of
from tests.conftest import MASTER_KEY, AppClient, make_config

BODY = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {MASTER_KEY}"},
        {"x-api-key": MASTER_KEY},
        {"authorization": f"bearer {MASTER_KEY}"},
    ],
)
async def test_accepted_forms(client: AppClient, headers: dict[str, str]) -> None:
    assert (
        await client.post("/v1/chat/completions", json=BODY, headers=headers)
    ).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": MASTER_KEY},
        {"x-api-key": "wrong"},
        {"Authorization": "Bearer "},
    ],
)
async def test_rejected(client: AppClient, headers: dict[str, str]) -> None:
    for method, path, body in (("POST", "/v1/chat/completions", BODY), ("GET", "/v1/models", None)):
        r = await client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
        assert MASTER_KEY not in r.text


async def test_auth_comes_before_model_lookup(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json={**BODY, "model": "secret-model"})
    assert r.status_code == 401


async def test_no_key_configured_means_open(make_client: Any) -> None:
    async with make_client(make_config(api_key="")) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200


async def test_policy_sets_key_id() -> None:
    db = Database("sqlite+aiosqlite://")
    await db.upgrade()
    cache = KeyCache(KeyStore(db))
    policy = ApiKeyPolicy(MASTER_KEY, cache, TokenSigner(b"s" * 32, 60))
    try:
        ctx = RequestContext(request_id="r", client_ip="::1", route="/", credential=MASTER_KEY)
        await policy.check(ctx)
        assert ctx.key_id == "master"
        assert ctx.key is None
        ctx.credential = MASTER_KEY + "x"
        with pytest.raises(AuthenticationFailed):
            await policy.check(ctx)
    finally:
        await cache.aclose()
        await db.aclose()


def test_credential_of() -> None:
    assert credential_of({"authorization": "Bearer abc"}) == "abc"
    assert credential_of({"x-api-key": "k"}) == "k"
    assert credential_of({"authorization": "Basic abc", "x-api-key": "k"}) == "k"
    assert credential_of({}) is None
