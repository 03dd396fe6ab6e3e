"""GET /v1/models, and errors: typed SDK exceptions over bodies that match ErrorResponse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    EMBEDDED,
    EMBEDDED_ALIAS,
    FLAKY,
    MAX_BODY_BYTES,
    PASSTHROUGH,
    UPSTREAM,
    Server,
    chat_events,
    error_body,
    json_body,
)

USER = [{"role": "user", "content": "Hello"}]


def raw_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` of a raw error response, checked: status, ErrorResponse, x-request-id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    validate("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    return error


def test_list_models(client: OpenAI) -> None:
    raw = client.models.with_raw_response.list()
    assert raw.headers.get("x-request-id")
    body = json_body(raw)
    validate("ListModelsResponse", body)
    ids = [model["id"] for model in body["data"]]
    assert {EMBEDDED, UPSTREAM, PASSTHROUGH} <= set(ids)
    assert EMBEDDED_ALIAS not in ids
    assert len(ids) == len(set(ids))
    for model in body["data"]:
        validate("Model", model)
        assert model["object"] == "model"
    assert [model.id for model in raw.parse()] == ids


@pytest.mark.parametrize("name", [EMBEDDED, EMBEDDED_ALIAS])
def test_retrieve_by_id_and_alias(client: OpenAI, name: str) -> None:
    raw = client.models.with_raw_response.retrieve(name)
    body = json_body(raw)
    validate("Model", body)
    assert body["id"] == EMBEDDED
    assert raw.parse().id == EMBEDDED


async def test_retrieve_async(aclient: AsyncOpenAI) -> None:
    raw = await aclient.models.with_raw_response.retrieve(UPSTREAM)
    body = json_body(raw)
    validate("Model", body)
    assert body["id"] == UPSTREAM
    page = await aclient.models.list()
    assert UPSTREAM in [model.id async for model in page]


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert error_body(caught.value, 404)["code"] == "model_not_found"


UNKNOWN_MODEL_CALLS: dict[str, Callable[[OpenAI], object]] = {
    "chat": lambda c: c.chat.completions.create(model="no-such-model", messages=USER),
    "completions": lambda c: c.completions.create(model="no-such-model", prompt="hi"),
    "embeddings": lambda c: c.embeddings.create(model="no-such-model", input="hi"),
}


@pytest.mark.parametrize("endpoint", UNKNOWN_MODEL_CALLS)
def test_unknown_model_in_a_request_is_not_found(client: OpenAI, endpoint: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        UNKNOWN_MODEL_CALLS[endpoint](client)
    error = error_body(caught.value, 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_wrong_key_is_an_authentication_error(client: OpenAI) -> None:
    wrong = client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=EMBEDDED, messages=USER)
    assert error_body(caught.value, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    error_body(caught.value, 401)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.embeddings.create(model=UPSTREAM, input="hi")
    error_body(caught.value, 401)


def test_wrong_key_hides_whether_a_model_exists(client: OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client.with_options(api_key="sk-wrong").models.retrieve("no-such-model")
    error_body(caught.value, 401)


async def test_wrong_key_async(server: Server) -> None:
    async with AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model=UPSTREAM, messages=USER)
    error_body(caught.value, 401)


def test_missing_key_is_401(server: Server) -> None:
    with httpx.Client(base_url=server.origin) as anonymous:
        response = anonymous.get("/v1/models")
    raw_error(response, 401)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": openai.omit}, "messages"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ],
)
def test_bad_chat_request_names_the_param(
    client: OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBEDDED, **kwargs)
    error = error_body(caught.value, 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"input": openai.omit}, "input"), ({"input": 42}, "input"), ({"input": []}, "input")],
)
def test_bad_embedding_request_names_the_param(
    client: OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=UPSTREAM, encoding_format="float", **kwargs)
    assert error_body(caught.value, 400)["param"] == param


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2, 3]"])
def test_invalid_json_body_is_400(http: httpx.Client, body: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    raw_error(response, 400)


def test_body_over_the_limit_is_413(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=UPSTREAM, prompt="x" * (MAX_BODY_BYTES + 1), max_tokens=1)
    assert error_body(caught.value, 413)["code"] == "request_too_large"


def test_body_just_under_the_limit_is_served(client: OpenAI) -> None:
    prompt = "word " * ((MAX_BODY_BYTES - 1_000) // 5)
    completion = client.completions.create(model=UPSTREAM, prompt=prompt, max_tokens=1)
    assert completion.choices[0].finish_reason == "length"


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    raw_error(http.get("/v1/no-such-route"), 404)
    raw_error(http.get("/v1/chat/completions"), 405)


@pytest.mark.parametrize("prefix", ["", "/v1", "//v1", "/v1/"])
def test_paths_without_v1_or_with_doubled_slashes(http: httpx.Client, prefix: str) -> None:
    models = http.get(f"{prefix}/models")
    assert models.status_code == 200, models.text
    validate("ListModelsResponse", models.json())
    model = http.get(f"{prefix}/models/{EMBEDDED}")
    assert model.status_code == 200, model.text
    validate("Model", model.json())
    chat = http.post(
        f"{prefix}/chat/completions",
        json={"model": UPSTREAM, "messages": USER, "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text
    validate("CreateChatCompletionResponse", chat.json())
    embeddings = http.post(
        f"{prefix}/embeddings", json={"model": UPSTREAM, "input": "hi", "encoding_format": "float"}
    )
    assert embeddings.status_code == 200, embeddings.text
    validate("CreateEmbeddingResponse", embeddings.json())
    with http.stream(
        "POST",
        f"{prefix}/completions",
        json={"model": FLAKY, "prompt": "a b", "max_tokens": 2, "stream": True},
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"


def test_client_request_id_is_echoed(http: httpx.Client) -> None:
    ok = http.get("/v1/models", headers={"x-request-id": "compat-ok-1"})
    assert ok.headers["x-request-id"] == "compat-ok-1"
    failed = http.get("/v1/models/no-such-model", headers={"x-request-id": "compat-err-1"})
    raw_error(failed, 404)
    assert failed.headers["x-request-id"] == "compat-err-1"


def test_streamed_request_errors_before_the_first_byte_are_plain_errors(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBEDDED, messages=USER, n=2, stream=True)
    assert error_body(caught.value, 400)["param"] == "n"
    with client.chat.completions.with_streaming_response.create(
        model=UPSTREAM, messages=USER, stream=True
    ) as response:
        assert chat_events(response.iter_lines())


LONG_TEXT = "word " * 4_000  # about 4,000 tokens: twice the embedded model's context


def test_chat_prompt_over_the_context_window(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=EMBEDDED, messages=[{"role": "user", "content": LONG_TEXT}], max_tokens=4
        )
    error = error_body(caught.value, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"


def test_completion_prompt_over_the_context_window(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=EMBEDDED, prompt=LONG_TEXT, max_tokens=4)
    error = error_body(caught.value, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"


def test_embedding_input_over_the_context_window(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDED, input=LONG_TEXT, encoding_format="float")
    error = error_body(caught.value, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "input"


@pytest.mark.parametrize("model", [EMBEDDED, UPSTREAM])
def test_empty_completion_prompt_is_not_a_server_error(client: OpenAI, model: str) -> None:
    raw = client.completions.with_raw_response.create(model=model, prompt="", max_tokens=4)
    validate("CreateCompletionResponse", json_body(raw))


@pytest.mark.parametrize(
    ("model", "kwargs", "param"),
    [
        (EMBEDDED, {"n": 2}, "n"),
        (
            EMBEDDED,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "n",
                        "strict": True,
                        "schema": {"type": "integer", "minimum": 1},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        (UPSTREAM, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (
            UPSTREAM,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}
                        ],
                    }
                ]
            },
            "messages[0].content",
        ),
    ],
)
def test_unsupported_features_are_bad_requests(
    client: OpenAI, model: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": model, "messages": USER, **kwargs})
    error = error_body(caught.value, 400)
    assert error["param"] == param
    expected = (
        "invalid_json_schema" if param.startswith("response_format") else "unsupported_parameter"
    )
    assert error["code"] == expected
