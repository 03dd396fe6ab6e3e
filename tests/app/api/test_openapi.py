"""GET /openapi.json and /docs: every public route described, the schemas valid and true to the
bodies the gateway really sends, and a docs page that loads nothing from elsewhere."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from app.api.app import build_litestar
from app.api.openapi import DOCS_ASSETS, OPERATIONS, document
from app.api.pages import SECURITY_HEADERS
from app.config import parse_config
from app.core.gateway import Gateway
from tests.conftest import AUTH, AppClient, make_config

UNDOCUMENTED = ("/admin/ui", "/docs", "/openapi.json")
"""The dashboard's and the docs' own files, and the document itself."""
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}]}


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, paths in OpenAPI's form."""
    config = parse_config({"models": [{"id": "m", "backend": "mock:"}]})
    app = build_litestar(Gateway.from_config(config))
    routes = set()
    for route in app.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        if path.startswith(UNDOCUMENTED):
            continue
        for handler in getattr(route, "route_handlers", []):
            for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                routes.add((method.lower(), path))
    return routes


def test_every_public_route_is_described_once() -> None:
    described = [(op.method, op.path) for op in OPERATIONS]
    assert len(described) == len(set(described))
    assert set(described) == served_routes()


def test_the_document_is_openapi_31_with_valid_schemas() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert op["responses"], (method, path)
            assert op["operationId"]
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))


def validator(name: str) -> Draft202012Validator:
    """A validator of component `name`, resolving references within the document."""
    resource = Resource(contents=document(), specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:clawbot", resource)
    return Draft202012Validator(
        {"$ref": f"urn:clawbot#/components/schemas/{name}"}, registry=registry
    )


def schema_name(path: str, method: str, status: str = "200") -> str:
    content = document()["paths"][path][method]["responses"][status]["content"]
    ref: str = content["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[-1]


@pytest.fixture
async def client(make_client: Any) -> AsyncIterator[AppClient]:
    async with make_client(make_config()) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/v1/chat/completions", CHAT),
        ("post", "/v1/completions", {"model": "mock", "prompt": "hi"}),
        ("post", "/v1/embeddings", {"model": "mock", "input": "hi"}),
        ("get", "/v1/models", None),
        ("get", "/v1/models/{model_id}", None),
        ("post", "/v1/responses", {"model": "mock", "input": "hi"}),
        ("post", "/v1/messages", {**CHAT, "max_tokens": 16}),
    ],
)
async def test_real_answers_match_their_schemas(
    client: AppClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    url = path.replace("{model_id}", "mock")
    r = await client.request(method.upper(), url, json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    validator(schema_name(path, method)).validate(r.json())


async def test_errors_match_the_error_schemas(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "mock"}, headers=AUTH)
    assert r.status_code == 400
    validator(schema_name("/v1/chat/completions", "post", "400")).validate(r.json())
    r = await client.post("/v1/messages", json={"model": "mock"}, headers=AUTH)
    assert r.status_code == 400
    name = schema_name("/v1/messages", "post", "400")
    assert "anthropic" in name
    validator(name).validate(r.json())


async def test_the_document_and_docs_page_are_served_from_here(client: AppClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == document()
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == SECURITY_HEADERS["content-security-policy"]
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links, "the page links its script and style sheet"
    assert all(link.startswith("/") for link in links), links  # nothing from another host
    for name, media_type in DOCS_ASSETS.items():
        asset = await client.get(f"/docs/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(media_type)
        assert "http://" not in asset.text
        assert "https://" not in asset.text
    assert (await client.get("/docs/nope.js")).status_code == 404
