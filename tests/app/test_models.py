"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from tests.conftest import AUTH


async def test_list(client: AsyncTestClient[Any]) -> None:
    r = await client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["mock", "fixed", "broken"]
    first = body["data"][0]
    assert first["object"] == "model"
    assert first["owned_by"] == "clawbot"
    assert isinstance(first["created"], int)
    assert first["context_length"] == 4096
    assert "context_length" not in body["data"][1]


async def test_retrieve_by_id_and_alias(client: AsyncTestClient[Any]) -> None:
    by_id = (await client.get("/v1/models/mock", headers=AUTH)).json()
    by_alias = (await client.get("/v1/models/gpt-4o-mini", headers=AUTH)).json()
    assert by_id == by_alias
    assert by_id["id"] == "mock"


async def test_ids_with_slashes(make_client: Any) -> None:
    from tests.conftest import make_config

    async with make_client(make_config([{"id": "org/model-7b", "backend": "mock:"}])) as c:
        r = await c.get("/v1/models/org/model-7b", headers=AUTH)
        assert r.status_code == 200
        assert r.json()["id"] == "org/model-7b"


async def test_unknown_is_404(client: AsyncTestClient[Any]) -> None:
    r = await client.get("/v1/models/nope", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
