"""POST /v1/rerank and /v1/fim/completions on a real server, over plain HTTP (no OpenAI SDK has
them). Rerank runs on the embedded model (embedding similarity) and through the upstream
gateway's own /v1/rerank (pass-through); FIM runs on the upstream's mock, which echoes the
suffix, so the suffix is seen to cross the HTTP backend."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from compat_tests.openapi_schema import validate
from compat_tests.support import EMBEDDED, PASSTHROUGH, UPSTREAM, chat_events, chat_text

QUERY = "The cat sat on the mat."
DOCUMENTS = [
    "Stock markets fell sharply on Monday.",
    "A recipe for tomato soup with basil.",
    QUERY,
    "Dogs like to chase balls in the park.",
]
PROMPT = "def add(a, b):"
SUFFIX = "return c"


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers.get("x-request-id")
    answer: dict[str, Any] = response.json()
    return answer


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_rerank_puts_the_identical_document_first(http: httpx.Client, model: str) -> None:
    body = post(
        http,
        "/v1/rerank",
        {"model": model, "query": QUERY, "documents": DOCUMENTS, "return_documents": True},
    )
    assert body["model"] == model
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert results[0]["index"] == 2
    assert results[0]["document"] == {"text": QUERY}
    assert results[0]["relevance_score"] == pytest.approx(1.0, abs=1e-6)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert scores[1] < 0.9999
    assert body["data"] == results
    assert body["usage"]["prompt_tokens"] > 0


def test_rerank_top_n_unversioned(http: httpx.Client) -> None:
    body = post(http, "/rerank", {"model": EMBEDDED, "query": QUERY, "documents": DOCUMENTS})
    cut = post(
        http, "/rerank", {"model": EMBEDDED, "query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    )
    assert [r["index"] for r in cut["results"]] == [r["index"] for r in body["results"][:2]]
    assert all("document" not in r for r in cut["results"])


def test_rerank_error_has_openai_shape(http: httpx.Client) -> None:
    response = http.post("/v1/rerank", json={"model": EMBEDDED, "query": QUERY, "documents": []})
    assert response.status_code == 400
    body = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["param"] == "documents"


@pytest.mark.parametrize("model", [UPSTREAM, PASSTHROUGH])
def test_fim_suffix_reaches_the_model(http: httpx.Client, model: str) -> None:
    body = post(
        http,
        "/v1/fim/completions",
        {"model": model, "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 50},
    )
    validate("CreateChatCompletionResponse", body)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == f"You said: {PROMPT} before: {SUFFIX}"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("model", [UPSTREAM, PASSTHROUGH])
def test_fim_stream_honours_stop(http: httpx.Client, model: str) -> None:
    request = {"model": model, "prompt": PROMPT, "suffix": SUFFIX, "stop": ["before"]}
    with http.stream("POST", "/fim/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = chat_events(response.iter_lines())
    assert chat_text(events) == f"You said: {PROMPT} "
    assert all(len(event["choices"]) == 1 for event in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert json.dumps(events).count('"usage"') == 1
