"""Knowledge-bound models and the Responses API's file_search tool, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.api.app import create_app
from app.config import parse_config
from app.core.gateway import Gateway
from tests.conftest import MASTER_KEY, AppClient

AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
DOCS = {
    "refunds.md": b"Refunds are paid back within 14 days of the return.",
    "shipping.md": b"Orders ship within three business days.",
}


def config(url: str, store: str | None = None) -> Any:
    models: list[dict[str, Any]] = [
        {"id": "echo", "backend": "mock:", "options": {"echo_system": True}},
        {"id": "embedder", "backend": "mock:", "options": {"dimensions": 32}},
    ]
    if store is not None:
        models.append(
            {
                "id": "support-bot",
                "base": "echo",
                "system_prompt": "You are the support desk.",
                "knowledge": {"vector_store_ids": [store], "max_results": 1},
            }
        )
    return parse_config(
        {
            "auth": {"api_key": MASTER_KEY},
            "database": {"url": url},
            "models": models,
            "knowledge": {"embedding_model": "embedder"},
        }
    )


async def _indexed_store(client: AppClient) -> str:
    ids = []
    for name, data in DOCS.items():
        r = await client.post(
            "/v1/files", files={"file": (name, data)}, data={"purpose": "assistants"}, headers=AUTH
        )
        ids.append(r.json()["id"])
    store = (await client.post("/v1/vector_stores", json={"file_ids": ids}, headers=AUTH)).json()
    for _ in range(200):
        got = (await client.get(f"/v1/vector_stores/{store['id']}", headers=AUTH)).json()
        if got["file_counts"]["completed"] == len(DOCS):
            return str(store["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("never indexed")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[AppClient, str]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'kb.db'}"
    async with AppClient(create_app(Gateway.from_config(config(url)))) as first:
        store = await _indexed_store(first)
    async with AppClient(create_app(Gateway.from_config(config(url, store)))) as client:
        yield client, store


async def test_a_knowledge_bound_model_answers_from_its_store_on_chat(
    setup: tuple[AppClient, str],
) -> None:
    client, _ = setup
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "refunds paid back"}]}
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    answer = r.json()
    text = answer["choices"][0]["message"]["content"]
    assert "You are the support desk." in text
    assert "[1] refunds.md" in text
    assert "Refunds are paid back within 14 days" in text
    assert "shipping" not in text  # max_results 1
    assert [s["filename"] for s in answer["sources"]] == ["refunds.md"]
    assert r.headers["x-clawbot-sources"].endswith(";refunds.md")
    # the base model itself is not grounded
    plain = {**body, "model": "echo"}
    r = await client.post("/v1/chat/completions", json=plain, headers=AUTH)
    assert "sources" not in r.json()
    assert "refunds.md" not in r.json()["choices"][0]["message"]["content"]


async def test_a_knowledge_bound_model_streams_with_its_sources_first(
    setup: tuple[AppClient, str],
) -> None:
    client, _ = setup
    body = {
        "model": "support-bot",
        "stream": True,
        "messages": [{"role": "user", "content": "when do orders ship"}],
    }
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200
    assert r.headers["x-clawbot-sources"].endswith(";shipping.md")
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "three business days" in "".join(deltas)
    assert [s["filename"] for s in chunks[0]["sources"]] == ["shipping.md"]
    assert all("sources" not in c for c in chunks[1:])
    assert chunks[0]["object"] == "chat.completion.chunk"


async def test_a_knowledge_bound_model_is_grounded_on_messages_and_responses(
    setup: tuple[AppClient, str],
) -> None:
    client, _ = setup
    r = await client.post(
        "/v1/messages",
        json={
            "model": "support-bot",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": "refunds paid back"}],
        },
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert "Refunds are paid back" in r.json()["content"][0]["text"]
    assert "refunds.md" in r.headers["x-clawbot-sources"]
    r = await client.post(
        "/v1/responses", json={"model": "support-bot", "input": "refunds paid back"}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    (message,) = r.json()["output"]
    (part,) = message["content"]
    assert "Refunds are paid back" in part["text"]
    assert part["annotations"][0]["type"] == "file_citation"
    assert part["annotations"][0]["filename"] == "refunds.md"


async def test_file_search_runs_on_the_gateway_and_cites_its_files(
    setup: tuple[AppClient, str],
) -> None:
    client, store = setup
    tool = {"type": "file_search", "vector_store_ids": [store], "max_num_results": 2}
    body = {
        "model": "echo",
        "input": "when do orders ship",
        "tools": [tool],
        "include": ["file_search_call.results"],
    }
    r = await client.post("/v1/responses", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    response = r.json()
    search, message = response["output"]
    assert search["type"] == "file_search_call"
    assert search["status"] == "completed"
    assert search["queries"] == ["when do orders ship"]
    assert search["results"][0]["filename"] == "shipping.md"
    text = message["content"][0]["text"]
    assert "[1] shipping.md" in text
    cited = {a["filename"] for a in message["content"][0]["annotations"]}
    assert "shipping.md" in cited
    assert response["tools"][0]["type"] == "file_search"
    # without `include`, the hits are not in the output
    del body["include"]
    again = (await client.post("/v1/responses", json=body, headers=AUTH)).json()
    assert again["output"][0]["results"] is None


async def test_file_search_on_a_knowledge_bound_model_numbers_on_from_its_passages(
    setup: tuple[AppClient, str],
) -> None:
    client, store = setup
    tool = {"type": "file_search", "vector_store_ids": [store], "max_num_results": 1}
    body = {"model": "support-bot", "input": "when do orders ship", "tools": [tool]}
    r = await client.post("/v1/responses", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    text = r.json()["output"][1]["content"][0]["text"]
    # the model's own passage is [1]; the tool's go on from [2], so a citation names one source
    assert text.count("[1] ") == 1
    assert "[2] shipping.md" in text


async def test_file_search_streams_openais_events(setup: tuple[AppClient, str]) -> None:
    client, store = setup
    body = {
        "model": "echo",
        "input": "refunds paid back",
        "stream": True,
        "tools": [{"type": "file_search", "vector_store_ids": [store]}],
    }
    r = await client.post("/v1/responses", json=body, headers=AUTH)
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    kinds = [e["type"] for e in events]
    start = kinds.index("response.file_search_call.in_progress")
    assert kinds[start - 1] == "response.output_item.added"
    assert kinds[start : start + 4] == [
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.output_item.done",
    ]
    assert "response.output_text.annotation.added" in kinds
    assert kinds.index("response.output_text.annotation.added") < kinds.index(
        "response.output_text.done"
    )
    final = events[-1]["response"]
    assert final["output"][0]["type"] == "file_search_call"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_file_search_over_a_store_of_another_key_is_404(
    setup: tuple[AppClient, str],
) -> None:
    client, store = setup
    r = await client.post("/admin/keys", json={"name": "other"}, headers=AUTH)
    other = {"authorization": f"Bearer {r.json()['key']}"}
    body = {
        "model": "echo",
        "input": "refunds",
        "tools": [{"type": "file_search", "vector_store_ids": [store]}],
    }
    r = await client.post("/v1/responses", json=body, headers=other)
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "vector_store_id"


def test_a_base_must_be_a_model_with_backends() -> None:
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="base"):
        parse_config({"models": [{"id": "a", "base": "nope"}]})
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"models": [{"id": "a", "backend": "mock:", "base": "a"}]})
