"""The Responses API as a bridge onto chat completions, so that every chat backend serves it.

Pure conversions: a `CreateResponse` becomes a `ChatCompletionRequest`; a `ChatCompletion`
becomes a response object; a stream of chat chunks becomes the Responses API's named events
(`ResponseStream`). The gateway is stateless, so anything that needs a stored response
(`previous_response_id`, `conversation`, `background`, item references) is a clear 400.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec

from app.api.bodies import convert
from app.api.errors import translate
from app.api.hosted_tools import OPENAI_BUILT_IN_TOOLS, LeftOut, refuse_forced, refuse_required
from app.api.responses.protocol import (
    ContentPartAdded,
    ContentPartDone,
    CreateResponse,
    ErrorEvent,
    FileCitation,
    FileSearchCallItem,
    FileSearchCompleted,
    FileSearchInProgress,
    FileSearchResult,
    FileSearchSearching,
    FileSearchTool,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutputInput,
    FunctionTool,
    IncompleteDetails,
    InputFile,
    InputImage,
    InputMessage,
    InputPart,
    InputText,
    MessageItem,
    NamespaceTool,
    NamespaceToolParam,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextAnnotationAdded,
    OutputTextDelta,
    OutputTextDone,
    ReasoningItem,
    ReasoningSummaryPartAdded,
    ReasoningSummaryPartDone,
    ReasoningSummaryTextDelta,
    ReasoningSummaryTextDone,
    Refusal,
    ResponseCompleted,
    ResponseCreated,
    ResponseIncomplete,
    ResponseInProgress,
    ResponseObject,
    ResponseUsage,
    StreamEvent,
    SummaryText,
    TextConfig,
    TextFormat,
    ToolChoiceFunction,
)
from app.api.sse import NamedEvent
from app.errors import InvalidRequest, UnsupportedParameter, UpstreamError
from app.knowledge.search import Result
from app.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageUrl,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    RefusalPart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

T = TypeVar("T")

# Chat knows three image details; others (e.g. "original") fall back to the backend's default.
_IMAGE_DETAIL: dict[str, Literal["auto", "low", "high"]] = {
    "auto": "auto",
    "low": "low",
    "high": "high",
}
_INCOMPLETE: dict[str, Literal["max_output_tokens", "content_filter"]] = {
    "length": "max_output_tokens",
    "content_filter": "content_filter",
}


def new_id(prefix: str) -> str:
    """A Responses-style object id: `resp_…`, `msg_…`, `fc_…`, `rs_…`."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _refuse_stateful(req: CreateResponse) -> None:
    """The gateway stores no responses or conversations: say so instead of ignoring them."""
    if req.previous_response_id is not None:
        raise UnsupportedParameter(
            "previous_response_id is not supported: this gateway is stateless and stores no "
            "responses; send the whole conversation in `input` instead",
            param="previous_response_id",
        )
    if req.conversation is not None:
        raise UnsupportedParameter(
            "conversation is not supported: this gateway is stateless; send the whole "
            "conversation in `input` instead",
            param="conversation",
        )
    if req.background:
        raise UnsupportedParameter(
            "background responses are not supported: this gateway stores no responses to "
            "poll; send the request without `background`",
            param="background",
        )


def _chat_part(part: InputPart, param: str) -> ContentPart:
    """One input content part as a chat content part."""
    if isinstance(part, InputText | OutputText):
        return TextPart(text=part.text)
    if isinstance(part, Refusal):
        return RefusalPart(refusal=part.refusal)
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise UnsupportedParameter(
                "input_image needs an image_url (a URL or data: URI); file ids need the Files "
                "API, which this gateway does not have",
                param=f"{param}.image_url",
            )
        detail = _IMAGE_DETAIL.get(part.detail or "")
        return ImagePart(image_url=ImageUrl(url=part.image_url, detail=detail))
    assert isinstance(part, InputFile)
    raise UnsupportedParameter(
        "input_file content is not supported; send the file's text as input_text",
        param=f"{param}.type",
    )


def _chat_content(content: str | list[InputPart], param: str) -> str | list[ContentPart]:
    """Message content for chat: text-only parts are joined into one string, which every
    backend and chat template takes; parts with images stay a list."""
    if isinstance(content, str):
        return content
    parts = [_chat_part(part, f"{param}[{i}]") for i, part in enumerate(content)]
    if all(isinstance(part, TextPart) for part in parts):
        return "".join(part.text for part in parts if isinstance(part, TextPart))
    return parts


def _output_text(output: str | list[InputPart], param: str) -> str:
    """A function call's output as tool message text (chat tool messages carry text only)."""
    content = _chat_content(output, param)
    if isinstance(content, str):
        return content
    raise UnsupportedParameter(
        "a function_call_output can only hold text for this gateway", param=param
    )


_ITEM_TYPES: dict[str, type[InputMessage | FunctionCallInput | FunctionCallOutputInput]] = {
    "message": InputMessage,
    "function_call": FunctionCallInput,
    "function_call_output": FunctionCallOutputInput,
}


def _input_item(
    raw: dict[str, Any], param: str
) -> InputMessage | FunctionCallInput | FunctionCallOutputInput | None:
    """Decode one input item by its `type`; None for items the chat path has no use for."""
    kind = raw.get("type", "message")
    item_type = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
    if item_type is not None:
        return convert(raw, item_type, param)
    if kind == "reasoning":
        # Earlier turns' reasoning, sent back by stateless clients (Codex): chat templates
        # drop past reasoning anyway, so it is skipped rather than refused.
        return None
    if kind == "item_reference":
        raise UnsupportedParameter(
            "item_reference is not supported: this gateway is stateless and stores no items; "
            "send the item itself",
            param=param,
        )
    raise UnsupportedParameter(
        f"input items of type {kind!r} are not supported; this gateway takes messages, "
        "function_call and function_call_output items",
        param=f"{param}.type",
    )


def chat_messages(req: CreateResponse) -> list[ChatMessage]:
    """`instructions` and `input` as chat messages.

    `function_call` items become assistant `tool_calls` (joined onto the assistant message
    just before them, as chat puts text and calls in one message); `function_call_output`
    items become tool messages.
    """
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
        return messages
    before = len(messages)
    for i, raw in enumerate(req.input):
        param = f"input[{i}]"
        item = _input_item(raw, param)
        if isinstance(item, InputMessage):
            content = _chat_content(item.content, f"{param}.content")
            messages.append(ChatMessage(role=item.role, content=content))
        elif isinstance(item, FunctionCallInput):
            name = item.name if item.namespace is None else flat_name(item.namespace, item.name)
            call = ToolCall(
                id=item.call_id, function=FunctionCall(name=name, arguments=item.arguments)
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                calls = [*(last.tool_calls or []), call]
                messages[-1] = msgspec.structs.replace(last, tool_calls=calls)
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputInput):
            text = _output_text(item.output, f"{param}.output")
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=text))
    if len(messages) == before:
        raise InvalidRequest("input must hold at least one message or item", param="input")
    return messages


_NAMESPACE_DELIMITER = "__"


def flat_name(namespace: str, name: str) -> str:
    """A namespaced function's name as a plain function tool: `namespace__name`, the form
    Codex itself uses where a boundary has no namespaces (stray underscores trimmed)."""
    return f"{namespace.rstrip('_')}{_NAMESPACE_DELIMITER}{name.lstrip('_')}"


@dataclass(frozen=True, slots=True)
class ChatTools:
    """A request's tools as chat sees them, and what the response needs to know of them."""

    tools: list[Tool]
    echoed: list[FunctionTool | NamespaceTool | FileSearchTool]
    """As the response echoes them: built-in tools left out are not among them."""
    namespaced: dict[str, tuple[str, str]]
    """Flat name -> (namespace, name), to map the model's calls back."""
    left_out: list[LeftOut]
    searches: list[FileSearchTool] = field(default_factory=list)
    """`file_search` tools, which the gateway runs itself (at most one)."""


def _function_tool(
    raw: dict[str, Any], param: str, flat: str | None = None
) -> tuple[Tool, FunctionTool]:
    """A Responses function tool as a chat tool (under `flat` if given) and as echoed."""
    if raw.get("type") != "function":
        raise UnsupportedParameter(
            f"tools of type {raw.get('type')!r} are not supported inside a namespace; only "
            "function tools are",
            param=f"{param}.type",
        )
    # The Responses shape is chat's `function` object flattened beside `type`: decoding it
    # as a FunctionDefinition applies chat's checks (e.g. on the name) and ignores `type`.
    function = convert(raw, FunctionDefinition, param)
    echoed = FunctionTool(
        name=function.name,
        description=function.description if function.description is not None else msgspec.UNSET,
        parameters=function.parameters,
        strict=function.strict,
    )
    if flat is not None:
        function = msgspec.structs.replace(function, name=flat)
    return Tool(type="function", function=function), echoed


def chat_tools(req: CreateResponse) -> ChatTools:
    """Function tools as chat tools; a namespace's functions flattened (`flat_name`); built-in
    tools left out; anything else refused."""
    out = ChatTools(tools=[], echoed=[], namespaced={}, left_out=[])
    seen: dict[str, str] = {}

    def add(tool: Tool, param: str) -> None:
        name = tool.function.name
        if name in seen:
            raise InvalidRequest(
                f"{param} is named {name!r}, as {seen[name]} is; tool names must be unique",
                param=param,
            )
        seen[name] = param
        out.tools.append(tool)

    for i, raw in enumerate(req.tools or []):
        param = f"tools[{i}]"
        kind = raw.get("type")
        if kind == "function":
            tool, echoed = _function_tool(raw, param)
            add(tool, param)
            out.echoed.append(echoed)
        elif kind == "namespace":
            namespace = convert(raw, NamespaceToolParam, param)
            members: list[FunctionTool] = []
            for j, member in enumerate(namespace.tools):
                name = member.get("name")
                flat = flat_name(namespace.name, name) if isinstance(name, str) else None
                tool, echoed = _function_tool(member, f"{param}.tools[{j}]", flat)
                add(tool, f"{param}.tools[{j}]")
                out.namespaced[tool.function.name] = (namespace.name, echoed.name)
                members.append(echoed)
            out.echoed.append(
                NamespaceTool(
                    name=namespace.name, description=namespace.description or "", tools=members
                )
            )
        elif kind == "file_search":
            if out.searches:
                raise InvalidRequest(
                    f"{param}: only one file_search tool may be given", param=param
                )
            search = convert(raw, FileSearchTool, param)
            if not search.vector_store_ids:
                raise InvalidRequest(
                    f"{param}.vector_store_ids must name at least one vector store",
                    param=f"{param}.vector_store_ids",
                )
            out.searches.append(search)
            out.echoed.append(search)
        elif kind in OPENAI_BUILT_IN_TOOLS:
            out.left_out.append(LeftOut(param, str(kind)))
        else:
            raise UnsupportedParameter(
                f"tools of type {kind!r} are not supported; function and namespace tools are "
                "(built-in tools such as web_search are left out, as this gateway cannot run "
                "them)",
                param=f"{param}.type",
            )
    return out


ChatToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | None


def chat_tool_choice(
    req: CreateResponse, tools: ChatTools
) -> tuple[ChatToolChoice, Literal["none", "auto", "required"] | ToolChoiceFunction]:
    """`tool_choice` for chat, and as echoed in the response ("auto" when unset)."""
    choice = req.tool_choice
    if choice is None:
        return None, "auto"
    if isinstance(choice, str):
        if choice == "required" and not tools.tools and tools.searches:
            return None, "required"  # the search is the tool; it always runs
        if choice == "required" and not tools.tools and tools.left_out:
            raise refuse_required(tools.left_out, "tool_choice")
        return choice, choice
    kind = choice.get("type")
    name = choice.get("name")
    if kind == "function" and isinstance(name, str):
        namespace = choice.get("namespace")
        flat = flat_name(namespace, name) if isinstance(namespace, str) else name
        return NamedToolChoice(type="function", function=NamedFunction(flat)), ToolChoiceFunction(
            name
        )
    if kind == "file_search" and tools.searches:
        return ("none" if tools.tools else None), "required"
    if kind in OPENAI_BUILT_IN_TOOLS:
        raise refuse_forced(str(kind), "tool_choice")
    raise UnsupportedParameter(
        f"tool_choice of type {kind!r} is not supported; use 'auto', 'none', "
        "'required' or {'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def chat_response_format(text: TextConfig | None) -> ResponseFormat | None:
    """`text.format` as chat's `response_format`; plain text is the default and left unset."""
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.name is None:
        raise InvalidRequest(
            "text.format.name is required when type is json_schema", param="text.format.name"
        )
    if fmt.schema is None:
        raise InvalidRequest(
            "text.format.schema is required when type is json_schema", param="text.format.schema"
        )
    schema = JsonSchemaFormat(
        name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict
    )
    return ResponseFormat(type="json_schema", json_schema=schema)


def _echoed_text(text: TextConfig | None) -> TextConfig:
    """`text` as the response echoes it: the format is always named, "text" by default."""
    if text is None:
        return TextConfig(format=TextFormat(type="text"))
    return TextConfig(format=text.format or TextFormat(type="text"), verbosity=text.verbosity)


@dataclass(frozen=True, slots=True)
class Bridged:
    """A Responses request translated: the chat request to run and the response shell."""

    chat: ChatCompletionRequest
    shell: ResponseObject
    """The response as it starts: id, echoed parameters, status in_progress, no output."""
    namespaced: dict[str, tuple[str, str]]
    """Flat tool name -> (namespace, name): how the model's calls are named in the output."""
    left_out: list[LeftOut]
    """Built-in tools the model does not see."""
    file_search: FileSearchTool | None = None
    """The `file_search` tool, run before the model answers."""
    include_results: bool = False
    """`include` asks for `file_search_call.results`."""


def bridge_request(req: CreateResponse) -> Bridged:
    """Translate a Responses request; 400 for what the chat path cannot do."""
    _refuse_stateful(req)
    messages = chat_messages(req)
    offered = chat_tools(req)
    tools = offered.tools
    tool_choice, echoed_choice = chat_tool_choice(req, offered)
    chat = ChatCompletionRequest(
        messages=messages,
        model=req.model,
        user=req.user,
        reasoning_effort=req.reasoning.effort if req.reasoning else None,
        max_tokens=req.max_output_tokens,
        response_format=chat_response_format(req.text),
        stream=req.stream,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=tools or None,
        # With every tool left out, a tool_choice would reach the backend without tools.
        tool_choice=None if (offered.left_out or offered.searches) and not tools else tool_choice,
        # OpenAI's chat API refuses parallel_tool_calls without tools; upstreams may too.
        parallel_tool_calls=req.parallel_tool_calls if tools else None,
    )
    shell = ResponseObject(
        id=new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=req.model,
        output=[],
        parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning=req.reasoning,
        temperature=req.temperature,
        text=_echoed_text(req.text),
        tool_choice=echoed_choice,
        tools=offered.echoed,
        top_p=req.top_p,
        truncation=req.truncation or "disabled",
        user=req.user if req.user is not None else msgspec.UNSET,
        metadata=req.metadata or {},
    )
    return Bridged(
        chat=chat,
        shell=shell,
        namespaced=offered.namespaced,
        left_out=offered.left_out,
        file_search=offered.searches[0] if offered.searches else None,
        include_results="file_search_call.results" in (req.include or []),
    )


def response_usage(usage: Usage) -> ResponseUsage:
    """Chat usage in Responses terms."""
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _finished(
    shell: ResponseObject,
    model: str,
    output: list[OutputItem],
    finish_reason: str | None,
    usage: Usage | None,
) -> ResponseObject:
    """The final response: completed, or incomplete when generation was cut short."""
    incomplete = _INCOMPLETE.get(finish_reason or "")
    return msgspec.structs.replace(
        shell,
        model=model,
        status="incomplete" if incomplete else "completed",
        completed_at=None if incomplete else int(time.time()),
        incomplete_details=IncompleteDetails(incomplete) if incomplete else None,
        output=output,
        usage=response_usage(usage) if usage else msgspec.UNSET,
    )


def _item_status(finish_reason: str | None) -> Literal["completed", "incomplete"]:
    return "incomplete" if finish_reason in _INCOMPLETE else "completed"


def _call_item(
    item_id: str,
    call_id: str,
    name: str,
    arguments: str,
    status: Literal["in_progress", "completed"],
    namespaced: dict[str, tuple[str, str]],
) -> FunctionCallItem:
    """A function call item; a flattened namespace function is named as the client named it."""
    namespace, own = namespaced.get(name, (None, name))
    return FunctionCallItem(
        id=item_id,
        call_id=call_id,
        namespace=msgspec.UNSET if namespace is None else namespace,
        name=own,
        arguments=arguments,
        status=status,
    )


def _output_items(choice: ChatChoice, namespaced: dict[str, tuple[str, str]]) -> list[OutputItem]:
    """A chat choice's reasoning, text and tool calls as output items, in that order."""
    message = choice.message
    status = _item_status(choice.finish_reason)
    items: list[OutputItem] = []
    reasoning = message.reasoning_content
    if isinstance(reasoning, str) and reasoning:
        items.append(
            ReasoningItem(id=new_id("rs"), summary=[SummaryText(reasoning)], status=status)
        )
    content: list[OutputText | Refusal] = []
    if message.content:
        content.append(OutputText(text=message.content))
    if message.refusal:
        content.append(Refusal(refusal=message.refusal))
    calls = message.tool_calls if isinstance(message.tool_calls, list) else []
    if content or not calls:
        # With nothing else to show, an empty message keeps `output_text` and clients that
        # read the first message working.
        items.append(
            MessageItem(id=new_id("msg"), status=status, content=content or [OutputText(text="")])
        )
    items.extend(
        _call_item(
            new_id("fc"),
            call.id,
            call.function.name,
            call.function.arguments,
            "completed",
            namespaced,
        )
        for call in calls
    )
    return items


@dataclass(frozen=True, slots=True)
class Grounding:
    """What a grounded response adds around the model's message: the file search it ran (the
    `file_search` tool) and the passages the model was given, cited in its text."""

    passages: list[Result]
    search: FileSearchCallItem | None = None


_MARKER = re.compile(r"\[(\d{1,3})\]")


def file_search_item(query: str, results: list[Result], *, include: bool) -> FileSearchCallItem:
    """The `file_search_call` output item (with its hits when `include` asks for them)."""
    return FileSearchCallItem(
        id=new_id("fs"),
        status="completed",
        queries=[query],
        results=[
            FileSearchResult(
                file_id=r.file_id,
                filename=r.filename,
                score=r.score,
                text=r.text,
                attributes=dict(r.attributes),
            )
            for r in results
        ]
        if include
        else None,
    )


def citations(text: str, passages: list[Result]) -> list[FileCitation]:
    """File citations of an answer: where it cites passage [n], a citation of its file there;
    a file given but never cited by number is cited once at the end."""
    found: list[FileCitation] = []
    cited: set[str] = set()
    for match in _MARKER.finditer(text):
        number = int(match.group(1))
        if 1 <= number <= len(passages):
            passage = passages[number - 1]
            found.append(
                FileCitation(file_id=passage.file_id, filename=passage.filename, index=match.end())
            )
            cited.add(passage.file_id)
    for passage in passages:
        if passage.file_id not in cited:
            cited.add(passage.file_id)
            found.append(
                FileCitation(file_id=passage.file_id, filename=passage.filename, index=len(text))
            )
    return found


def _cite(items: list[OutputItem], passages: list[Result]) -> list[OutputItem]:
    for i, item in enumerate(items):
        if isinstance(item, MessageItem) and item.content:
            first = item.content[0]
            if isinstance(first, OutputText):
                cited = OutputText(text=first.text, annotations=citations(first.text, passages))
                items[i] = msgspec.structs.replace(item, content=[cited, *item.content[1:]])
            break
    return items


def bridge_response(
    completion: ChatCompletion,
    shell: ResponseObject,
    namespaced: dict[str, tuple[str, str]] | None = None,
    grounding: Grounding | None = None,
) -> ResponseObject:
    """A chat completion as the response to a Responses request (`Bridged.namespaced` names
    the calls of namespaced functions; `grounding` adds the file search and citations)."""
    choice = completion.choices[0]
    usage = completion.usage if isinstance(completion.usage, Usage) else None
    output = _output_items(choice, namespaced or {})
    if grounding is not None:
        output = _cite(output, grounding.passages)
        if grounding.search is not None:
            output.insert(0, grounding.search)
    return _finished(shell, completion.model, output, choice.finish_reason, usage)


@dataclass(slots=True)
class _OpenItem:
    """The output item being streamed: its kind, place, id and what it has so far."""

    kind: Literal["message", "reasoning", "function_call"]
    output_index: int
    id: str
    parts: list[str] = field(default_factory=list)
    tool_index: int | None = None
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        """Everything streamed into the item."""
        return "".join(self.parts)


class ResponseStream:
    """Turns chat chunks into the Responses API's events, in the order OpenAI sends them.

    One output item is open at a time: text, reasoning and each tool call (stitched by its
    chat `index`) open an item when they start and close the previous one. Events are
    numbered as they are made, the error event included.
    """

    def __init__(
        self,
        shell: ResponseObject,
        namespaced: dict[str, tuple[str, str]] | None = None,
        grounding: Grounding | None = None,
    ) -> None:
        self._shell = shell
        self._namespaced = namespaced or {}
        self._grounding = grounding
        self._cited = False
        self._sequence = 0
        self._output: list[OutputItem] = []
        self._open: _OpenItem | None = None
        self._done_tools: set[int] = set()
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def _number(self, event: StreamEvent) -> StreamEvent:
        event.sequence_number = self._sequence
        self._sequence += 1
        return event

    def start(self, model: str | None) -> list[StreamEvent]:
        """`response.created` and `response.in_progress`, for the model that answers."""
        if model is not None:
            self._shell = msgspec.structs.replace(self._shell, model=model)
        events: list[StreamEvent] = [
            ResponseCreated(response=self._shell),
            ResponseInProgress(response=self._shell),
        ]
        search = self._grounding.search if self._grounding else None
        if search is not None:  # run before the model started; told in OpenAI's order
            index, item_id = len(self._output), search.id
            running = msgspec.structs.replace(search, status="in_progress", results=None)
            events += [
                OutputItemAdded(output_index=index, item=running),
                FileSearchInProgress(item_id=item_id, output_index=index),
                FileSearchSearching(item_id=item_id, output_index=index),
                FileSearchCompleted(item_id=item_id, output_index=index),
                OutputItemDone(output_index=index, item=search),
            ]
            self._output.append(search)
        return [self._number(event) for event in events]

    def feed(self, chunk: ChatCompletionChunk) -> list[StreamEvent]:
        """The events one chat chunk makes (none for role-only or empty deltas)."""
        events: list[StreamEvent] = []
        if isinstance(chunk.usage, Usage):
            self._usage = chunk.usage
        for choice in chunk.choices[:1]:  # n is 1 on this path
            delta = choice.delta
            if isinstance(delta.reasoning_content, str) and delta.reasoning_content:
                events += self._text("reasoning", delta.reasoning_content)
            if isinstance(delta.content, str) and delta.content:
                events += self._text("message", delta.content)
            if isinstance(delta.tool_calls, list):
                for call in delta.tool_calls:
                    events += self._tool_call(call)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
        return [self._number(event) for event in events]

    def finish(self) -> list[StreamEvent]:
        """Close the open item and end with `response.completed` (or `.incomplete`)."""
        events = self._close(_item_status(self._finish_reason))
        if not self._output:
            # Nothing generated: an empty message, as the non-streamed response has.
            events += self._open_item("message") + self._close("completed")
        final = _finished(
            self._shell, self._shell.model, self._output, self._finish_reason, self._usage
        )
        end = ResponseCompleted if final.status == "completed" else ResponseIncomplete
        events.append(end(response=final))
        return [self._number(event) for event in events]

    def error(self, exc: Exception) -> NamedEvent:
        """The `error` event that ends a stream failing after its first event."""
        error = translate(exc).body.error
        event = ErrorEvent(code=error.code, message=error.message, param=error.param)
        return named(self._number(event))

    def _text(self, kind: Literal["message", "reasoning"], text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._open is None or self._open.kind != kind:
            events += self._close("completed") + self._open_item(kind)
        item = self._open
        assert item is not None
        item.parts.append(text)
        if kind == "message":
            events.append(
                OutputTextDelta(
                    item_id=item.id, output_index=item.output_index, content_index=0, delta=text
                )
            )
        else:
            events.append(
                ReasoningSummaryTextDelta(
                    item_id=item.id, output_index=item.output_index, summary_index=0, delta=text
                )
            )
        return events

    def _tool_call(self, call: ToolCallDelta) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        function = call.function if isinstance(call.function, dict) else {}
        item = self._open
        if item is None or item.tool_index != call.index:
            if call.index in self._done_tools:
                raise UpstreamError(
                    f"the backend interleaved the fragments of tool call {call.index} with "
                    "another one; the Responses API streams one call at a time"
                )
            name = function.get("name")
            if not name:
                raise UpstreamError(f"the backend's tool call {call.index} came without a name")
            call_id = call.id if isinstance(call.id, str) and call.id else new_id("call")
            events += self._close("completed")
            events += self._open_item("function_call", call.index, call_id, name)
            item = self._open
            assert item is not None
        arguments = function.get("arguments")
        if arguments:
            item.parts.append(arguments)
            events.append(
                FunctionCallArgumentsDelta(
                    item_id=item.id, output_index=item.output_index, delta=arguments
                )
            )
        return events

    def _open_item(
        self,
        kind: Literal["message", "reasoning", "function_call"],
        tool_index: int | None = None,
        call_id: str = "",
        name: str = "",
    ) -> list[StreamEvent]:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item = _OpenItem(
            kind=kind,
            output_index=len(self._output),
            id=new_id(prefix),
            tool_index=tool_index,
            call_id=call_id,
            name=name,
        )
        self._open = item
        index = item.output_index
        if kind == "message":
            return [
                OutputItemAdded(
                    output_index=index,
                    item=MessageItem(id=item.id, status="in_progress", content=[]),
                ),
                ContentPartAdded(
                    item_id=item.id, output_index=index, content_index=0, part=OutputText(text="")
                ),
            ]
        if kind == "reasoning":
            return [
                OutputItemAdded(
                    output_index=index,
                    item=ReasoningItem(id=item.id, summary=[], status="in_progress"),
                ),
                ReasoningSummaryPartAdded(
                    item_id=item.id, output_index=index, summary_index=0, part=SummaryText("")
                ),
            ]
        return [
            OutputItemAdded(
                output_index=index,
                item=_call_item(item.id, call_id, name, "", "in_progress", self._namespaced),
            )
        ]

    def _close(self, status: Literal["completed", "incomplete"]) -> list[StreamEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        index, text = item.output_index, item.text
        done: OutputItem
        events: list[StreamEvent]
        if item.kind == "message":
            cited: list[FileCitation] = []
            if self._grounding is not None and not self._cited:
                self._cited = True
                cited = citations(text, self._grounding.passages)
            part = OutputText(text=text, annotations=list(cited))
            done = MessageItem(id=item.id, status=status, content=[part])
            events = [
                *(
                    OutputTextAnnotationAdded(
                        item_id=item.id,
                        output_index=index,
                        content_index=0,
                        annotation_index=n,
                        annotation=citation,
                    )
                    for n, citation in enumerate(cited)
                ),
                OutputTextDone(item_id=item.id, output_index=index, content_index=0, text=text),
                ContentPartDone(item_id=item.id, output_index=index, content_index=0, part=part),
            ]
        elif item.kind == "reasoning":
            summary = SummaryText(text)
            done = ReasoningItem(id=item.id, summary=[summary], status=status)
            events = [
                ReasoningSummaryTextDone(
                    item_id=item.id, output_index=index, summary_index=0, text=text
                ),
                ReasoningSummaryPartDone(
                    item_id=item.id, output_index=index, summary_index=0, part=summary
                ),
            ]
        else:
            assert item.tool_index is not None
            self._done_tools.add(item.tool_index)
            call = _call_item(item.id, item.call_id, item.name, text, "completed", self._namespaced)
            done = call
            events = [
                FunctionCallArgumentsDone(
                    item_id=item.id, name=call.name, output_index=index, arguments=text
                )
            ]
        self._output.append(done)
        return [*events, OutputItemDone(output_index=index, item=done)]


def named(event: StreamEvent) -> NamedEvent:
    """An event with its SSE name, which is its `type` tag."""
    return str(event.__struct_config__.tag), event


async def response_events(
    chunks: AsyncIterator[ChatCompletionChunk], stream: ResponseStream
) -> AsyncIterator[NamedEvent]:
    """The named events of a streamed response.

    The first chat chunk is awaited before `response.created` is made, so a backend that
    fails before its first token fails the request with its own status, not an error event.
    """
    async with aclosing(chunks):  # type: ignore[type-var]
        first = await anext(chunks, None)
        for event in stream.start(first.model if first else None):
            yield named(event)
        if first is not None:
            for event in stream.feed(first):
                yield named(event)
            async for chunk in chunks:
                for event in stream.feed(chunk):
                    yield named(event)
        for event in stream.finish():
            yield named(event)
