"""The OpenAPI validator accepts what OpenAI's spec allows and rejects what it does not."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from compat_tests.openapi_schema import _normalize, _spec, _spec_path, schema_names, validate

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
}
CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "m",
    "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}
    ],
}
USAGE: dict[str, int] = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
COMPLETION: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "m",
    "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}],
}
EMBEDDINGS: dict[str, Any] = {
    "object": "list",
    "model": "m",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}],
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}
MODEL: dict[str, Any] = {"id": "m", "object": "model", "created": 1700000000, "owned_by": "clawbot"}
ERROR: dict[str, Any] = {
    "error": {"message": "x", "type": "invalid_request_error", "param": None, "code": None}
}

TARGETS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)


def edited(
    instance: dict[str, Any], path: str, value: object = ..., *, drop: bool = False
) -> dict[str, Any]:
    """Deep copy of instance with the dotted path set to value, or removed when drop."""
    result = copy.deepcopy(instance)
    *parents, last = path.split(".")
    node: Any = result
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if drop:
        del node[last]
    else:
        node[last] = value
    return result


def referenced(name: str) -> set[str]:
    """Names of the component schemas reachable from name through $ref."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        stack: list[object] = [_spec()["components"]["schemas"][current]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str):
                    pending.append(ref.rsplit("/", 1)[-1])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return seen


def test_target_schemas_exist() -> None:
    assert set(TARGETS) <= schema_names()


@pytest.mark.parametrize("name", TARGETS)
def test_target_schemas_and_their_refs_are_valid_2020_12(name: str) -> None:
    for each in sorted(referenced(name)):
        Draft202012Validator.check_schema(_spec()["components"]["schemas"][each])


def test_spec_path_defaults_to_shared_beside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWBOT_OPENAPI_SPEC", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert _spec_path() == repo.parent / "shared" / "openai-openapi.yaml"


def test_spec_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLAWBOT_OPENAPI_SPEC", str(tmp_path / "spec.yaml"))
    assert _spec_path() == tmp_path / "spec.yaml"


def test_unknown_schema_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate("NoSuchSchema", {})


@pytest.mark.parametrize(
    ("name", "instance"),
    [
        ("CreateChatCompletionResponse", CHAT_COMPLETION),
        (
            "CreateChatCompletionResponse",
            {**CHAT_COMPLETION, "usage": USAGE, "service_tier": "default"},
        ),
        (
            "CreateChatCompletionResponse",
            {**CHAT_COMPLETION, "service_tier": None, "system_fingerprint": "fp"},
        ),
        ("CreateChatCompletionResponse", {**CHAT_COMPLETION, "choices": []}),
        (
            "CreateChatCompletionResponse",
            edited(CHAT_COMPLETION, "choices.0.message.content", None),
        ),
        ("CreateChatCompletionStreamResponse", CHUNK),
        ("CreateChatCompletionStreamResponse", {**CHUNK, "choices": [], "usage": USAGE}),
        ("CreateChatCompletionStreamResponse", {**CHUNK, "usage": None}),
        ("CreateChatCompletionStreamResponse", edited(CHUNK, "choices.0.finish_reason", "length")),
        ("CreateChatCompletionStreamResponse", edited(CHUNK, "choices.0.logprobs", None)),
        ("CreateChatCompletionStreamResponse", edited(CHUNK, "choices.0.delta", {})),
        ("CreateCompletionResponse", COMPLETION),
        ("CreateCompletionResponse", {**COMPLETION, "usage": USAGE}),
        ("CreateEmbeddingResponse", EMBEDDINGS),
        ("ListModelsResponse", {"object": "list", "data": [MODEL]}),
        ("ListModelsResponse", {"object": "list", "data": []}),
        ("Model", MODEL),
        ("Model", {**MODEL, "extra": "tolerated"}),
        ("ErrorResponse", ERROR),
        ("ErrorResponse", edited(ERROR, "error.code", "invalid_api_key")),
    ],
)
def test_accepts(name: str, instance: dict[str, Any]) -> None:
    validate(name, instance)


@pytest.mark.parametrize(
    ("name", "instance", "where"),
    [
        ("CreateChatCompletionResponse", {**CHAT_COMPLETION, "created": "1700000000"}, "$.created"),
        (
            "CreateChatCompletionResponse",
            {**CHAT_COMPLETION, "object": "chat.completion.chunk"},
            "$.object",
        ),
        (
            "CreateChatCompletionResponse",
            {**CHAT_COMPLETION, "service_tier": "bogus"},
            "$.service_tier",
        ),
        (
            "CreateChatCompletionResponse",
            edited(CHAT_COMPLETION, "choices.0.logprobs", drop=True),
            "$.choices[0]",
        ),
        (
            "CreateChatCompletionResponse",
            edited(CHAT_COMPLETION, "choices.0.finish_reason", None),
            "$.choices[0].finish_reason",
        ),
        (
            "CreateChatCompletionResponse",
            edited(CHAT_COMPLETION, "choices.0.message.refusal", drop=True),
            "$.choices[0].message",
        ),
        (
            "CreateChatCompletionResponse",
            {**CHAT_COMPLETION, "usage": {"prompt_tokens": 1}},
            "$.usage",
        ),
        (
            "CreateChatCompletionStreamResponse",
            edited(CHUNK, "choices.0.finish_reason", "bogus"),
            "$.choices[0].finish_reason",
        ),
        (
            "CreateChatCompletionStreamResponse",
            edited(CHUNK, "choices.0.finish_reason", drop=True),
            "$.choices[0]",
        ),
        ("CreateChatCompletionStreamResponse", {**CHUNK, "object": "chat.completion"}, "$.object"),
        ("CreateChatCompletionStreamResponse", {**CHUNK, "usage": {"total_tokens": 1}}, "$.usage"),
        (
            "CreateCompletionResponse",
            edited(COMPLETION, "choices.0.text", drop=True),
            "$.choices[0]",
        ),
        (
            "CreateEmbeddingResponse",
            edited(EMBEDDINGS, "data.0.embedding", "AAAAPwAAgL8="),
            "$.data[0].embedding",
        ),
        ("CreateEmbeddingResponse", edited(EMBEDDINGS, "usage", drop=True), "$"),
        (
            "ListModelsResponse",
            {"object": "list", "data": [edited(MODEL, "owned_by", drop=True)]},
            "$.data[0]",
        ),
        ("Model", edited(MODEL, "created", drop=True), "$"),
        ("ErrorResponse", edited(ERROR, "error.message", drop=True), "$.error"),
        ("ErrorResponse", edited(ERROR, "error.param", drop=True), "$.error"),
        ("ErrorResponse", {"message": "x"}, "$"),
    ],
)
def test_rejects(name: str, instance: dict[str, Any], where: str) -> None:
    with pytest.raises(AssertionError) as caught:
        validate(name, instance)
    assert str(caught.value).startswith(f"{name} at {where}:")


def test_error_message_names_schema_path_message_and_instance() -> None:
    with pytest.raises(AssertionError) as caught:
        validate("ErrorResponse", edited(ERROR, "error.message", drop=True))
    message = str(caught.value)
    assert "ErrorResponse at $.error: 'message' is a required property" in message
    assert "invalid_request_error" in message


def test_error_message_truncates_a_huge_instance() -> None:
    huge = {
        **EMBEDDINGS,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 10_000}],
        "model": 1,
    }
    with pytest.raises(AssertionError) as caught:
        validate("CreateEmbeddingResponse", huge)
    assert len(str(caught.value)) < 1_500


def accepts(schema: dict[str, Any], instance: object) -> bool:
    """Whether the normalized schema accepts instance."""
    normalized = _normalize(schema)
    assert isinstance(normalized, dict)
    return bool(Draft202012Validator(normalized).is_valid(instance))


def test_nullable_enum_accepts_null_and_members_only() -> None:
    schema = {"type": "string", "enum": ["stop", "length"], "nullable": True}
    assert accepts(schema, None)
    assert accepts(schema, "stop")
    assert not accepts(schema, "bogus")
    assert not accepts({**schema, "nullable": False}, None)


def test_nullable_ref_sibling_accepts_null_and_referenced_schema() -> None:
    schema = {
        "$defs": {"U": {"type": "object", "required": ["a"]}},
        "properties": {"u": {"$ref": "#/$defs/U", "nullable": True}},
    }
    assert accepts(schema, {"u": None})
    assert accepts(schema, {"u": {"a": 1}})
    assert not accepts(schema, {"u": {}})


def test_nullable_allof_member_makes_the_allof_nullable() -> None:
    schema = {
        "allOf": [
            {"type": "object", "required": ["a"]},
            {"nullable": True, "description": "or null"},
        ]
    }
    assert accepts(schema, None)
    assert accepts(schema, {"a": 1})
    assert not accepts(schema, {})


def test_boolean_exclusive_minimum_becomes_numeric() -> None:
    schema = {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert not accepts(schema, 0)
    assert accepts(schema, 0.1)


def test_data_and_property_names_are_left_alone() -> None:
    schema = {
        "properties": {
            "nullable": {"type": "boolean"},
            "default": {"type": "string", "nullable": True},
        },
        "example": {"nullable": True},
        "enum": [{"nullable": True}, {"nullable": True, "default": None}],
    }
    assert _normalize(schema) == {
        "properties": {
            "nullable": {"type": "boolean"},
            "default": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "example": {"nullable": True},
        "enum": [{"nullable": True}, {"nullable": True, "default": None}],
    }


def test_no_nullable_keyword_left_in_component_schemas() -> None:
    stack: list[object] = list(_spec()["components"]["schemas"].values())
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            assert node.get("nullable") is not True, node
            stack.extend(
                value
                for key, value in node.items()
                if key not in {"example", "examples", "enum", "default"}
            )
        elif isinstance(node, list):
            stack.extend(node)
