"""The knowledge base as users meet it: the official `openai` SDK against a real server
process with the embedded chat and embedding models: files, vector stores and their polling
helpers, search in English and Chinese, file_search through Responses, a knowledge-bound model
through chat, ownership between keys, and a process killed in the middle of ingesting."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serving import Server, serve

KEY = "sk-test-knowledge-master"
CHAT = "smollm2"
EMBEDDER = "minilm"
DOCS = {
    "refunds.md": "# Refunds\n\nOnce a returned item arrives, the money is paid back to the "
    "original card within 14 days. Gift cards cannot be refunded.",
    "shipping.md": "# Shipping\n\nStandard orders leave the warehouse within three business "
    "days. Express delivery arrives the next working day.",
    "售后.txt": "售后服务：笔记本电脑享受两年保修。摔坏或进水造成的损坏不在保修范围内。",  # noqa: RUF001 (Chinese punctuation)
    "发票.txt": "发票：每次付款后都会通过邮件发送电子发票，可以在账单资料中添加公司税号。",  # noqa: RUF001 (Chinese punctuation)
}


def config(extra_models: list[dict[str, Any]] | None = None, **knowledge: Any) -> dict[str, Any]:
    return {
        "model_server": {"host": "127.0.0.1", "timeout": 120_000},
        "auth": {"api_key": KEY},
        "logging": {"level": "INFO"},
        "models": [
            {
                "id": CHAT,
                "backend": "llamacpp:embedded",
                "context_length": 2048,
                "options": {"n_threads": 1},
                "params": {"temperature": 0, "max_tokens": 48},
            },
            {"id": EMBEDDER, "backend": "llamacpp:all-minilm-l6-v2"},
            *(extra_models or []),
        ],
        "knowledge": {"embedding_model": EMBEDDER, **knowledge},
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knowledge")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[Server]:
    with serve(config(), workdir / "main", timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def store(sdk: OpenAI) -> str:
    """A store holding DOCS, built with the SDK's polling helpers."""
    vs = sdk.vector_stores.create(name="support", metadata={"team": "cs"})
    first, *rest = DOCS.items()
    done = sdk.vector_stores.files.upload_and_poll(
        vector_store_id=vs.id, file=(first[0], io.BytesIO(first[1].encode())), poll_interval_ms=100
    )
    assert done.status == "completed", done.last_error
    uploaded = [
        sdk.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants")
        for name, text in rest
    ]
    batch = sdk.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, file_ids=[f.id for f in uploaded], poll_interval_ms=100
    )
    assert batch.status == "completed"
    assert batch.file_counts.completed == len(rest)
    return vs.id


def test_a_store_is_built_and_described_with_the_sdk(sdk: OpenAI, store: str) -> None:
    vs = sdk.vector_stores.retrieve(store)
    assert vs.status == "completed"
    assert vs.file_counts.completed == len(DOCS)
    assert vs.metadata == {"team": "cs"}
    files = list(sdk.vector_stores.files.list(vector_store_id=store))
    assert {f.status for f in files} == {"completed"}
    assert all(f.chunking_strategy is not None for f in files)
    names = {f.filename for f in sdk.files.list()}
    assert set(DOCS) <= names


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("when will I get my money back", "refunds.md"),
        ("how soon does an order leave the depot", "shipping.md"),
        ("笔记本电脑保修多久", "售后.txt"),
        ("发票上怎么添加税号", "发票.txt"),
    ],
)
def test_search_finds_the_document_in_english_and_chinese(
    sdk: OpenAI, store: str, query: str, expected: str
) -> None:
    page = sdk.vector_stores.search(vector_store_id=store, query=query, max_num_results=3)
    hits = list(page)
    assert hits[0].filename == expected, [(h.filename, h.score) for h in hits]
    assert 0 < hits[0].score <= 1
    assert hits[0].content[0].type == "text"


def test_file_search_through_responses_cites_the_file(sdk: OpenAI, store: str) -> None:
    response = sdk.responses.create(
        model=CHAT,
        input="How many days until a refund is paid back?",
        tools=[{"type": "file_search", "vector_store_ids": [store], "max_num_results": 2}],
        include=["file_search_call.results"],
    )
    search, message = response.output[0], response.output[-1]
    assert search.type == "file_search_call"
    assert search.status == "completed"
    assert search.results is not None
    assert search.results[0].filename == "refunds.md"
    assert message.type == "message"
    annotations = message.content[0].annotations
    assert any(a.type == "file_citation" and a.filename == "refunds.md" for a in annotations)
    assert response.output_text  # the model answered


def test_file_search_streams_through_the_sdk(sdk: OpenAI, store: str) -> None:
    events = list(
        sdk.responses.create(
            model=CHAT,
            input="When do standard orders ship?",
            tools=[{"type": "file_search", "vector_store_ids": [store]}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert "response.file_search_call.completed" in kinds
    assert "response.output_text.annotation.added" in kinds
    # completed, or incomplete when the answer reached max_tokens
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output[0].type == "file_search_call"


def test_a_knowledge_bound_model_grounds_unchanged_chat_clients(
    sdk: OpenAI, server: Server, store: str, workdir: Path
) -> None:
    bound = {
        "id": "support-bot",
        "base": CHAT,
        "system_prompt": "You are the support desk of an online shop.",
        "knowledge": {"vector_store_ids": [store], "max_results": 2},
    }
    config_path = workdir / "main" / "clawbot.json"
    current = json.loads(config_path.read_text())
    current["models"].append(bound)
    config_path.write_text(json.dumps(current))
    r = httpx.post(
        f"{server.root}/admin/reload", headers={"authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    raw = sdk.chat.completions.with_raw_response.create(
        model="support-bot",
        messages=[{"role": "user", "content": "How long does a refund take?"}],
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert "refunds.md" in raw.headers["x-clawbot-sources"]
    extra = completion.model_extra or {}
    assert extra["sources"][0]["filename"] == "refunds.md"


def test_another_key_cannot_see_or_search_the_store(
    sdk: OpenAI, server: Server, store: str
) -> None:
    made = httpx.post(
        f"{server.root}/admin/keys",
        json={"name": "other tenant"},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    with OpenAI(base_url=server.base_url, api_key=made.json()["key"], max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.retrieve(store)
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.search(vector_store_id=store, query="refund")
        assert list(other.vector_stores.list()) == []
        assert [f for f in other.files.list()] == []
        with pytest.raises(openai.NotFoundError):
            other.responses.create(
                model=CHAT,
                input="refunds?",
                tools=[{"type": "file_search", "vector_store_ids": [store]}],
            )


def test_bad_uploads_and_ids_are_openai_errors(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("a.txt", io.BytesIO(b"x")), purpose="nonsense")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("file-missing")
    with pytest.raises(openai.NotFoundError):
        sdk.vector_stores.files.create(vector_store_id="vs_missing", file_id="file-missing")


def test_a_process_killed_while_ingesting_loses_and_duplicates_nothing(workdir: Path) -> None:
    folder = workdir / "restart"
    models = [{"id": "slow-embedder", "backend": "mock:", "options": {"embed_delay_ms": 150}}]
    settings = config(models, embedding_model="slow-embedder", lease_s=2, workers=2)
    settings["models"] = models  # the mock alone: this test is about the queue, not the model
    count = 50
    with (
        serve(settings, folder, timeout_s=60) as first,
        OpenAI(base_url=first.base_url, api_key=KEY, max_retries=0) as client,
    ):
        ids = [
            client.files.create(
                file=(f"doc{i}.txt", io.BytesIO(f"document {i} token{i:03d}".encode())),
                purpose="assistants",
            ).id
            for i in range(count)
        ]
        vs = client.vector_stores.create(name="restart")
        client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
        deadline = time.monotonic() + 30
        while client.vector_stores.retrieve(vs.id).file_counts.completed < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = client.vector_stores.retrieve(vs.id).file_counts
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    assert before.in_progress > 0, before  # killed half-way, not after the last file
    with (
        serve(settings, folder, timeout_s=60) as second,
        OpenAI(base_url=second.base_url, api_key=KEY, max_retries=0) as client,
    ):
        deadline = time.monotonic() + 60
        while (counts := client.vector_stores.retrieve(vs.id).file_counts).in_progress:
            assert time.monotonic() < deadline, counts
            time.sleep(0.1)
        assert counts.completed == count, counts
        for i in (0, 17, count - 1):
            hits = list(client.vector_stores.search(vector_store_id=vs.id, query=f"token{i:03d}"))
            assert hits[0].filename == f"doc{i}.txt"
    database = sqlite3.connect(folder / "clawbot.db")
    per_file = database.execute(
        "SELECT file_id, count(*) FROM chunks WHERE store_id = ? GROUP BY file_id", (vs.id,)
    ).fetchall()
    assert len(per_file) == count
    assert {n for _, n in per_file} == {1}  # each file's one chunk, once
    (indexed,) = database.execute(
        "SELECT count(*) FROM chunks WHERE store_id = ? AND length(lexicon) > 0", (vs.id,)
    ).fetchone()
    assert indexed == count  # every chunk carries its full-text terms


def test_answers_validate_against_openais_spec(server: Server, store: str) -> None:
    from compat_tests.openapi_schema import validate

    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=120) as http:
        files = http.get("/files").json()
        validate("ListFilesResponse", files)
        validate("OpenAIFile", http.get(f"/files/{files['data'][0]['id']}").json())
        validate("VectorStoreObject", http.get(f"/vector_stores/{store}").json())
        validate("ListVectorStoresResponse", http.get("/vector_stores").json())
        listed = http.get(f"/vector_stores/{store}/files").json()
        validate("ListVectorStoreFilesResponse", listed)
        validate("VectorStoreFileObject", listed["data"][0])
        page = http.post(f"/vector_stores/{store}/search", json={"query": "refund"}).json()
        validate("VectorStoreSearchResultsPage", page)
        body = {
            "model": CHAT,
            "input": "refunds?",
            "tools": [{"type": "file_search", "vector_store_ids": [store]}],
            "include": ["file_search_call.results"],
            "max_output_tokens": 16,
        }
        validate("Response", http.post("/responses", json=body).json())
