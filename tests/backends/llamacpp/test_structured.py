"""Tool calls and JSON-schema answers from the embedded SmolLM2 model: they parse and validate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import msgspec
import pytest

from app.errors import InvalidRequest, UnsupportedParameter
from app.protocol import ChatCompletionChunk, ChatCompletionRequest, CompletionRequest
from tests.backends.llamacpp.test_llamacpp import make_backend

pytestmark = pytest.mark.slow

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "age": {"type": "integer"},
        "languages": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


def request(text: str, **kw: Any) -> ChatCompletionRequest:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 120,
        **kw,
    }
    return msgspec.convert(body, ChatCompletionRequest)


@pytest.fixture
async def llm() -> AsyncIterator[Any]:
    b = make_backend()
    await b.start()
    yield b
    await b.aclose()


@pytest.mark.parametrize("seed", range(5))
async def test_json_schema_answers_validate_every_time(llm: Any, seed: int) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    out = await llm.chat(
        request("Describe a programmer as JSON.", response_format=fmt, temperature=1.0, seed=seed)
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


async def test_json_object_answers_parse(llm: Any) -> None:
    out = await llm.chat(
        request("List two fruits as JSON.", response_format={"type": "json_object"}, seed=1)
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


async def test_a_strict_schema_the_grammar_cannot_hold_is_a_400(llm: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    with pytest.raises(InvalidRequest) as caught:
        await llm.chat(request("A number.", response_format=fmt))
    assert caught.value.code == "invalid_json_schema"


@pytest.mark.parametrize("seed", range(5))
async def test_required_tool_calls_parse_and_validate_every_time(llm: Any, seed: int) -> None:
    out = await llm.chat(
        request(
            "What's the weather in Paris?",
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
        )
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call")
    schema = next(
        t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name
    )
    jsonschema.validate(json.loads(call.function.arguments), schema)


async def test_a_named_tool_is_the_one_called(llm: Any) -> None:
    choice = {"type": "function", "function": {"name": "add"}}
    out = await llm.chat(request("What is 2 plus 3?", tools=TOOLS, tool_choice=choice, seed=3))
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


async def test_a_streamed_call_matches_the_whole_one(llm: Any) -> None:
    kw = {"tools": TOOLS, "tool_choice": "required", "seed": 7, "temperature": 0.8}
    whole = await llm.chat(request("Weather in Oslo?", **kw))
    chunks = [c async for c in llm.stream_chat(request("Weather in Oslo?", stream=True, **kw))]
    typed = [c for c in chunks if isinstance(c, ChatCompletionChunk)]
    deltas = [d for c in typed for d in (c.choices[0].delta.tool_calls or [])]
    head = deltas[0]
    assert head.index == 0
    assert head.type == "function"
    assert head.function["arguments"] == ""
    (call,) = whole.choices[0].message.tool_calls
    assert head.function["name"] == call.function.name
    arguments = "".join(d.function["arguments"] for d in deltas)
    assert arguments == call.function.arguments
    assert typed[-1].choices[0].finish_reason == "tool_calls"


async def test_a_tool_result_round_trip_answers_in_text(llm: Any) -> None:
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"temperature": 21, "sky": "clear"}',
        },
    ]
    out = await llm.chat(
        msgspec.convert(
            {
                "model": "smol",
                "messages": messages,
                "tools": TOOLS,
                "tool_choice": "none",
                "max_tokens": 24,
                "seed": 1,
            },
            ChatCompletionRequest,
        )
    )
    assert out.choices[0].message.content
    assert out.choices[0].message.tool_calls is msgspec.UNSET


async def test_suffix_on_a_model_without_fim_tokens_is_a_400(llm: Any) -> None:
    assert llm.fim_tokens is None, "SmolLM2 has no FIM tokens"
    req = msgspec.convert(
        {"model": "smol", "prompt": "def add(a, b):", "suffix": "\n", "max_tokens": 4},
        CompletionRequest,
    )
    with pytest.raises(UnsupportedParameter) as caught:
        await llm.complete(req)
    assert caught.value.param == "suffix"
    assert "fill-in-the-middle" in caught.value.message


async def test_fim_prompts_are_prefix_suffix_middle(llm: Any) -> None:
    llm.fim_tokens = (101, 102, 103)  # stand-ins: the path is the one a FIM model takes
    loaded = llm._loaded
    assert loaded is not None
    tokens = llm._fim_prompt(loaded, "def add(a, b):\n    return ", "\n\nprint(add(1, 2))")
    pre, suf, mid = (tokens.index(t) for t in (101, 102, 103))
    assert pre < suf < mid == len(tokens) - 1
    assert pre <= 1, "only a BOS may come first"
    middle = loaded.model.detokenize(tokens[pre + 1 : suf]).decode()
    assert middle == "def add(a, b):\n    return "
    req = msgspec.convert(
        {"model": "smol", "prompt": "x = ", "suffix": "\n", "max_tokens": 3, "seed": 1},
        CompletionRequest,
    )
    out = await llm.complete(req)
    assert out.usage.prompt_tokens == len(llm._fim_prompt(loaded, "x = ", "\n"))
