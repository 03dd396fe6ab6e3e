"""The knowledge base's rerank stage: a configured model that serves /rerank reorders a
search's fused candidates (vector store search and the Responses API's file_search)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from app.api.app import create_app
from app.config import ConfigError, parse_config
from app.core.gateway import Gateway
from tests.app.api.knowledge.test_knowledge_api import AUTH, indexed, upload
from tests.conftest import MASTER_KEY, AppClient

UPSTREAM = "http://reranker.test/v1"
TEXTS = {
    "alpha.txt": b"Alpha: apples are stored in the north warehouse.",
    "beta.txt": b"Beta: apples ship on Mondays from the south warehouse.",
    "gamma.txt": b"Gamma: apples come with a two year warranty.",
}


def settings(tmp_path: Path, **knowledge: Any) -> dict[str, Any]:
    return {
        "auth": {"api_key": MASTER_KEY},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'kb.db'}"},
        "models": [
            {"id": "mock", "backend": "mock:"},
            {"id": "embedder", "backend": "mock:", "options": {"dimensions": 32}},
            {
                "id": "cross",
                "aliases": ["bge-reranker"],
                "backend": UPSTREAM,
                "options": {"transport": "httpx", "upstream_model": "bge-reranker"},
            },
        ],
        "knowledge": {
            "embedding_model": "embedder",
            "blobs": "database:",
            "rerank_model": "bge-reranker",
            **knowledge,
        },
    }


def by_keyword(request: httpx.Request) -> httpx.Response:
    """A cross-encoder stand-in: gamma first, then beta, then the rest."""
    body = json.loads(request.content)
    score = {"Gamma": 0.92, "Beta": 0.41}
    results = [
        {"index": i, "relevance_score": next((v for k, v in score.items() if k in d), 0.05)}
        for i, d in enumerate(body["documents"])
    ]
    return httpx.Response(200, json={"model": "bge-reranker", "results": results})


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.get("/models").respond(200, json={"object": "list", "data": []})
        yield router


@pytest.fixture
async def kb(tmp_path: Path, upstream: respx.MockRouter) -> AsyncIterator[tuple[AppClient, str]]:
    gateway = Gateway.from_config(parse_config(settings(tmp_path)))
    async with AppClient(create_app(gateway)) as client:
        files = [await upload(client, name, data) for name, data in TEXTS.items()]
        r = await client.post(
            "/v1/vector_stores", json={"file_ids": [f["id"] for f in files]}, headers=AUTH
        )
        store = r.json()["id"]
        for f in files:
            assert (await indexed(client, store, f["id"]))["status"] == "completed"
        yield client, store


async def search(client: AppClient, store: str, **body: Any) -> list[dict[str, Any]]:
    r = await client.post(
        f"/v1/vector_stores/{store}/search", json={"query": "apples", **body}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def test_the_rerank_model_orders_the_candidates_and_scores_them(
    kb: tuple[AppClient, str], upstream: respx.MockRouter
) -> None:
    client, store = kb
    route = upstream.post("/rerank").mock(side_effect=by_keyword)
    hits = await search(client, store)
    assert [h["filename"] for h in hits] == ["gamma.txt", "beta.txt", "alpha.txt"]
    assert [h["score"] for h in hits] == [0.92, 0.41, 0.05]
    sent = json.loads(route.calls.last.request.content)
    assert sent["query"] == "apples"
    assert sent["model"] == "bge-reranker"
    assert sorted(sent["documents"]) == sorted(t.decode() for t in TEXTS.values())


async def test_the_threshold_applies_to_the_rerank_score(
    kb: tuple[AppClient, str], upstream: respx.MockRouter
) -> None:
    client, store = kb
    upstream.post("/rerank").mock(side_effect=by_keyword)
    hits = await search(client, store, ranking_options={"score_threshold": 0.4})
    assert [h["filename"] for h in hits] == ["gamma.txt", "beta.txt"]
    hits = await search(client, store, max_num_results=1)
    assert [h["filename"] for h in hits] == ["gamma.txt"]


async def test_ranker_none_skips_the_stage(
    kb: tuple[AppClient, str], upstream: respx.MockRouter
) -> None:
    client, store = kb
    route = upstream.post("/rerank").mock(side_effect=by_keyword)
    hits = await search(client, store, ranking_options={"ranker": "none"})
    assert not route.called
    assert len(hits) == 3
    assert 0.92 not in [h["score"] for h in hits]


async def test_a_failing_rerank_model_leaves_the_fused_order(
    kb: tuple[AppClient, str], upstream: respx.MockRouter
) -> None:
    client, store = kb
    fused = await search(client, store, ranking_options={"ranker": "none"})
    upstream.post("/rerank").respond(500, json={"error": {"message": "model crashed"}})
    hits = await search(client, store)
    assert hits == fused


async def test_file_search_in_responses_is_reranked(
    kb: tuple[AppClient, str], upstream: respx.MockRouter
) -> None:
    client, store = kb
    upstream.post("/rerank").mock(side_effect=by_keyword)
    r = await client.post(
        "/v1/responses",
        json={
            "model": "mock",
            "input": "apples",
            "tools": [{"type": "file_search", "vector_store_ids": [store]}],
            "include": ["file_search_call.results"],
        },
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    (call,) = [item for item in r.json()["output"] if item["type"] == "file_search_call"]
    assert [x["filename"] for x in call["results"]] == ["gamma.txt", "beta.txt", "alpha.txt"]


def test_an_unknown_rerank_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rerank_model: no model is called 'nope'"):
        parse_config(settings(tmp_path, rerank_model="nope"))
