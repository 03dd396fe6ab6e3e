"""Path normalization, request ids, and errors for unknown routes."""

from __future__ import annotations

import pytest

from app.api.middleware.edge import normalize_path
from tests.conftest import AUTH, AppClient


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/chat/completions", "/v1/chat/completions"),
        ("//v1//chat/completions", "/v1/chat/completions"),
        ("/v1//models", "/v1/models"),
        ("//embeddings", "/v1/embeddings"),
        ("/models/a/b", "/v1/models/a/b"),
        ("/health", "/health"),
        ("/completions", "/v1/completions"),
    ],
)
def test_normalize_path(raw: str, normalized: str) -> None:
    assert normalize_path(raw) == normalized


@pytest.mark.parametrize(
    "path", ["/chat/completions", "//v1/chat/completions", "/v1//chat/completions"]
)
async def test_routes_answer_on_variant_paths(client: AppClient, path: str) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}
    r = await client.post(path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text


async def test_unknown_route_is_openai_shaped_404(client: AppClient) -> None:
    r = await client.get("/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.headers["x-request-id"]


async def test_wrong_method_is_405(client: AppClient) -> None:
    r = await client.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


async def test_request_ids_are_unique_and_client_ids_kept(client: AppClient) -> None:
    ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    r = await client.get("/health", headers={"x-request-id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    r = await client.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]
