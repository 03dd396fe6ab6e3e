"""Constrained output for in-process models: llama.cpp grammars for JSON schemas and tool calls.

A tool call is generated as `{"name": "<tool>", "arguments": {…}}`, the arguments held to the
tool's parameter schema by the grammar; with `tool_choice: auto` the grammar also allows plain
text that does not start with `{`, so the first character tells a reply from a call and text
streams without delay. `CallText` turns the call's text into the name and argument fragments
as they are generated.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest
from app.protocol import NamedToolChoice, Tool

# Keywords llama.cpp's converter cannot enforce; a strict schema using them is refused, since
# its output could then fail validation.
_UNENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "patternProperties",
        "propertyNames",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_SCHEMA_CHILDREN = ("items", "additionalProperties", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")

# Plain text, for `tool_choice: auto`: anything that does not open with `{` (a call does).
_PLAIN_TEXT = "plain ::= [^{] [^\\x00]*\n"


def _unenforced(schema: Any, path: str) -> Iterator[str]:
    if not isinstance(schema, Mapping):
        return
    for key in schema:
        if key in _UNENFORCED:
            yield f"{path}.{key}" if path else key
    for key in _SCHEMA_CHILDREN:
        if isinstance(schema.get(key), Mapping):
            yield from _unenforced(schema[key], f"{path}.{key}" if path else key)
    for key in _SCHEMA_LISTS:
        for i, child in enumerate(schema.get(key) or ()):
            yield from _unenforced(child, f"{path}.{key}[{i}]" if path else f"{key}[{i}]")
    for key in _SCHEMA_MAPS:
        children = schema.get(key)
        if isinstance(children, Mapping):
            for name, child in children.items():
                yield from _unenforced(child, f"{path}.{key}.{name}" if path else f"{key}.{name}")


@functools.lru_cache(maxsize=256)
def _compile(schema_json: str, prop_order: tuple[str, ...]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(schema_json, list(prop_order) or None))


def schema_grammar(
    schema: Mapping[str, Any], *, strict: bool, param: str, prop_order: Sequence[str] = ()
) -> str:
    """GBNF for JSON that validates against `schema`; a 400 naming `param` if it can't be."""
    if strict:
        refused = list(_unenforced(schema, ""))
        if refused:
            raise InvalidRequest(
                f"this strict schema uses keywords the in-process grammar cannot enforce: "
                f"{', '.join(refused)}; drop them or set strict to false",
                param=param,
                code="invalid_json_schema",
            )
    try:
        return _compile(json.dumps(schema, sort_keys=True), tuple(prop_order))
    except Exception as exc:  # the converter raises whatever it trips over
        raise InvalidRequest(
            f"cannot compile this JSON schema into a grammar: {type(exc).__name__}: {exc}",
            param=param,
            code="invalid_json_schema",
        ) from exc


def json_object_grammar() -> str:
    """GBNF for any JSON object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def _parameters(tool: Tool) -> dict[str, Any]:
    parameters = tool.function.parameters
    return dict(parameters) if parameters else {"type": "object"}


def called_tools(tools: Sequence[Tool], choice: str | NamedToolChoice | None) -> list[Tool]:
    """The tools a call may name under `choice` (all, or the one forced)."""
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return list(tools)


def tool_call_grammar(tools: Sequence[Tool], *, allow_text: bool, strict: bool) -> str:
    """GBNF for one call of one of `tools` (or, with `allow_text`, plain text instead)."""
    calls = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": _parameters(t),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    grammar = schema_grammar(calls, strict=strict, param="tools", prop_order=("name", "arguments"))
    if not allow_text:
        return grammar
    renamed = re.sub(r"^root ::=", "call ::=", grammar, count=1, flags=re.M)
    return renamed.rstrip("\n") + "\nroot ::= call | plain\n" + _PLAIN_TEXT


def tool_instructions(tools: Sequence[Tool], *, required: bool) -> str:
    """The system-prompt text that tells a model its tools and how to call one.

    Each tool is one line of compact JSON with text left as it is: agent clients offer tools
    worth thousands of tokens (Codex CLI's take 4,400 in SmolLM2's tokenizer), of which JSON's
    optional spaces cost 7 %, and `\\uXXXX` escapes would make a Chinese description several
    times longer and unreadable to the model.
    """
    lines = [
        "You can call these tools:",
        *(
            json.dumps(
                {
                    "name": t.function.name,
                    "description": t.function.description or "",
                    "parameters": _parameters(t),
                },
                separators=(",", ":"),
                ensure_ascii=False,
            )
            for t in tools
        ),
        'To call a tool, reply with only a JSON object: {"name": <tool name>, "arguments": '
        "<arguments object>}.",
    ]
    if not required:
        lines.append("If no tool is needed, answer in plain text.")
    return "\n".join(lines)


def call_text(name: str, arguments: str) -> str:
    """How an earlier call of the assistant is shown to the model in the conversation."""
    return f'{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}'


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*$")
_HOLD = 32
"""Characters held back while streaming arguments: the call's closing `}` and the whitespace
the grammar allows before it must not be sent as arguments."""


@dataclass(slots=True)
class CallText:
    """The text of one generated call, turned into its name and argument fragments."""

    text: str = ""
    name: str | None = None
    start: int = 0
    """Where the arguments begin in `text`, once the name is known."""
    sent: int = 0
    """Characters of the arguments already handed out."""

    def feed(self, piece: str) -> tuple[str | None, str]:
        """Add generated text; returns the name if it just became known, and new arguments."""
        self.text += piece
        named = None
        if self.name is None:
            match = _HEAD.match(self.text)
            if match is None:
                return None, ""
            self.name = named = json.loads(f'"{match.group(1)}"')
            self.start = match.end()
        ready = len(self.text) - _HOLD
        if ready <= self.start + self.sent:
            return named, ""
        fragment = self.text[self.start + self.sent : ready]
        self.sent += len(fragment)
        return named, fragment

    def finish(self, complete: bool = True) -> str | None:
        """The arguments not yet handed out, or None if the text never became a call.

        Only a `complete` call (the grammar reached its end) ends with the wrapper's `}`; a
        call cut short by max_tokens keeps every character it has.
        """
        if self.name is None:
            return None
        arguments = self.text[self.start :]
        if complete:
            arguments = _TAIL.sub("", arguments).rstrip()
        rest = arguments[self.sent :]
        self.sent = len(arguments)
        return rest

    def arguments(self) -> str:
        """The whole arguments text (after `finish`)."""
        return self.text[self.start : self.start + self.sent]
