"""Anthropic's Messages API wire schema (POST /v1/messages), as msgspec Structs.

Fields follow Anthropic's API reference. Requests tolerate unknown fields (msgspec ignores
them): `cache_control`, `citations`, `container`, `service_tier` and `thinking` are accepted
and ignored, since no chat backend has a use for them. Kept apart from the bridge
(`app.api.anthropic.bridge`) so that the error bodies can be built without it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType


class TextBlock(Struct, tag_field="type", tag="text"):
    """A text block."""

    text: str


class Base64Source(Struct, tag_field="type", tag="base64"):
    """Image bytes, base64-encoded."""

    media_type: str
    data: str


class UrlSource(Struct, tag_field="type", tag="url"):
    """An image by URL."""

    url: str


class FileSource(Struct, tag_field="type", tag="file"):
    """An image uploaded to Anthropic's Files API (which the gateway has not got)."""

    file_id: str


class ImageBlock(Struct, tag_field="type", tag="image"):
    """An image block (user messages and tool results)."""

    source: Base64Source | UrlSource | FileSource


class ToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    """A tool call by the assistant."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Struct, tag_field="type", tag="tool_result", kw_only=True):
    """The result of a tool call, sent back in a user message."""

    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool = False


class ThinkingBlock(Struct, tag_field="type", tag="thinking", kw_only=True):
    """The model's reasoning; `signature` is Anthropic's proof of origin, empty here."""

    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    """Encrypted reasoning from Anthropic's models; meaningless to others, so dropped."""

    data: str


InputBlock = (
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)
OutputBlock = ThinkingBlock | TextBlock | ToolUseBlock


class InputMessage(Struct, kw_only=True):
    """One turn of the conversation."""

    role: Literal["user", "assistant"]
    content: str | Annotated[list[InputBlock], Meta(min_length=1)]


class ToolDefinition(Struct, kw_only=True, omit_defaults=True):
    """A tool the model may call; `type` is set only on Anthropic's own server tools."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoiceAuto(Struct, tag_field="type", tag="auto", kw_only=True):
    """The model decides whether to call a tool."""

    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Struct, tag_field="type", tag="any", kw_only=True):
    """The model must call some tool."""

    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Struct, tag_field="type", tag="tool", kw_only=True):
    """The model must call the named tool."""

    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Struct, tag_field="type", tag="none"):
    """The model must not call tools."""


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(Struct, kw_only=True):
    """Request metadata; `user_id` becomes the chat request's `user`."""

    user_id: str | None = None


class MessagesInput(Struct, kw_only=True):
    """What a prompt is made of: shared by POST /v1/messages and its count_tokens."""

    model: str
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None


class CountTokensRequest(MessagesInput, kw_only=True):
    """POST /v1/messages/count_tokens."""


class MessagesRequest(MessagesInput, kw_only=True):
    """POST /v1/messages."""

    max_tokens: Annotated[int, Meta(ge=1)]
    metadata: Metadata | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]


class MessageUsage(Struct, kw_only=True):
    """Token counts of one message."""

    input_tokens: int
    output_tokens: int


class Message(Struct, kw_only=True):
    """Response of POST /v1/messages (and, with empty content, of `message_start`)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


class CountTokensResponse(Struct, kw_only=True):
    """Response of POST /v1/messages/count_tokens."""

    input_tokens: int


class ErrorDetail(Struct, kw_only=True):
    """The `error` object of an Anthropic error."""

    type: str
    message: str


class ErrorResponse(Struct, kw_only=True):
    """Every error the Messages routes answer with, and their stream's `error` event."""

    type: Literal["error"] = "error"
    error: ErrorDetail


class MessageStart(Struct, tag_field="type", tag="message_start"):
    """First event: the message with no content yet."""

    message: Message


class ContentBlockStart(Struct, tag_field="type", tag="content_block_start"):
    """A content block opens at `index`, empty."""

    index: int
    content_block: OutputBlock


class TextDelta(Struct, tag_field="type", tag="text_delta"):
    """More text for a text block."""

    text: str


class ThinkingDelta(Struct, tag_field="type", tag="thinking_delta"):
    """More reasoning for a thinking block."""

    thinking: str


class InputJsonDelta(Struct, tag_field="type", tag="input_json_delta"):
    """A fragment of a tool_use block's input JSON; fragments concatenate to it."""

    partial_json: str


class ContentBlockDelta(Struct, tag_field="type", tag="content_block_delta"):
    """What an event adds to the block at `index`."""

    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class ContentBlockStop(Struct, tag_field="type", tag="content_block_stop"):
    """The block at `index` is complete."""

    index: int


class StopDelta(Struct, kw_only=True):
    """Why the message ended."""

    stop_reason: StopReason | None
    stop_sequence: str | None = None


class DeltaUsage(Struct, kw_only=True, omit_defaults=True):
    """Final token counts; cumulative, so they replace those of `message_start`."""

    output_tokens: int
    input_tokens: int | UnsetType = UNSET


class MessageDelta(Struct, tag_field="type", tag="message_delta"):
    """Last but one event: the stop reason and the real usage."""

    delta: StopDelta
    usage: DeltaUsage


class MessageStop(Struct, tag_field="type", tag="message_stop"):
    """Last event."""


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
)
