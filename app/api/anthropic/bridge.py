"""Anthropic's Messages API on top of chat completions: pure conversions.

A Messages request becomes a `ChatCompletionRequest` (`to_chat_request`), so every backend
serves it; the chat answer becomes a `Message` (`to_message`), and a chat stream becomes
Anthropic's named events (`MessageEvents`, `message_events`). Nothing here does I/O.

The wire schema is `app.api.anthropic.protocol`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Literal

import msgspec
from msgspec import UnsetType

from app.api.anthropic.protocol import (
    Base64Source,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    DeltaUsage,
    ImageBlock,
    InputBlock,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessagesInput,
    MessagesRequest,
    MessageStart,
    MessageStop,
    MessageUsage,
    OutputBlock,
    RedactedThinkingBlock,
    StopDelta,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolDefinition,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
)
from app.api.hosted_tools import LeftOut, refuse_forced, refuse_required
from app.api.sse import NamedEvent
from app.errors import InvalidRequest, UnsupportedParameter
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageUrl,
    NamedFunction,
    NamedToolChoice,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from app.tokens import count_tokens


def _block_param(i: int, j: int) -> str:
    return f"messages[{i}].content[{j}]"


def _image_part(block: ImageBlock, param: str) -> ImagePart:
    source = block.source
    if isinstance(source, Base64Source):
        return ImagePart(ImageUrl(url=f"data:{source.media_type};base64,{source.data}"))
    if isinstance(source, UrlSource):
        return ImagePart(ImageUrl(url=source.url))
    raise UnsupportedParameter(
        "images from the Files API are not supported; send them as base64 or by URL",
        param=f"{param}.source",
    )


def _tool_result_text(block: ToolResultBlock, images: list[ContentPart], param: str) -> str:
    """A tool result's text; its images go to `images`, since chat tool messages take none."""
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, TextBlock):
                texts.append(part.text)
            else:
                images.append(_image_part(part, f"{param}.content[{k}]"))
        text = "\n".join(texts)
    # Chat has no error flag on tool results: the model can only learn it from the text.
    return f"Error: {text}" if block.is_error else text


def _user_turn(content: list[InputBlock], i: int) -> list[ChatMessage]:
    """Tool messages first (chat wants them right after the assistant's calls), in order;
    then the user's own text and images, if any, as one user message."""
    tools: list[ChatMessage] = []
    parts: list[ContentPart] = []
    for j, block in enumerate(content):
        param = _block_param(i, j)
        if isinstance(block, TextBlock):
            parts.append(TextPart(block.text))
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block, param))
        elif isinstance(block, ToolResultBlock):
            text = _tool_result_text(block, parts, param)
            tools.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=text))
        else:
            raise InvalidRequest(
                f"{param}: a user message cannot hold a {block.__struct_config__.tag} block",
                param=param,
            )
    if not parts:
        return tools
    first = parts[0]
    user = first.text if len(parts) == 1 and isinstance(first, TextPart) else parts
    return [*tools, ChatMessage(role="user", content=user)]


def _assistant_turn(content: list[InputBlock], i: int) -> ChatMessage:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = msgspec.json.encode(block.input).decode()
            calls.append(
                ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=arguments))
            )
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif not isinstance(block, RedactedThinkingBlock):
            param = _block_param(i, j)
            raise InvalidRequest(
                f"{param}: an assistant message cannot hold a {block.__struct_config__.tag} block",
                param=param,
            )
    text = "".join(texts)
    return ChatMessage(
        role="assistant",
        content=text if text or not calls else None,
        tool_calls=calls or None,
        reasoning_content="".join(reasoning) or None,
    )


def to_chat_messages(req: MessagesInput) -> list[ChatMessage]:
    """The conversation as chat messages, the system prompt first."""
    out: list[ChatMessage] = []
    if isinstance(req.system, str) and req.system:
        out.append(ChatMessage(role="system", content=req.system))
    elif isinstance(req.system, list) and req.system:
        # Clients such as Claude Code send their prompt as several blocks: paragraphs.
        out.append(ChatMessage(role="system", content="\n\n".join(b.text for b in req.system)))
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, str):
            out.append(ChatMessage(role=message.role, content=content))
        elif message.role == "user":
            out.extend(_user_turn(content, i))
        else:
            out.append(_assistant_turn(content, i))
    return out


def _is_server_tool(tool: ToolDefinition) -> bool:
    return tool.type not in (None, "custom")


def to_chat_tools(tools: list[ToolDefinition] | None) -> list[Tool] | None:
    """Client tools as chat function tools.

    Anthropic's server tools (web search, code execution: a `type` other than "custom") run
    on Anthropic's side, which no backend here can do; they are left out rather than refused
    (`app.api.hosted_tools`; `server_tools` names them), so that clients which always offer them
    still work.
    """
    if not tools:
        return None
    defined = [
        Tool(
            type="function",
            function=FunctionDefinition(
                name=tool.name, description=tool.description, parameters=tool.input_schema
            ),
        )
        for tool in tools
        if not _is_server_tool(tool)
    ]
    return defined or None


def server_tools(tools: list[ToolDefinition] | None) -> list[LeftOut]:
    """The server tools `to_chat_tools` leaves out, for the warning that says so."""
    return [
        LeftOut(f"tools[{i}]", str(tool.type))
        for i, tool in enumerate(tools or ())
        if _is_server_tool(tool)
    ]


def _tool_choice(
    choice: ToolChoice | None,
) -> tuple[Literal["none", "auto", "required"] | NamedToolChoice | None, bool | None]:
    """Chat's `tool_choice` and `parallel_tool_calls` for an Anthropic tool_choice."""
    if choice is None:
        return None, None
    if isinstance(choice, ToolChoiceNone):
        return "none", None
    parallel = False if choice.disable_parallel_tool_use else None
    if isinstance(choice, ToolChoiceAuto):
        return "auto", parallel
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    return NamedToolChoice(type="function", function=NamedFunction(choice.name)), parallel


def _refuse_forced_server_tool(req: MessagesRequest, left_out: list[LeftOut]) -> None:
    """A tool_choice that can only be met by a server tool left out cannot be answered."""
    choice = req.tool_choice
    if not left_out or choice is None:
        return
    if isinstance(choice, ToolChoiceTool):
        forced = [t for t in req.tools or () if t.name == choice.name and _is_server_tool(t)]
        if forced:
            raise refuse_forced(str(forced[0].type), "tool_choice")
    if isinstance(choice, ToolChoiceAny) and len(left_out) == len(req.tools or ()):
        raise refuse_required(left_out, "tool_choice")


def to_chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat completion request that answers a Messages request."""
    _refuse_forced_server_tool(req, server_tools(req.tools))
    tools = to_chat_tools(req.tools)
    tool_choice, parallel = _tool_choice(req.tool_choice) if tools else (None, None)
    return ChatCompletionRequest(
        model=req.model,
        messages=to_chat_messages(req),
        max_tokens=req.max_tokens,
        stop=req.stop_sequences or None,
        stream=req.stream,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        user=req.metadata.user_id if req.metadata else None,
    )


def estimate_input_tokens(messages: list[ChatMessage], tools: list[Tool] | None) -> int:
    """Prompt tokens in cl100k (an estimate for other tokenizers): messages, with a few per
    message for the chat template, their tool calls, and the tool definitions; images are
    not counted."""
    total = 3
    for message in messages:
        total += count_tokens(message.text()) + 4
        for call in message.tool_calls or ():
            total += count_tokens(call.function.name) + count_tokens(call.function.arguments)
    for tool in tools or ():
        total += count_tokens(msgspec.json.encode(tool.function).decode())
    return total


def new_message_id() -> str:
    """An Anthropic-style message id."""
    return f"msg_{secrets.token_hex(12)}"


def stop_reason(finish_reason: str | None) -> StopReason:
    """Anthropic's stop reason for a chat finish reason.

    A chat "stop" does not say whether a stop sequence or the end of the turn ended the
    text (the backend strips the sequence), so it is "end_turn": `stop_sequence` stays null.
    """
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason in ("tool_calls", "function_call"):
        return "tool_use"
    if finish_reason == "content_filter":
        return "refusal"
    return "end_turn"


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` must be.

    Models do write broken JSON; it is kept, unparsed, under "_raw" rather than failing a
    response that is otherwise fine.
    """
    if not arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def tool_use_id(chat_id: str | UnsetType | None) -> str:
    """The tool call's own id when the backend gave one (so results find their call)."""
    return chat_id if isinstance(chat_id, str) and chat_id else f"toolu_{secrets.token_hex(12)}"


def to_message(result: ChatCompletion, input_tokens: Callable[[], int]) -> Message:
    """The Messages response for a chat completion; `input_tokens` only if it has no usage."""
    choice = result.choices[0]
    answer = choice.message
    content: list[OutputBlock] = []
    if isinstance(answer.reasoning_content, str) and answer.reasoning_content:
        content.append(ThinkingBlock(thinking=answer.reasoning_content))
    if answer.content:
        content.append(TextBlock(answer.content))
    for call in answer.tool_calls or ():
        content.append(
            ToolUseBlock(
                tool_use_id(call.id), call.function.name, tool_input(call.function.arguments)
            )
        )
    usage = result.usage
    return Message(
        id=new_message_id(),
        model=result.model,
        content=content,
        stop_reason=stop_reason(choice.finish_reason),
        usage=MessageUsage(
            input_tokens=input_tokens() if isinstance(usage, UnsetType) else usage.prompt_tokens,
            output_tokens=0 if isinstance(usage, UnsetType) else usage.completion_tokens,
        ),
    )


def named(event: StreamEvent) -> NamedEvent:
    """An event with its SSE name, which is its `type`."""
    return str(event.__struct_config__.tag), event


class MessageEvents:
    """Turns chat chunks into Anthropic's stream events, one block open at a time.

    Reasoning, text and each tool call are separate blocks, numbered in order; a block is
    closed before the next one opens. Tool-call fragments are matched by their chat `index`.
    """

    def __init__(self, input_tokens: int) -> None:
        self._input_tokens = input_tokens
        self._blocks = 0
        self._open: tuple[str, int] | None = None
        """The open block: its kind ("thinking", "text", or "tool:<chat index>") and index."""
        self._tools: dict[int, int] = {}
        """Block index of each chat tool-call index."""
        self._finish: str | None = None
        self._output_tokens = 0
        self._prompt_tokens: int | None = None

    def start(self, model: str) -> list[NamedEvent]:
        """`message_start`, usage holding the estimated input tokens."""
        message = Message(
            id=new_message_id(),
            model=model,
            content=[],
            stop_reason=None,
            usage=MessageUsage(input_tokens=self._input_tokens, output_tokens=0),
        )
        return [named(MessageStart(message))]

    def _close(self) -> list[NamedEvent]:
        if self._open is None:
            return []
        index = self._open[1]
        self._open = None
        return [named(ContentBlockStop(index))]

    def _open_block(self, kind: str, block: OutputBlock) -> list[NamedEvent]:
        events = self._close()
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        events.append(named(ContentBlockStart(index, block)))
        return events

    def _delta(
        self, kind: str, empty: OutputBlock, delta: TextDelta | ThinkingDelta
    ) -> list[NamedEvent]:
        events = [] if self._open and self._open[0] == kind else self._open_block(kind, empty)
        assert self._open is not None
        events.append(named(ContentBlockDelta(self._open[1], delta)))
        return events

    def _tool_delta(self, call: ToolCallDelta) -> list[NamedEvent]:
        events: list[NamedEvent] = []
        function = call.function if isinstance(call.function, dict) else {}
        index = self._tools.get(call.index)
        if index is None:
            block = ToolUseBlock(tool_use_id(call.id), function.get("name", ""), {})
            events = self._open_block(f"tool:{call.index}", block)
            index = self._tools[call.index] = self._blocks - 1
        # A fragment of an earlier, already closed call still goes to that call's block:
        # clients assemble the input by block index.
        arguments = function.get("arguments")
        if arguments:
            events.append(named(ContentBlockDelta(index, InputJsonDelta(arguments))))
        return events

    def feed(self, chunk: ChatCompletionChunk) -> list[NamedEvent]:
        """The events one chat chunk makes."""
        usage = chunk.usage
        if usage is not None and not isinstance(usage, UnsetType):
            self._prompt_tokens = usage.prompt_tokens
            self._output_tokens = usage.completion_tokens
        events: list[NamedEvent] = []
        for choice in chunk.choices:
            delta = choice.delta
            if isinstance(delta.reasoning_content, str) and delta.reasoning_content:
                thinking = ThinkingDelta(delta.reasoning_content)
                events += self._delta("thinking", ThinkingBlock(thinking=""), thinking)
            if isinstance(delta.content, str) and delta.content:
                events += self._delta("text", TextBlock(""), TextDelta(delta.content))
            for call in delta.tool_calls or ():
                events += self._tool_delta(call)
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
        return events

    def finish(self) -> list[NamedEvent]:
        """Close the open block; then `message_delta` with the real usage, `message_stop`."""
        usage = DeltaUsage(output_tokens=self._output_tokens)
        if self._prompt_tokens is not None:
            usage.input_tokens = self._prompt_tokens
        return [
            *self._close(),
            named(MessageDelta(StopDelta(stop_reason=stop_reason(self._finish)), usage)),
            named(MessageStop()),
        ]


async def message_events(
    chunks: AsyncIterator[ChatCompletionChunk], model: str, input_tokens: Callable[[], int]
) -> AsyncIterator[NamedEvent]:
    """A chat stream as Anthropic events.

    The first chunk is awaited before `message_start`, so a failure before the backend
    answers is still an error response with its status, not an event after a 200.
    """
    async with aclosing(chunks):  # type: ignore[type-var]
        first = await anext(chunks, None)
        events = MessageEvents(input_tokens())
        for event in events.start(first.model if first else model):
            yield event
        if first is not None:
            for event in events.feed(first):
                yield event
        async for chunk in chunks:
            for event in events.feed(chunk):
                yield event
        for event in events.finish():
            yield event
