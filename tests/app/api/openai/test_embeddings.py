"""POST /v1/embeddings on the mock backend."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from app.tokens import cl100k
from tests.conftest import AUTH, AppClient


async def embed(client: AppClient, **body: Any) -> Any:
    r = await client.post("/v1/embeddings", json={"model": "mock", **body}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def test_single_string(client: AppClient) -> None:
    body = await embed(client, input="hello")
    assert body["object"] == "list"
    assert body["model"] == "mock"
    assert body["data"][0]["object"] == "embedding"
    assert body["data"][0]["index"] == 0
    vector = body["data"][0]["embedding"]
    assert len(vector) == 16
    assert abs(sum(v * v for v in vector) - 1) < 1e-6
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


async def test_list_keeps_input_order(client: AppClient) -> None:
    many = await embed(client, input=["a", "b", "a"])
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    single_b = await embed(client, input="b")
    assert many["data"][1]["embedding"] == single_b["data"][0]["embedding"]
    assert many["data"][0]["embedding"] == many["data"][2]["embedding"]


async def test_token_arrays_are_cl100k_text(client: AppClient) -> None:
    ids = cl100k().encode("hello world")
    by_text = await embed(client, input="hello world")
    by_ids = await embed(client, input=ids)
    by_lists = await embed(client, input=[ids, ids])
    assert by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]
    assert by_lists["data"][1]["embedding"] == by_text["data"][0]["embedding"]


async def test_base64_matches_floats(client: AppClient) -> None:
    floats = (await embed(client, input="x"))["data"][0]["embedding"]
    encoded = (await embed(client, input="x", encoding_format="base64"))["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats, rel=1e-6)


@pytest.mark.parametrize(
    "bad", ["", [], [""], [1.5], [[1, 2], "a"], [[]], {"text": "a"}, [10**9], [-1]]
)
async def test_bad_input_is_400(client: AppClient, bad: Any) -> None:
    r = await client.post("/v1/embeddings", json={"model": "mock", "input": bad}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"


async def test_bad_encoding_format(client: AppClient) -> None:
    r = await client.post(
        "/v1/embeddings",
        json={"model": "mock", "input": "a", "encoding_format": "hex"},
        headers=AUTH,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "encoding_format"
