"""What an in-process chat request asks of the output, and the reply shaped from its text.

`plan_output` reads tools, `tool_choice` and `response_format` into the messages the model
sees (tool instructions in the system prompt, earlier calls in the grammar's own format) and
the grammar that holds its output. `ReplyShaper` turns the generated text into chat deltas:
content as it comes, or a tool call's name and then its argument fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from app.errors import InvalidRequest
from app.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChunkDelta,
    FunctionCall,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
)
from backends.common import new_id
from backends.llamacpp.grammars import (
    CallText,
    call_text,
    called_tools,
    json_object_grammar,
    schema_grammar,
    tool_call_grammar,
    tool_instructions,
)

Mode = Literal["text", "call", "auto"]
"""`call`: the reply is a tool call; `auto`: a call or text, the first character decides."""

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """The messages to render and the grammar to generate under."""

    messages: list[ChatMessage]
    grammar: str | None
    mode: Mode


def _with_system(messages: list[ChatMessage], text: str) -> list[ChatMessage]:
    """`text` appended to the leading system message, or a new one first."""
    if messages and messages[0].role in ("system", "developer"):
        first = messages[0]
        merged = f"{first.text()}\n\n{text}" if first.text() else text
        return [msgspec.structs.replace(first, content=merged), *messages[1:]]
    return [ChatMessage(role="system", content=text), *messages]


def _as_model_sees(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Earlier calls written as the model would have written them (the grammar's format)."""
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(
                call_text(c.function.name, c.function.arguments) for c in m.tool_calls
            )
            text = f"{m.text()}\n{calls}" if m.text() else calls
            m = msgspec.structs.replace(m, content=text, tool_calls=None)
        out.append(m)
    return out


def _response_grammar(req: ChatCompletionRequest) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema is None:
        return json_object_grammar()
    return schema_grammar(
        fmt.json_schema.schema,
        strict=bool(fmt.json_schema.strict),
        param="response_format.json_schema.schema",
    )


def plan_output(req: ChatCompletionRequest) -> OutputPlan:
    """The plan for `req`; a 400 for a schema or tool the grammar cannot hold."""
    messages = _as_model_sees(req.messages)
    if not req.tools or req.tool_choice == "none":
        return OutputPlan(messages, _response_grammar(req), "text")
    tools = called_tools(req.tools, req.tool_choice)
    if not tools:
        raise InvalidRequest("tool_choice names a function not in tools", param="tool_choice")
    forced = req.tool_choice is not None and req.tool_choice != "auto"
    strict = any(t.function.strict for t in tools)
    if not forced and req.response_format is not None and req.response_format.type != "text":
        raise InvalidRequest(
            "response_format together with tool_choice auto is not supported by in-process "
            "models; force a tool (tool_choice required or a named function) or drop one",
            param="response_format",
        )
    grammar = tool_call_grammar(tools, allow_text=not forced, strict=strict)
    messages = _with_system(messages, tool_instructions(tools, required=forced))
    return OutputPlan(messages, grammar, "call" if forced else "auto")


@dataclass(slots=True)
class ReplyShaper:
    """Generated text → chat deltas; also folds them into the whole message."""

    mode: Mode
    call: CallText | None = None
    call_id: str = field(default_factory=lambda: new_id("call"))
    content: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[ChunkDelta]:
        """Deltas for newly generated text."""
        if not text:
            return []
        if self.mode == "auto":
            self.mode = "call" if text.startswith("{") else "text"
        if self.mode == "text":
            self.content.append(text)
            return [ChunkDelta(content=text)]
        if self.call is None:
            self.call = CallText()
        name, fragment = self.call.feed(text)
        return self._call_deltas(name, fragment)

    def _call_deltas(self, name: str | None, fragment: str) -> list[ChunkDelta]:
        deltas = []
        if name is not None:
            head = ToolCallDelta(
                index=0,
                id=self.call_id,
                type="function",
                function={"name": name, "arguments": ""},
            )
            deltas.append(ChunkDelta(tool_calls=[head]))
        if fragment:
            piece = ToolCallDelta(index=0, function={"arguments": fragment})
            deltas.append(ChunkDelta(tool_calls=[piece]))
        return deltas

    def finish(self, generated: Literal["stop", "length"] = "stop") -> list[ChunkDelta]:
        """Deltas held back until the end (a call's last argument characters)."""
        if self.call is None:
            return []
        rest = self.call.finish(complete=generated == "stop")
        if rest is None:
            # Cut off (max_tokens) before the call named its tool: what there is, as text.
            self.mode = "text"
            self.content.append(self.call.text)
            text, self.call = self.call.text, None
            return [ChunkDelta(content=text)]
        return self._call_deltas(None, rest)

    @property
    def called(self) -> bool:
        """Whether the reply is a tool call."""
        return self.call is not None and self.call.name is not None

    def finish_reason(self, generated: Literal["stop", "length"]) -> FinishReason:
        """`tool_calls` for a complete call, else why generation ended."""
        return "tool_calls" if self.called and generated == "stop" else generated

    def message(self) -> ResponseMessage:
        """The whole reply as the assistant message."""
        if self.call is not None and self.call.name is not None:
            call = ToolCall(
                id=self.call_id,
                function=FunctionCall(name=self.call.name, arguments=self.call.arguments()),
            )
            return ResponseMessage(content=None, tool_calls=[call])
        return ResponseMessage(content="".join(self.content))
