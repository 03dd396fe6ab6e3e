"""Tool calls and structured output from the embedded model, through the official SDK."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pydantic
from openai import OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import EMBEDDED, chat_events, json_body

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER,
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client: OpenAI, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    raw = client.chat.completions.with_raw_response.create(model=EMBEDDED, **kwargs)
    body = json_body(raw)
    validate("CreateChatCompletionResponse", body)
    return raw.parse(), body


def test_tool_call_round_trip(client: OpenAI) -> None:
    completion, _ = create(client, messages=ASK, tools=TOOLS, tool_choice="required", seed=5)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    follow_up = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    answer, _ = create(
        client, messages=follow_up, tools=TOOLS, tool_choice="none", max_tokens=24, seed=5
    )
    assert answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls


def test_streamed_tool_call_is_stitched_by_the_sdk(client: OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=EMBEDDED, messages=ASK, tools=TOOLS, tool_choice="required", stream=True, seed=9
    ) as response:
        chunks = chat_events(response.iter_lines())
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    deltas = [
        d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    first = deltas[0]
    assert first["index"] == 0
    assert first["type"] == "function"
    assert first["id"]
    assert first["function"]["name"] == "get_weather"
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER)
    with client.chat.completions.stream(
        model=EMBEDDED, messages=ASK, tools=TOOLS, tool_choice="required", seed=9
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.arguments == arguments, "the SDK's accumulation matches"


def test_json_schema_answer_validates(client: OpenAI) -> None:
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 30},
            "age": {"type": "integer"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": person, "strict": True},
    }
    for seed in range(3):
        completion, _ = create(
            client,
            messages=[{"role": "user", "content": "A person, as JSON."}],
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            max_tokens=80,
        )
        jsonschema.validate(json.loads(completion.choices[0].message.content or ""), person)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


def test_sdk_parse_with_a_pydantic_model(client: OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "Name a city and its country."}],
        response_format=City,
        seed=2,
        max_tokens=60,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert parsed.name
