"""Grammars for JSON schemas and tool calls, and the streaming call parser (no model needed)."""

from __future__ import annotations

import json

import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from app.errors import InvalidRequest
from app.protocol import FunctionDefinition, NamedFunction, NamedToolChoice, Tool
from backends.llamacpp.grammars import (
    CallText,
    call_text,
    called_tools,
    schema_grammar,
    tool_call_grammar,
    tool_instructions,
)

WEATHER = Tool(
    type="function",
    function=FunctionDefinition(
        name="get_weather",
        description="Weather in a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    ),
)
ADD = Tool(type="function", function=FunctionDefinition(name="add"))


def parses(grammar: str) -> bool:
    return LlamaGrammar.from_string(grammar, verbose=False) is not None


def test_schema_grammar_compiles_and_is_cached() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = schema_grammar(schema, strict=True, param="p")
    assert "root ::=" in grammar
    assert parses(grammar)
    assert schema_grammar(dict(schema), strict=True, param="p") is grammar


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "integer", "minimum": 0}, "minimum"),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}},
            "properties.n.maximum",
        ),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        (
            {"anyOf": [{"type": "string"}, {"type": "integer", "not": {"const": 1}}]},
            "anyOf[1].not",
        ),
        (
            {
                "type": "object",
                "$defs": {"x": {"type": "integer", "multipleOf": 2}},
                "properties": {"a": {"$ref": "#/$defs/x"}},
            },
            "$defs.x.multipleOf",
        ),
    ],
)
def test_strict_schemas_with_unenforceable_keywords_are_refused(schema: dict, where: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema_grammar(schema, strict=True, param="response_format.json_schema.schema")
    assert where in caught.value.message
    assert caught.value.code == "invalid_json_schema"
    assert caught.value.param == "response_format.json_schema.schema"
    assert parses(schema_grammar(schema, strict=False, param="p")), "best effort when not strict"


def test_a_schema_the_converter_cannot_read_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match="cannot compile"):
        schema_grammar({"$ref": "https://example.com/schema.json"}, strict=False, param="p")


def test_tool_call_grammars_parse_with_and_without_text() -> None:
    assert parses(tool_call_grammar([WEATHER, ADD], allow_text=False, strict=False))
    grammar = tool_call_grammar([WEATHER, ADD], allow_text=True, strict=False)
    assert parses(grammar)
    assert "root ::= call | plain" in grammar


def test_called_tools_and_instructions() -> None:
    named = NamedToolChoice(type="function", function=NamedFunction(name="add"))
    assert called_tools([WEATHER, ADD], named) == [ADD]
    assert called_tools([WEATHER, ADD], "required") == [WEATHER, ADD]
    text = tool_instructions([WEATHER], required=False)
    assert '{"name":"get_weather","description":' in text  # compact: every token counts
    assert "plain text" in text
    assert "plain text" not in tool_instructions([WEATHER], required=True)
    chinese = Tool(
        type="function", function=FunctionDefinition(name="cha_tianqi", description="查询城市天气")
    )
    assert '"description":"查询城市天气"' in tool_instructions([chinese], required=False)
    assert json.loads(call_text("add", '{"a": 1}')) == {"name": "add", "arguments": {"a": 1}}
    assert json.loads(call_text("add", "")) == {"name": "add", "arguments": {}}


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_call_text_streams_name_then_arguments_that_concatenate(step: int) -> None:
    text = '{ "name": "get_weather", "arguments": { "city": "Paris, the \\"city\\" of light" } }'
    call = CallText()
    names, fragments = [], []
    for start in range(0, len(text), step):
        name, fragment = call.feed(text[start : start + step])
        if name is not None:
            names.append(name)
        fragments.append(fragment)
    fragments.append(call.finish() or "")
    assert names == ["get_weather"]
    arguments = "".join(fragments)
    assert arguments == call.arguments() == '{ "city": "Paris, the \\"city\\" of light" }'
    assert json.loads(arguments) == {"city": 'Paris, the "city" of light'}


def test_call_text_that_never_named_a_tool() -> None:
    call = CallText()
    assert call.feed('{"na') == (None, "")
    assert call.finish() is None


def test_a_call_cut_short_keeps_every_character() -> None:
    call = CallText()
    call.feed('{"name": "f", "arguments": {"a": {"b": 1}')
    assert call.finish(complete=False) is not None
    assert call.arguments() == '{"a": {"b": 1}'
