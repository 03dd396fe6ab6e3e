"""POST /v1/embeddings through the official SDK; float bodies checked by spec, base64 by hand."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import EMBEDDED, PASSTHROUGH, UPSTREAM, json_body

MODELS = [EMBEDDED, UPSTREAM, PASSTHROUGH]
TOLERANCE = 1e-5


def embed_floats(client: OpenAI, **kwargs: Any) -> dict[str, Any]:
    """The raw JSON of a float embedding response, validated."""
    raw = client.embeddings.with_raw_response.create(encoding_format="float", **kwargs)
    assert raw.headers.get("x-request-id")
    body = json_body(raw)
    validate("CreateEmbeddingResponse", body)
    return body


def decoded(body: dict[str, Any]) -> dict[str, Any]:
    """A base64 embedding response with its vectors decoded, validated like a float one.

    The spec's CreateEmbeddingResponse only allows float arrays, so each base64 string is
    checked to be little-endian float32 and replaced by its floats before validation.
    """
    data = []
    for item in body["data"]:
        assert isinstance(item["embedding"], str), item
        raw = base64.b64decode(item["embedding"], validate=True)
        assert len(raw) % 4 == 0
        data.append({**item, "embedding": np.frombuffer(raw, dtype="<f4").tolist()})
    result = {**body, "data": data}
    validate("CreateEmbeddingResponse", result)
    return result


def vectors(body: dict[str, Any]) -> list[list[float]]:
    """The vectors of a response, checking they come in input order."""
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    assert all(item["object"] == "embedding" for item in body["data"])
    return [item["embedding"] for item in body["data"]]


def close(a: list[float], b: list[float], tolerance: float = TOLERANCE) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, atol=tolerance, rtol=0))


def check_usage(body: dict[str, Any]) -> None:
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"]


@pytest.mark.parametrize("model", MODELS)
def test_single_string(client: OpenAI, model: str) -> None:
    body = embed_floats(client, model=model, input="The quick brown fox")
    assert body["object"] == "list"
    assert body["model"] == model
    [vector] = vectors(body)
    assert len(vector) > 0
    assert all(math.isfinite(x) for x in vector)
    assert any(x != 0 for x in vector)
    check_usage(body)


@pytest.mark.parametrize("model", MODELS)
def test_list_in_input_order(client: OpenAI, model: str) -> None:
    texts = ["alpha particle", "beta decay", "alpha particle", "gamma ray burst"]
    body = embed_floats(client, model=model, input=texts)
    found = vectors(body)
    assert len(found) == len(texts)
    assert len({len(v) for v in found}) == 1
    assert close(found[0], found[2])
    assert not close(found[0], found[1], 1e-3)
    check_usage(body)
    alone = vectors(embed_floats(client, model=model, input=texts[1]))[0]
    assert close(alone, found[1])


@pytest.mark.parametrize("model", MODELS)
def test_token_arrays(client: OpenAI, model: str) -> None:
    one = embed_floats(client, model=model, input=[9906, 1917, 0])
    assert len(vectors(one)) == 1
    check_usage(one)
    many = embed_floats(
        client, model=model, input=[[9906, 1917, 0], [40, 1093, 499], [9906, 1917, 0]]
    )
    found = vectors(many)
    assert len(found) == 3
    assert close(found[0], vectors(one)[0])
    assert close(found[0], found[2])
    assert not close(found[0], found[1], 1e-3)
    check_usage(many)


@pytest.mark.parametrize("model", MODELS)
def test_base64_matches_float(client: OpenAI, model: str) -> None:
    texts = ["first input", "second input"]
    floats = embed_floats(client, model=model, input=texts)
    raw = client.embeddings.with_raw_response.create(
        model=model, input=texts, encoding_format="base64"
    )
    body = decoded(json_body(raw))
    assert body["model"] == model
    assert body["usage"] == floats["usage"]
    for got, want in zip(vectors(body), vectors(floats), strict=True):
        assert close(got, want)
    # Asked for base64 explicitly, the SDK hands the strings over as they came.
    parsed = raw.parse()
    assert [item.embedding for item in parsed.data] == [
        item["embedding"] for item in json_body(raw)["data"]
    ]


@pytest.mark.parametrize("model", MODELS)
def test_sdk_default_requests_base64_and_decodes_it(client: OpenAI, model: str) -> None:
    floats = vectors(embed_floats(client, model=model, input="default encoding"))
    raw = client.embeddings.with_raw_response.create(model=model, input="default encoding")
    body = json_body(raw)
    assert isinstance(body["data"][0]["embedding"], str)
    assert close(vectors(decoded(body))[0], floats[0])
    response = client.embeddings.create(model=model, input="default encoding")
    assert close(list(response.data[0].embedding), floats[0])
    assert response.usage.prompt_tokens > 0


async def test_async(aclient: AsyncOpenAI) -> None:
    for model in MODELS:
        raw = await aclient.embeddings.with_raw_response.create(
            model=model, input=["one", "two"], encoding_format="float"
        )
        body = json_body(raw)
        validate("CreateEmbeddingResponse", body)
        response = await aclient.embeddings.create(model=model, input=["one", "two"])
        for item, want in zip(response.data, vectors(body), strict=True):
            assert close(list(item.embedding), want)
