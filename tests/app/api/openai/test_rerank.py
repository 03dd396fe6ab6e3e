"""POST /v1/rerank: embedding similarity on the mock backend, pass-through to a remote /rerank."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx

from app.api.app import create_app
from app.config import Config
from app.core.gateway import Gateway
from app.errors import ContextLengthExceeded
from app.protocol import EmbeddingList, EmbeddingRequest
from backends.base import BackendSpec
from backends.mock import MockBackend
from backends.registry import backend_factories
from tests.conftest import AUTH, AppClient, make_config

UPSTREAM = "http://upstream.test/v1"
DOCS = ["banana bread recipe", "apple pie", "cherry tart", "the history of pie"]


async def rerank(client: AppClient, path: str = "/v1/rerank", **body: Any) -> Any:
    body.setdefault("model", "mock")
    body.setdefault("query", "apple pie")
    body.setdefault("documents", DOCS)
    r = await client.post(path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---- scored by embeddings (the mock backend)


async def test_identical_document_ranks_first(client: AppClient) -> None:
    body = await rerank(client)
    assert body["object"] == "list"
    assert body["model"] == "mock"
    assert body["id"]
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert results[0]["index"] == 1
    assert results[0]["relevance_score"] == pytest.approx(1.0)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["relevance_score"] < 0.999 for r in results[1:])
    assert body["data"] == results
    assert all("document" not in r for r in results)
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]


async def test_scores_are_cosine_similarities(client: AppClient) -> None:
    r = await client.post(
        "/v1/embeddings", json={"model": "mock", "input": ["apple pie", *DOCS]}, headers=AUTH
    )
    vectors = [item["embedding"] for item in r.json()["data"]]
    expected = {i: cosine(vectors[0], vectors[i + 1]) for i in range(len(DOCS))}
    body = await rerank(client)
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    assert got == pytest.approx(expected, abs=1e-9)


async def test_same_text_same_score_ties_keep_request_order(
    client: AppClient,
) -> None:
    body = await rerank(client, documents=["x y", "apple pie", "x y", "apple pie"])
    assert [r["index"] for r in body["results"][:2]] == [1, 3]
    assert [r["index"] for r in body["results"][2:]] == [0, 2]
    assert body["results"][2]["relevance_score"] == body["results"][3]["relevance_score"]


async def test_top_n_keeps_the_best(client: AppClient) -> None:
    full = await rerank(client)
    cut = await rerank(client, top_n=2)
    assert cut["results"] == full["results"][:2]
    assert cut["data"] == cut["results"]
    assert (await rerank(client, top_n=10))["results"] == full["results"]


async def test_top_k_is_top_n(client: AppClient) -> None:
    body = await rerank(client, top_k=1)
    assert [r["index"] for r in body["results"]] == [1]


async def test_return_documents_and_object_documents(client: AppClient) -> None:
    docs = [{"text": "banana bread recipe", "title": "ignored"}, "apple pie", {"text": "pie"}]
    body = await rerank(client, documents=docs, return_documents=True)
    by_index = {r["index"]: r["document"] for r in body["results"]}
    assert by_index == {
        0: {"text": "banana bread recipe"},
        1: {"text": "apple pie"},
        2: {"text": "pie"},
    }
    assert body["results"][0]["index"] == 1
    plain = await rerank(client, documents=docs, return_documents=False)
    assert all("document" not in r for r in plain["results"])


async def test_unversioned_path_and_alias(client: AppClient) -> None:
    body = await rerank(client, path="/rerank", model="gpt-4o-mini")
    assert body["model"] == "mock"
    assert body["results"][0]["index"] == 1


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"documents": []}, "documents"),
        ({"documents": None}, "documents"),
        ({"documents": "apple pie"}, "documents"),
        ({"documents": ["a", ""]}, "documents[1]"),
        ({"documents": [3]}, "documents[0]"),
        ({"documents": [{"title": "x"}]}, "documents[0].text"),
        ({"documents": [{"text": ""}]}, "documents[0].text"),
        ({"query": ""}, "query"),
        ({"query": None}, "query"),
        ({"top_n": 0}, "top_n"),
        ({"top_n": "3"}, "top_n"),
        ({"top_k": 0}, "top_k"),
        ({"return_documents": "yes"}, "return_documents"),
    ],
)
async def test_bad_request_is_400_naming_the_field(
    client: AppClient, change: dict[str, Any], param: str
) -> None:
    body = {"model": "mock", "query": "q", "documents": ["a", "b"], **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = await client.post("/v1/rerank", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_missing_key_is_401(client: AppClient) -> None:
    r = await client.post("/v1/rerank", json={"model": "mock", "query": "q", "documents": ["a"]})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_model_is_404(client: AppClient) -> None:
    r = await client.post(
        "/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]}, headers=AUTH
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


async def test_backend_failure_is_relayed(make_client: Any) -> None:
    config = make_config(
        [{"id": "down", "backend": "mock:", "options": {"fail_with": "server_error"}}]
    )
    async with make_client(config) as client:
        r = await client.post(
            "/v1/rerank", json={"model": "down", "query": "q", "documents": ["a"]}, headers=AUTH
        )
    assert r.status_code == 502


# ---- backends that cannot embed, or refuse an input


class ChatOnlyBackend(MockBackend):
    """A mock that neither reranks nor embeds."""

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.capabilities = type(self.capabilities)(embeddings=False)


class ShortContextBackend(MockBackend):
    """A mock that refuses its third embedding input as too long, as llama.cpp would."""

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        raise ContextLengthExceeded(
            "input[2] is 900 tokens; this model embeds at most 512", param="input"
        )


@asynccontextmanager
async def custom(config: Config) -> AsyncIterator[AppClient]:
    factories = {**backend_factories(), "chatonly": ChatOnlyBackend, "short": ShortContextBackend}
    app = create_app(Gateway.from_config(config, factories=factories))
    async with AppClient(app) as client:
        yield client


async def test_model_that_neither_reranks_nor_embeds_is_400() -> None:
    async with custom(make_config([{"id": "chat", "backend": "chatonly:"}])) as client:
        r = await client.post(
            "/v1/rerank", json={"model": "chat", "query": "q", "documents": ["a"]}, headers=AUTH
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == "model"
    assert "rerank" in error["message"]


async def test_embedding_errors_name_the_rerank_field() -> None:
    async with custom(make_config([{"id": "short", "backend": "short:"}])) as client:
        r = await client.post(
            "/v1/rerank",
            json={"model": "short", "query": "q", "documents": ["a", "b", "a"]},
            headers=AUTH,
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "documents[1]"  # unique inputs: q, a, b
    assert error["message"].startswith("documents[1] is 900 tokens")


# ---- a remote backend: passed through to its /rerank


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    """The remote server; it lists its models so health checks pass."""
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.get("/models").respond(200, json={"object": "list", "data": []})
        yield router


def remote(**options: Any) -> Config:
    return make_config(
        [
            {
                "id": "cross",
                "backend": UPSTREAM,
                "options": {"transport": "httpx", "upstream_model": "bge-reranker", **options},
            }
        ]
    )


def embeddings_answer(vectors: list[list[float]]) -> dict[str, Any]:
    return {
        "object": "list",
        "model": "bge-reranker",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }


async def test_remote_rerank_is_passed_through(
    upstream: respx.MockRouter, make_client: Any
) -> None:
    route = upstream.post("/rerank").respond(
        200,
        json={
            "model": "bge-reranker",
            "object": "list",
            "usage": {"prompt_tokens": 40, "total_tokens": 40},
            "results": [
                {"index": 0, "relevance_score": 0.1},
                {"index": 2, "relevance_score": 0.7},
                {"index": 1, "relevance_score": 0.9},
            ],
        },
    )
    async with make_client(remote()) as client:
        body = await rerank(
            client,
            model="cross",
            documents=["a", {"text": "b"}, "c"],
            top_n=2,
            return_documents=True,
        )
    sent = json.loads(route.calls.last.request.content)
    assert sent == {
        "model": "bge-reranker",
        "query": "apple pie",
        "documents": ["a", "b", "c"],
        "top_n": 2,
    }
    assert body["model"] == "cross"
    assert body["results"] == [
        {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}},
        {"index": 2, "relevance_score": 0.7, "document": {"text": "c"}},
    ]
    assert body["data"] == body["results"]
    assert body["usage"] == {"prompt_tokens": 40, "total_tokens": 40}


async def test_remote_voyage_style_answer(upstream: respx.MockRouter, make_client: Any) -> None:
    upstream.post("/rerank").respond(
        200,
        json={
            "object": "list",
            "data": [{"index": 0, "relevance_score": 0.2}, {"index": 1, "relevance_score": 0.8}],
            "usage": {"total_tokens": 12},
        },
    )
    async with make_client(remote()) as client:
        body = await rerank(client, model="cross", documents=["a", "b"])
    assert [r["index"] for r in body["results"]] == [1, 0]
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12}


@pytest.mark.parametrize("status", [404, 501])
async def test_remote_without_rerank_scores_by_embeddings(
    upstream: respx.MockRouter, make_client: Any, status: int
) -> None:
    refused = upstream.post("/rerank").respond(
        status, json={"error": {"message": "reranking is not enabled", "type": "not_supported"}}
    )
    embedded = upstream.post("/embeddings").respond(
        200, json=embeddings_answer([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [2.0, 0.0]])
    )
    async with make_client(remote()) as client:
        body = await rerank(client, model="cross", documents=["a", "b", "c"])
    assert refused.called
    assert json.loads(embedded.calls.last.request.content)["input"] == ["apple pie", "a", "b", "c"]
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert scores == pytest.approx({0: 0.0, 1: 0.6, 2: 1.0})
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    assert body["usage"]["prompt_tokens"] == 7


async def test_remote_with_rerank_off_goes_straight_to_embeddings(
    upstream: respx.MockRouter, make_client: Any
) -> None:
    refused = upstream.post("/rerank").respond(500)
    upstream.post("/embeddings").respond(200, json=embeddings_answer([[1.0, 0.0], [1.0, 0.0]]))
    async with make_client(remote(rerank=False)) as client:
        body = await rerank(client, model="cross", documents=["a"])
    assert not refused.called
    assert body["results"] == [{"index": 0, "relevance_score": pytest.approx(1.0)}]


async def test_remote_client_error_is_relayed(upstream: respx.MockRouter, make_client: Any) -> None:
    upstream.post("/rerank").respond(
        400, json={"error": {"message": "query too long", "type": "invalid_request_error"}}
    )
    embedded = upstream.post("/embeddings").respond(500)
    async with make_client(remote()) as client:
        r = await client.post(
            "/v1/rerank", json={"model": "cross", "query": "q", "documents": ["a"]}, headers=AUTH
        )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "query too long"
    assert not embedded.called


@pytest.mark.parametrize(
    "results",
    [
        [{"index": 3, "relevance_score": 0.5}],
        [{"index": 0, "relevance_score": 0.5}, {"index": 0, "relevance_score": 0.4}],
    ],
)
async def test_remote_answer_with_bad_indexes_is_502(
    upstream: respx.MockRouter, make_client: Any, results: list[dict[str, Any]]
) -> None:
    upstream.post("/rerank").respond(200, json={"results": results})
    async with make_client(remote()) as client:
        r = await client.post(
            "/v1/rerank",
            json={"model": "cross", "query": "q", "documents": ["a", "b"]},
            headers=AUTH,
        )
    assert r.status_code == 502


async def test_remote_answer_that_is_not_rerank_json_is_502(
    upstream: respx.MockRouter, make_client: Any
) -> None:
    upstream.post("/rerank").mock(return_value=httpx.Response(200, content=b"<html>"))
    async with make_client(remote()) as client:
        r = await client.post(
            "/v1/rerank", json={"model": "cross", "query": "q", "documents": ["a"]}, headers=AUTH
        )
    assert r.status_code == 502
    assert "invalid response" in r.json()["error"]["message"]
