"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

import pytest

from app.api.app import create_app
from app.core.gateway import Gateway
from tests.conftest import AUTH, AppClient, make_config


async def test_list(client: AppClient) -> None:
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


async def test_retrieve_by_id_and_alias(client: AppClient) -> None:
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


async def test_unknown_is_404(client: AppClient) -> None:
    r = await client.get("/v1/models/nope", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


async def test_capabilities_say_what_every_deployment_can_do(make_client: Any) -> None:
    models = [
        {"id": "plain", "backend": "mock:"},
        {"id": "tools", "backend": "mock:", "options": {"tool_arguments": {}}},
        {"id": "remote", "backend": "http://127.0.0.1:9/v1"},
        {
            "id": "mixed",
            "deployments": [
                {"name": "remote", "backend": "http://127.0.0.1:9/v1"},
                {"name": "local", "backend": "mock:"},
            ],
        },
    ]
    async with make_client(make_config(models)) as c:
        data = {
            m["id"]: m["capabilities"]
            for m in (await c.get("/v1/models", headers=AUTH)).json()["data"]
        }
    assert data["plain"] == {
        "chat": True,
        "completions": True,
        "embeddings": True,
        "tools": False,
        "vision": False,
        "json_schema": False,
        "fim": True,
        "rerank": True,
    }
    assert data["tools"]["tools"] is True
    assert data["remote"] == dict.fromkeys(data["plain"], True)
    assert data["mixed"] == data["plain"], "a pool promises what all its deployments can do"


@pytest.mark.slow
async def test_embedded_model_capabilities_after_load() -> None:
    """Learned when the model loads: SmolLM2 has no FIM tokens, and grammars give JSON."""
    config = make_config([{"id": "smol", "backend": "llamacpp:embedded", "context_length": 512}])
    async with AppClient(create_app(Gateway.from_config(config))) as c:
        caps = (await c.get("/v1/models/smol", headers=AUTH)).json()["capabilities"]
    assert caps["tools"] is True
    assert caps["json_schema"] is True
    assert caps["fim"] is False
