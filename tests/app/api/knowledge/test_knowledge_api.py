"""The Files and Vector Stores APIs in-process, over SQLite and the real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.api.app import create_app
from app.config import parse_config
from app.core.gateway import Gateway
from tests.conftest import MASTER_KEY, AppClient

AUTH = {"authorization": f"Bearer {MASTER_KEY}"}


def config(database_url: str, **knowledge: Any) -> Any:
    return parse_config(
        {
            "auth": {"api_key": MASTER_KEY},
            "database": {"url": database_url},
            "models": [
                {"id": "mock", "backend": "mock:"},
                {"id": "embedder", "backend": "mock:", "options": {"dimensions": 32}},
            ],
            "knowledge": {"embedding_model": "embedder", "blobs": "database:", **knowledge},
        }
    )


@pytest.fixture
async def kb(database_url: str) -> AsyncIterator[AppClient]:
    async with AppClient(create_app(Gateway.from_config(config(database_url)))) as c:
        yield c


async def upload(
    client: AppClient, name: str, data: bytes, headers: dict[str, str] = AUTH
) -> dict[str, Any]:
    r = await client.post(
        "/v1/files", files={"file": (name, data)}, data={"purpose": "assistants"}, headers=headers
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def new_key(client: AppClient) -> dict[str, str]:
    r = await client.post("/admin/keys", json={"name": "tenant"}, headers=AUTH)
    assert r.status_code == 201, r.text
    return {"authorization": f"Bearer {r.json()['key']}"}


async def indexed(
    client: AppClient, store: str, file_id: str, headers: dict[str, str] = AUTH
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        r = await client.get(f"/v1/vector_stores/{store}/files/{file_id}", headers=headers)
        found.update(r.json())
        return bool(found["status"] != "in_progress")

    for _ in range(200):
        if await done():
            return found
        await __import__("asyncio").sleep(0.05)
    raise AssertionError(f"never indexed: {found}")


async def test_a_file_goes_up_is_listed_read_back_and_deleted(kb: AppClient) -> None:
    f = await upload(kb, "notes.txt", b"hello world")
    assert (f["object"], f["bytes"], f["filename"]) == ("file", 11, "notes.txt")
    listed = (await kb.get("/v1/files", headers=AUTH)).json()
    assert [x["id"] for x in listed["data"]] == [f["id"]]
    content = await kb.get(f"/v1/files/{f['id']}/content", headers=AUTH)
    assert content.content == b"hello world"
    gone = await kb.delete(f"/v1/files/{f['id']}", headers=AUTH)
    assert gone.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert (await kb.get(f"/v1/files/{f['id']}", headers=AUTH)).status_code == 404


async def test_store_ingests_and_finds_english_and_chinese(kb: AppClient) -> None:
    en = await upload(kb, "refunds.md", b"# Refunds\n\nRefunds are processed within 14 days.")
    zh = await upload(kb, "shipping.txt", "发货政策, 订单在三个工作日内发货。".encode())
    r = await kb.post(
        "/v1/vector_stores",
        json={"name": "support", "file_ids": [en["id"], zh["id"]]},
        headers=AUTH,
    )
    store = r.json()
    assert store["status"] == "in_progress"
    assert store["file_counts"]["total"] == 2
    assert (await indexed(kb, store["id"], en["id"]))["status"] == "completed"
    assert (await indexed(kb, store["id"], zh["id"]))["status"] == "completed"
    hits = (
        await kb.post(
            f"/v1/vector_stores/{store['id']}/search", json={"query": "工作日 发货"}, headers=AUTH
        )
    ).json()
    assert hits["object"] == "vector_store.search_results.page"
    assert hits["data"][0]["filename"] == "shipping.txt"
    hits = (
        await kb.post(
            f"/v1/vector_stores/{store['id']}/search",
            json={"query": "refunds processed"},
            headers=AUTH,
        )
    ).json()
    assert hits["data"][0]["filename"] == "refunds.md"
    assert 0 <= hits["data"][0]["score"] <= 1
    done = (await kb.get(f"/v1/vector_stores/{store['id']}", headers=AUTH)).json()
    assert done["status"] == "completed"
    assert done["file_counts"]["completed"] == 2
    assert done["usage_bytes"] > 0


async def test_filters_on_attributes_narrow_the_search(kb: AppClient) -> None:
    a = await upload(kb, "a.txt", b"The warranty lasts two years.")
    b = await upload(kb, "b.txt", b"The warranty lasts one year.")
    store = (await kb.post("/v1/vector_stores", json={}, headers=AUTH)).json()["id"]
    for f, region in ((a, "eu"), (b, "us")):
        r = await kb.post(
            f"/v1/vector_stores/{store}/files",
            json={"file_id": f["id"], "attributes": {"region": region, "year": 2026}},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        await indexed(kb, store, f["id"])
    search = f"/v1/vector_stores/{store}/search"
    only_us = {"query": "warranty", "filters": {"type": "eq", "key": "region", "value": "us"}}
    hits = (await kb.post(search, json=only_us, headers=AUTH)).json()["data"]
    assert [h["filename"] for h in hits] == ["b.txt"]
    assert hits[0]["attributes"] == {"region": "us", "year": 2026}
    both = {
        "query": "warranty",
        "filters": {
            "type": "and",
            "filters": [
                {"type": "in", "key": "region", "value": ["eu", "us"]},
                {"type": "gte", "key": "year", "value": 2026},
            ],
        },
    }
    assert len((await kb.post(search, json=both, headers=AUTH)).json()["data"]) == 2
    none = {"query": "warranty", "filters": {"type": "lt", "key": "year", "value": 2000}}
    assert (await kb.post(search, json=none, headers=AUTH)).json()["data"] == []
    high = {"query": "warranty", "ranking_options": {"score_threshold": 1.01}}
    assert (await kb.post(search, json=high, headers=AUTH)).json()["data"] == []


async def test_another_key_gets_404_for_what_it_does_not_own(kb: AppClient) -> None:
    alice, bob = await new_key(kb), await new_key(kb)
    f = await upload(kb, "secret.txt", b"the launch code is 1234", headers=alice)
    store = (await kb.post("/v1/vector_stores", json={"file_ids": [f["id"]]}, headers=alice)).json()
    await indexed(kb, store["id"], f["id"], headers=alice)
    for method, path, body in (
        ("GET", f"/v1/files/{f['id']}", None),
        ("GET", f"/v1/files/{f['id']}/content", None),
        ("DELETE", f"/v1/files/{f['id']}", None),
        ("GET", f"/v1/vector_stores/{store['id']}", None),
        ("POST", f"/v1/vector_stores/{store['id']}/search", {"query": "launch code"}),
        ("POST", f"/v1/vector_stores/{store['id']}/files", {"file_id": f["id"]}),
        ("DELETE", f"/v1/vector_stores/{store['id']}", None),
    ):
        r = await kb.request(method, path, json=body, headers=bob)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert (await kb.get("/v1/files", headers=bob)).json()["data"] == []
    assert (await kb.get("/v1/vector_stores", headers=bob)).json()["data"] == []
    # bob cannot put alice's file into his own store either
    own = (await kb.post("/v1/vector_stores", json={}, headers=bob)).json()["id"]
    r = await kb.post(f"/v1/vector_stores/{own}/files", json={"file_id": f["id"]}, headers=bob)
    assert r.status_code == 404
    # the owner and the master key see it
    assert (await kb.get(f"/v1/files/{f['id']}", headers=alice)).status_code == 200
    assert (await kb.get(f"/v1/vector_stores/{store['id']}", headers=AUTH)).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"data": {"purpose": "assistants"}}, 400, "file"),
        ({"files": {"file": ("a.txt", b"x")}}, 400, "purpose"),
        ({"files": {"file": ("a.txt", b"x")}, "data": {"purpose": "nonsense"}}, 400, "purpose"),
        ({"json": {"file": "x", "purpose": "assistants"}}, 400, "file"),
        ({"files": {"file": ("", b"x")}, "data": {"purpose": "assistants"}}, 400, "file"),
    ],
)
async def test_malformed_uploads_are_openai_shaped_400s(
    kb: AppClient, kwargs: dict[str, Any], status: int, param: str
) -> None:
    r = await kb.post("/v1/files", headers=AUTH, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_an_upload_over_the_limit_is_413(database_url: str) -> None:
    app = create_app(Gateway.from_config(config(database_url, max_file_mb=1)))
    async with AppClient(app) as c:
        r = await c.post(
            "/v1/files",
            files={"file": ("big.txt", b"x" * (1024 * 1024 + 10))},
            data={"purpose": "assistants"},
            headers=AUTH,
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"


async def test_unknown_ids_and_bad_bodies_are_404_and_400(kb: AppClient) -> None:
    assert (await kb.get("/v1/files/file-nope", headers=AUTH)).status_code == 404
    assert (await kb.get("/v1/vector_stores/vs_nope", headers=AUTH)).status_code == 404
    r = await kb.post("/v1/vector_stores", json={"file_ids": ["file-nope"]}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "file_id"
    store = (await kb.post("/v1/vector_stores", json={}, headers=AUTH)).json()["id"]
    bad = [
        {"query": ""},
        {"query": "x", "max_num_results": 0},
        {"query": "x", "filters": {"type": "near", "key": "a", "value": 1}},
        {"nope": 1},
    ]
    for body in bad:
        r = await kb.post(f"/v1/vector_stores/{store}/search", json=body, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
    r = await kb.post(
        "/v1/vector_stores",
        json={
            "chunking_strategy": {
                "type": "static",
                "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0},
            },
            "file_ids": [(await upload(kb, "a.txt", b"x"))["id"]],
        },
        headers=AUTH,
    )
    assert r.status_code == 400
    assert "max_chunk_size_tokens" in r.json()["error"]["param"]
    r = await kb.post(
        "/v1/vector_stores", json={"metadata": {f"k{i}": "v" for i in range(17)}}, headers=AUTH
    )
    assert r.status_code == 400


async def test_a_file_that_is_not_text_fails_with_last_error(kb: AppClient) -> None:
    f = await upload(kb, "photo.png", bytes(range(256)) * 8)
    store = (await kb.post("/v1/vector_stores", json={"file_ids": [f["id"]]}, headers=AUTH)).json()
    row = await indexed(kb, store["id"], f["id"])
    assert row["status"] == "failed"
    assert row["last_error"]["code"] == "unsupported_file"
    counts = (await kb.get(f"/v1/vector_stores/{store['id']}", headers=AUTH)).json()["file_counts"]
    assert counts["failed"] == 1


async def test_batches_count_their_files_and_list_them(kb: AppClient) -> None:
    ids = [(await upload(kb, f"f{i}.txt", f"document number {i}".encode()))["id"] for i in range(3)]
    store = (await kb.post("/v1/vector_stores", json={}, headers=AUTH)).json()["id"]
    batch = (
        await kb.post(
            f"/v1/vector_stores/{store}/file_batches", json={"file_ids": ids}, headers=AUTH
        )
    ).json()
    assert batch["object"] == "vector_store.files_batch"
    assert batch["file_counts"]["total"] == 3
    path = f"/v1/vector_stores/{store}/file_batches/{batch['id']}"

    async def finished() -> bool:
        return bool((await kb.get(path, headers=AUTH)).json()["status"] == "completed")

    for _ in range(200):
        if await finished():
            break
        await __import__("asyncio").sleep(0.05)
    listed = (await kb.get(f"{path}/files", headers=AUTH)).json()
    assert sorted(x["id"] for x in listed["data"]) == sorted(ids)
    page = (await kb.get(f"/v1/vector_stores/{store}/files?limit=2&order=asc", headers=AUTH)).json()
    assert len(page["data"]) == 2
    assert page["has_more"] is True
    rest = (
        await kb.get(
            f"/v1/vector_stores/{store}/files?limit=2&order=asc&after={page['last_id']}",
            headers=AUTH,
        )
    ).json()
    assert len(rest["data"]) == 1
    assert rest["has_more"] is False


async def test_adding_a_file_again_indexes_it_once(kb: AppClient) -> None:
    f = await upload(kb, "a.txt", b"unique phrase zebra crossing")
    store = (await kb.post("/v1/vector_stores", json={"file_ids": [f["id"]]}, headers=AUTH)).json()[
        "id"
    ]
    await indexed(kb, store, f["id"])
    await kb.post(f"/v1/vector_stores/{store}/files", json={"file_id": f["id"]}, headers=AUTH)
    await indexed(kb, store, f["id"])
    hits = (
        await kb.post(f"/v1/vector_stores/{store}/search", json={"query": "zebra"}, headers=AUTH)
    ).json()
    assert len(hits["data"]) == 1


async def test_deleting_a_file_takes_it_out_of_its_stores(kb: AppClient) -> None:
    f = await upload(kb, "a.txt", b"unique phrase zebra crossing")
    store = (await kb.post("/v1/vector_stores", json={"file_ids": [f["id"]]}, headers=AUTH)).json()[
        "id"
    ]
    await indexed(kb, store, f["id"])
    await kb.delete(f"/v1/files/{f['id']}", headers=AUTH)
    hits = (
        await kb.post(f"/v1/vector_stores/{store}/search", json={"query": "zebra"}, headers=AUTH)
    ).json()
    assert hits["data"] == []
    assert (await kb.get(f"/v1/vector_stores/{store}", headers=AUTH)).json()["file_counts"][
        "total"
    ] == 0


async def test_the_quota_per_key_is_413(database_url: str) -> None:
    app = create_app(Gateway.from_config(config(database_url, quota_mb_per_key=1)))
    async with AppClient(app) as c:
        key = await new_key(c)
        await upload(c, "a.txt", b"x" * 700_000, headers=key)
        r = await c.post(
            "/v1/files",
            files={"file": ("b.txt", b"x" * 700_000)},
            data={"purpose": "assistants"},
            headers=key,
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "storage_quota_exceeded"
        await upload(c, "c.txt", b"x" * 700_000)  # the master key has no quota


async def test_ingestion_shows_in_the_metrics(kb: AppClient) -> None:
    f = await upload(kb, "a.txt", b"some words to index")
    store = (await kb.post("/v1/vector_stores", json={"file_ids": [f["id"]]}, headers=AUTH)).json()
    await indexed(kb, store["id"], f["id"])
    text = (await kb.get("/metrics")).text
    assert 'clawbot_knowledge_files_ingested_total{outcome="completed"} 1.0' in text
    assert "clawbot_knowledge_chunks_indexed_total 1.0" in text
