"""The OpenAI Responses API wire schema (POST /v1/responses), as msgspec Structs.

Kept apart from `app/protocol.py` because the gateway serves it only as a bridge onto chat
completions (`app/api/responses/bridge.py`); conventions are the same: fields in the order of
OpenAI's reference, requests tolerate unknown fields, optional response fields are `UNSET`.
Request parts that take many shapes (input items, tools, `tool_choice`) are decoded loosely
here and checked one by one in the bridge, so that an error names the exact item.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from app.protocol import Probability, Temperature, TokenCount

ItemStatus = Literal["in_progress", "completed", "incomplete"]


# Input items are each decoded from their dict by the bridge.


class InputText(Struct, tag_field="type", tag="input_text"):
    """A text part of an input message."""

    text: str


class OutputText(Struct, tag_field="type", tag="output_text", kw_only=True):
    """A text part of an assistant message: in output, and in input when a turn is sent back."""

    text: str
    annotations: list[Any] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)


class InputImage(Struct, tag_field="type", tag="input_image", kw_only=True):
    """An image part of an input message (a URL or data: URI; file ids need the Files API)."""

    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(Struct, tag_field="type", tag="input_file", kw_only=True):
    """A file part of an input message; the gateway has no Files API, so it is refused."""

    file_id: str | None = None
    filename: str | None = None


class Refusal(Struct, tag_field="type", tag="refusal"):
    """A refusal part of an assistant message."""

    refusal: str


InputPart = InputText | OutputText | InputImage | InputFile | Refusal


class InputMessage(Struct, kw_only=True):
    """A message input item (`type` may be left out, as the easy input message allows)."""

    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class FunctionCallInput(Struct, kw_only=True):
    """A function call the model made in an earlier turn, sent back."""

    call_id: str
    namespace: str | None = None
    """Set when the function belongs to a `namespace` tool."""
    name: str
    arguments: str


class FunctionCallOutputInput(Struct, kw_only=True):
    """The result of a function call, for the model."""

    call_id: str
    output: str | list[InputPart]


class NamespaceToolParam(Struct, kw_only=True):
    """A `namespace` tool: function tools grouped under one name (Codex's sub-agent tools)."""

    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    tools: Annotated[list[dict[str, Any]], Meta(min_length=1)]


class TextFormat(Struct, kw_only=True, omit_defaults=True):
    """`text.format`: text, json_object, or json_schema with its name and schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    """`text`: the output format (echoed back in the response)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(Struct, kw_only=True, omit_defaults=True):
    """`reasoning`: the effort is passed on as `reasoning_effort`; the rest is echoed."""

    effort: str | None = None
    summary: str | None = None


class CreateResponse(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/responses."""

    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    metadata: dict[str, str] | None = None
    model: str
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = None
    stream: bool | None = None
    temperature: Temperature | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_p: Probability | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


class MessageItem(Struct, tag_field="type", tag="message", kw_only=True):
    """An assistant message in the output."""

    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText | Refusal]


class FunctionCallItem(Struct, tag_field="type", tag="function_call", kw_only=True):
    """A function call the model made."""

    id: str
    call_id: str
    namespace: str | UnsetType = UNSET
    """The `namespace` tool the function belongs to, if any (then `name` is its own name)."""
    name: str
    arguments: str
    status: ItemStatus


class SummaryText(Struct, tag_field="type", tag="summary_text"):
    """Reasoning text, shown as a summary."""

    text: str


class ReasoningItem(Struct, tag_field="type", tag="reasoning", kw_only=True):
    """The model's reasoning (a backend's `reasoning_content`), as one summary part."""

    id: str
    summary: list[SummaryText]
    status: ItemStatus


class FileSearchResult(Struct, kw_only=True):
    """A hit of a file search, in the output when `include` asks for it."""

    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict[str, Any]


class FileSearchCallItem(Struct, tag_field="type", tag="file_search_call", kw_only=True):
    """The gateway's run of the `file_search` tool."""

    id: str
    status: Literal["in_progress", "searching", "completed", "incomplete", "failed"]
    queries: list[str]
    results: list[FileSearchResult] | None = None


class FileCitation(Struct, tag_field="type", tag="file_citation", kw_only=True):
    """An annotation of output text: the file a passage came from."""

    file_id: str
    filename: str
    index: int


OutputItem = MessageItem | FunctionCallItem | ReasoningItem | FileSearchCallItem


class FunctionTool(Struct, tag_field="type", tag="function", kw_only=True):
    """A function tool, as echoed in the response (the Responses shape: no `function` wrapper)."""

    name: str
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | None
    strict: bool | None


class NamespaceTool(Struct, tag_field="type", tag="namespace", kw_only=True):
    """A `namespace` tool (functions grouped under one name), as echoed in the response."""

    name: str
    description: str
    tools: list[FunctionTool]


class FileSearchTool(Struct, tag_field="type", tag="file_search", kw_only=True):
    """The `file_search` tool: run by the gateway over its own vector stores."""

    vector_store_ids: list[str]
    max_num_results: Annotated[int, Meta(ge=1, le=50)] = 10
    filters: dict[str, Any] | None = None
    ranking_options: dict[str, Any] | UnsetType = UNSET


class ToolChoiceFunction(Struct, tag_field="type", tag="function"):
    """`tool_choice` forcing one function."""

    name: str


class IncompleteDetails(Struct):
    """Why a response stopped early."""

    reason: Literal["max_output_tokens", "content_filter"]


class InputTokensDetails(Struct, kw_only=True):
    """Input token breakdown; the gateway reports no prompt caching."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, kw_only=True):
    """Output token breakdown; reasoning tokens are not counted apart by chat backends."""

    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    """Token counts of one response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseObject(Struct, kw_only=True):
    """A response: the body of POST /v1/responses and the payload of lifecycle events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    completed_at: int | None = None
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: ReasoningConfig | None
    temperature: float | None
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction
    tools: list[FunctionTool | NamespaceTool | FileSearchTool]
    top_p: float | None
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | UnsetType = UNSET
    user: str | UnsetType = UNSET
    metadata: dict[str, str]


# Stream events: `sequence_number` is set by the stream as it sends them.


class ResponseCreated(Struct, tag_field="type", tag="response.created", kw_only=True):
    """The response was created (status in_progress, no output yet)."""

    response: ResponseObject
    sequence_number: int = 0


class ResponseInProgress(Struct, tag_field="type", tag="response.in_progress", kw_only=True):
    """Generation started."""

    response: ResponseObject
    sequence_number: int = 0


class ResponseCompleted(Struct, tag_field="type", tag="response.completed", kw_only=True):
    """The finished response, with its output and usage."""

    response: ResponseObject
    sequence_number: int = 0


class ResponseIncomplete(Struct, tag_field="type", tag="response.incomplete", kw_only=True):
    """The response stopped early (e.g. at max_output_tokens), with what was generated."""

    response: ResponseObject
    sequence_number: int = 0


class OutputItemAdded(Struct, tag_field="type", tag="response.output_item.added", kw_only=True):
    """An output item starts."""

    output_index: int
    item: OutputItem
    sequence_number: int = 0


class OutputItemDone(Struct, tag_field="type", tag="response.output_item.done", kw_only=True):
    """An output item is finished; `item` is its final form."""

    output_index: int
    item: OutputItem
    sequence_number: int = 0


class ContentPartAdded(Struct, tag_field="type", tag="response.content_part.added", kw_only=True):
    """A content part of a message starts."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class ContentPartDone(Struct, tag_field="type", tag="response.content_part.done", kw_only=True):
    """A content part of a message is finished."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class OutputTextDelta(Struct, tag_field="type", tag="response.output_text.delta", kw_only=True):
    """A piece of message text."""

    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = field(default_factory=list)
    sequence_number: int = 0


class OutputTextDone(Struct, tag_field="type", tag="response.output_text.done", kw_only=True):
    """The whole text of a content part."""

    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = field(default_factory=list)
    sequence_number: int = 0


class FunctionCallArgumentsDelta(
    Struct, tag_field="type", tag="response.function_call_arguments.delta", kw_only=True
):
    """A piece of a function call's JSON arguments."""

    item_id: str
    output_index: int
    delta: str
    sequence_number: int = 0


class FunctionCallArgumentsDone(
    Struct, tag_field="type", tag="response.function_call_arguments.done", kw_only=True
):
    """A function call's whole arguments."""

    item_id: str
    name: str
    output_index: int
    arguments: str
    sequence_number: int = 0


class ReasoningSummaryPartAdded(
    Struct, tag_field="type", tag="response.reasoning_summary_part.added", kw_only=True
):
    """A reasoning summary part starts."""

    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText
    sequence_number: int = 0


class ReasoningSummaryTextDelta(
    Struct, tag_field="type", tag="response.reasoning_summary_text.delta", kw_only=True
):
    """A piece of reasoning text."""

    item_id: str
    output_index: int
    summary_index: int
    delta: str
    sequence_number: int = 0


class ReasoningSummaryTextDone(
    Struct, tag_field="type", tag="response.reasoning_summary_text.done", kw_only=True
):
    """The whole reasoning text of a summary part."""

    item_id: str
    output_index: int
    summary_index: int
    text: str
    sequence_number: int = 0


class ReasoningSummaryPartDone(
    Struct, tag_field="type", tag="response.reasoning_summary_part.done", kw_only=True
):
    """A reasoning summary part is finished."""

    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText
    sequence_number: int = 0


class ErrorEvent(Struct, tag_field="type", tag="error", kw_only=True):
    """A failure after the stream started; the stream ends with it."""

    code: str | None
    message: str
    param: str | None
    sequence_number: int = 0


class FileSearchInProgress(
    Struct, tag_field="type", tag="response.file_search_call.in_progress", kw_only=True
):
    """A file search starts."""

    item_id: str
    output_index: int
    sequence_number: int = 0


class FileSearchSearching(
    Struct, tag_field="type", tag="response.file_search_call.searching", kw_only=True
):
    """A file search is running."""

    item_id: str
    output_index: int
    sequence_number: int = 0


class FileSearchCompleted(
    Struct, tag_field="type", tag="response.file_search_call.completed", kw_only=True
):
    """A file search is done."""

    item_id: str
    output_index: int
    sequence_number: int = 0


class OutputTextAnnotationAdded(
    Struct, tag_field="type", tag="response.output_text.annotation.added", kw_only=True
):
    """An annotation (a file citation) of the text being streamed."""

    item_id: str
    output_index: int
    content_index: int
    annotation_index: int
    annotation: FileCitation
    sequence_number: int = 0


StreamEvent = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | OutputTextDelta
    | OutputTextDone
    | FunctionCallArgumentsDelta
    | FunctionCallArgumentsDone
    | ReasoningSummaryPartAdded
    | ReasoningSummaryTextDelta
    | ReasoningSummaryTextDone
    | ReasoningSummaryPartDone
    | FileSearchInProgress
    | FileSearchSearching
    | FileSearchCompleted
    | OutputTextAnnotationAdded
    | ErrorEvent
)
"""Every event the gateway streams; its tag is both the SSE `event:` name and its `type`."""
