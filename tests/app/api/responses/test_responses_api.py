"""POST /v1/responses: the bridge's conversions, and the route on mock backends.

Bodies and events are validated against OpenAI's spec (../shared/openai-openapi.yaml).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from app.api.responses.bridge import (
    ResponseStream,
    bridge_request,
    bridge_response,
    chat_messages,
    flat_name,
    named,
    response_events,
)
from app.api.responses.protocol import CreateResponse
from app.errors import GatewayError, InvalidRequest, UnsupportedParameter, UpstreamError
from app.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChunkChoice,
    ChunkDelta,
    FunctionCall,
    ImagePart,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from compat_tests.openapi_schema import validate
from tests.conftest import AUTH, AppClient, make_config

# The spec schema of each event type the gateway sends.
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_summary_part.added": "ResponseReasoningSummaryPartAddedEvent",
    "response.reasoning_summary_text.delta": "ResponseReasoningSummaryTextDeltaEvent",
    "response.reasoning_summary_text.done": "ResponseReasoningSummaryTextDoneEvent",
    "response.reasoning_summary_part.done": "ResponseReasoningSummaryPartDoneEvent",
    "error": "ResponseErrorEvent",
}


def function_tool(name: str, description: str, argument: str) -> dict[str, Any]:
    """A Responses function tool taking one string argument."""
    return {
        "type": "function",
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": {argument: {"type": "string"}}},
        "strict": False,
    }


WEATHER_TOOL = function_tool("get_weather", "Weather of a city", "city")


def request(**fields: Any) -> CreateResponse:
    """A decoded request, as the route decodes it."""
    body: dict[str, Any] = {"model": "mock", "input": "hello there", **fields}
    return msgspec.convert(body, CreateResponse)


def check_event(event: dict[str, Any]) -> None:
    """An event validated as a ResponseStreamEvent and as its own schema."""
    validate("ResponseStreamEvent", event)
    validate(EVENT_SCHEMAS[event["type"]], event)


def as_json(value: Any) -> Any:
    return json.loads(msgspec.json.encode(value))


# ---- request conversion


def test_string_input_is_one_user_message() -> None:
    assert chat_messages(request()) == [ChatMessage(role="user", content="hello there")]


def test_instructions_come_first_as_a_system_message() -> None:
    messages = chat_messages(
        request(instructions="be brief", input=[{"role": "user", "content": "hi"}])
    )
    assert messages == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
    ]


def test_message_parts_become_chat_content() -> None:
    messages = chat_messages(
        request(
            input=[
                {"type": "message", "role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "hello "},
                        {"type": "input_text", "text": "parts"},
                    ],
                },
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is this?"},
                        {
                            "type": "input_image",
                            "image_url": "data:image/png;base64,AAAA",
                            "detail": "low",
                        },
                    ],
                },
            ]
        )
    )
    assert [(m.role, m.content) for m in messages[:3]] == [
        ("developer", "rules"),
        ("user", "hello parts"),
        ("assistant", "hi"),
    ]
    image = messages[3]
    assert image.text() == "what is this?"
    assert isinstance(image.content, list)
    part = image.content[1]
    assert isinstance(part, ImagePart)
    assert (part.image_url.url, part.image_url.detail) == ("data:image/png;base64,AAAA", "low")


def test_function_call_round_trip_becomes_tool_calls_and_tool_messages() -> None:
    messages = chat_messages(
        request(
            input=[
                {"role": "user", "content": "weather in Paris and Rome?"},
                {"role": "assistant", "content": "Let me look."},
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "status": "completed",
                    "call_id": "call_a",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                },
                {
                    "type": "function_call",
                    "call_id": "call_b",
                    "name": "get_weather",
                    "arguments": '{"city":"Rome"}',
                },
                {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "call_b",
                    "output": [{"type": "input_text", "text": "rainy"}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_c",
                    "name": "get_weather",
                    "arguments": "{}",
                },
            ]
        )
    )
    assert messages == [
        ChatMessage(role="user", content="weather in Paris and Rome?"),
        ChatMessage(
            role="assistant",
            content="Let me look.",
            tool_calls=[
                ToolCall(
                    id="call_a",
                    function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
                ),
                ToolCall(
                    id="call_b",
                    function=FunctionCall(name="get_weather", arguments='{"city":"Rome"}'),
                ),
            ],
        ),
        ChatMessage(role="tool", tool_call_id="call_a", content="sunny"),
        ChatMessage(role="tool", tool_call_id="call_b", content="rainy"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                ToolCall(id="call_c", function=FunctionCall(name="get_weather", arguments="{}"))
            ],
        ),
    ]


def test_reasoning_items_sent_back_are_skipped() -> None:
    messages = chat_messages(
        request(
            input=[
                {"role": "user", "content": "hi"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
                {"role": "assistant", "content": "hello"},
            ]
        )
    )
    assert [m.role for m in messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("input_", "param", "error"),
    [
        ([], "input", InvalidRequest),
        ([{"type": "item_reference", "id": "msg_1"}], "input[0]", UnsupportedParameter),
        ([{"type": "web_search_call", "id": "ws_1"}], "input[0].type", UnsupportedParameter),
        ([{"role": "wizard", "content": "x"}], "input[0].role", InvalidRequest),
        ([{"role": "user"}], "input[0].content", InvalidRequest),
        (
            [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}],
            "input[0].content[0].type",
            InvalidRequest,
        ),
        (
            [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}],
            "input[0].content[0].type",
            UnsupportedParameter,
        ),
        (
            [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}],
            "input[0].content[0].image_url",
            UnsupportedParameter,
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"type": "function_call_output", "output": "sunny"},
            ],
            "input[1].call_id",
            InvalidRequest,
        ),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}],
            "input[0].arguments",
            InvalidRequest,
        ),
    ],
)
def test_bad_input_items_are_a_400_naming_the_item(
    input_: list[Any], param: str, error: type[GatewayError]
) -> None:
    with pytest.raises(error) as caught:
        chat_messages(request(input=input_))
    assert caught.value.status_code == 400
    assert caught.value.param == param


def test_function_tools_map_to_chat_tools_and_are_echoed() -> None:
    bridged = bridge_request(
        request(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)
    )
    [tool] = bridged.chat.tools or []
    assert tool.function.name == "get_weather"
    assert tool.function.description == "Weather of a city"
    assert tool.function.parameters == WEATHER_TOOL["parameters"]
    assert tool.function.strict is False
    assert bridged.chat.tool_choice == "required"
    assert bridged.chat.parallel_tool_calls is False
    assert as_json(bridged.shell.tools) == [WEATHER_TOOL]
    assert bridged.shell.parallel_tool_calls is False


def test_named_tool_choice() -> None:
    bridged = bridge_request(
        request(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    )
    assert isinstance(bridged.chat.tool_choice, NamedToolChoice)
    assert bridged.chat.tool_choice.function.name == "get_weather"
    assert as_json(bridged.shell.tool_choice) == {"type": "function", "name": "get_weather"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "teleport"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL, {"type": "custom", "name": "patch"}]}, "tools[1].type"),
        (
            {"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "web_search"}]}]},
            "tools[0].tools[0].type",
        ),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"background": True}, "background"),
    ],
)
def test_what_the_chat_path_cannot_do_is_unsupported(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        bridge_request(request(**fields))
    assert caught.value.param == param
    assert caught.value.code == "unsupported_parameter"


def test_unsupported_tool_type_is_named() -> None:
    with pytest.raises(UnsupportedParameter, match="'teleport'"):
        bridge_request(request(tools=[{"type": "teleport"}]))


# What Codex CLI 0.171 offers by default: function tools, a namespace of sub-agent tools and a
# web search that may not reach the web.
SPAWN_TOOL = function_tool("spawn_agent", "Start a sub-agent", "task")
AGENTS_NAMESPACE: dict[str, Any] = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [SPAWN_TOOL],
}
WEB_SEARCH: dict[str, Any] = {"type": "web_search", "external_web_access": False}
CODEX_TOOLS = [WEATHER_TOOL, AGENTS_NAMESPACE, WEB_SEARCH]


def test_built_in_tools_are_left_out_and_namespaces_flattened() -> None:
    bridged = bridge_request(request(tools=CODEX_TOOLS, tool_choice="auto"))
    chat_tools = bridged.chat.tools or []
    assert [t.function.name for t in chat_tools] == ["get_weather", "multi_agent_v1__spawn_agent"]
    assert chat_tools[1].function.parameters == SPAWN_TOOL["parameters"]
    assert bridged.chat.tool_choice == "auto"
    assert [(t.param, t.kind) for t in bridged.left_out] == [("tools[2]", "web_search")]
    assert bridged.namespaced == {"multi_agent_v1__spawn_agent": ("multi_agent_v1", "spawn_agent")}
    # Echoed as sent, less what the model does not see.
    assert as_json(bridged.shell.tools) == [WEATHER_TOOL, AGENTS_NAMESPACE]


def test_only_built_in_tools_leave_no_tools_and_no_tool_choice() -> None:
    bridged = bridge_request(request(tools=[WEB_SEARCH], tool_choice="auto"))
    assert bridged.chat.tools is None
    assert bridged.chat.tool_choice is None
    assert len(bridged.left_out) == 1


def test_flat_names_trim_stray_underscores_as_codex_does() -> None:
    assert flat_name("mcp__github_", "_create_issue") == "mcp__github__create_issue"


def test_tool_names_must_be_unique_once_flattened() -> None:
    clash = {**WEATHER_TOOL, "name": "multi_agent_v1__spawn_agent"}
    with pytest.raises(InvalidRequest) as caught:
        bridge_request(request(tools=[clash, AGENTS_NAMESPACE]))
    assert caught.value.param == "tools[1].tools[0]"


def test_a_namespaced_call_sent_back_reaches_chat_under_its_flat_name() -> None:
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "namespace": "multi_agent_v1",
        "name": "spawn_agent",
        "arguments": "{}",
    }
    messages = chat_messages(request(input=[{"role": "user", "content": "go"}, call]))
    [tool_call] = messages[-1].tool_calls or []
    assert tool_call.function.name == "multi_agent_v1__spawn_agent"


def test_a_namespaced_tool_choice_is_flattened() -> None:
    choice = {"type": "function", "namespace": "multi_agent_v1", "name": "spawn_agent"}
    bridged = bridge_request(request(tools=CODEX_TOOLS, tool_choice=choice))
    assert isinstance(bridged.chat.tool_choice, NamedToolChoice)
    assert bridged.chat.tool_choice.function.name == "multi_agent_v1__spawn_agent"


def test_previous_response_id_says_the_gateway_is_stateless() -> None:
    with pytest.raises(UnsupportedParameter, match="stateless"):
        bridge_request(request(previous_response_id="resp_123"))


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        ({"type": "function", "name": "bad name!"}, "tools[0].name"),
        ({"type": "function", "parameters": {}}, "tools[0].name"),
        ({"type": "function", "name": "f", "parameters": "x"}, "tools[0].parameters"),
    ],
)
def test_bad_function_tool_is_a_400_naming_the_field(tool: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        bridge_request(request(tools=[tool]))
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {
                "format": {
                    "type": "json_schema",
                    "name": "person",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
            {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": {"type": "object"}, "strict": True},
            },
        ),
    ],
)
def test_text_format_becomes_response_format(
    text: dict[str, Any] | None, expected: dict[str, Any] | None
) -> None:
    bridged = bridge_request(request(text=text) if text else request())
    assert as_json(bridged.chat.response_format) == expected
    assert as_json(bridged.shell.text) == (text or {"format": {"type": "text"}})


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "json_schema", "schema": {}}, "text.format.name"),
        ({"type": "json_schema", "name": "n"}, "text.format.schema"),
    ],
)
def test_json_schema_format_needs_name_and_schema(fmt: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        bridge_request(request(text={"format": fmt}))
    assert caught.value.param == param


def test_sampling_and_limits_carry_over() -> None:
    chat = bridge_request(
        request(
            temperature=0.2,
            top_p=0.9,
            max_output_tokens=7,
            reasoning={"effort": "low", "summary": "auto"},
            user="u1",
            metadata={"k": "v"},
            store=False,
            include=["reasoning.encrypted_content"],
            truncation="auto",
            parallel_tool_calls=True,
        )
    ).chat
    assert (chat.temperature, chat.top_p, chat.max_tokens) == (0.2, 0.9, 7)
    assert (chat.reasoning_effort, chat.user) == ("low", "u1")
    assert chat.parallel_tool_calls is None  # only sent with tools
    # Ours to ignore, not the backend's.
    assert chat.metadata is None
    assert chat.store is None


# ---- response conversion


def completion(message: ResponseMessage, finish_reason: Any = "stop") -> ChatCompletion:
    return ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="mock",
        choices=[ChatChoice(index=0, message=message, finish_reason=finish_reason)],
        usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
    )


def test_text_completion_becomes_a_completed_response() -> None:
    shell = bridge_request(request(instructions="be brief", metadata={"k": "v"})).shell
    body = as_json(bridge_response(completion(ResponseMessage(content="Hi!")), shell))
    validate("Response", body)
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["incomplete_details"] is None
    assert body["instructions"] == "be brief"
    assert body["metadata"] == {"k": "v"}
    [item] = body["output"]
    assert item["id"].startswith("msg_")
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant", "completed")
    assert item["content"] == [
        {"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}
    ]
    assert body["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    }


def test_tool_calls_become_function_call_items() -> None:
    shell = bridge_request(request(tools=[WEATHER_TOOL])).shell
    calls = [
        ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"c":1}')),
        ToolCall(id="call_b", function=FunctionCall(name="get_weather", arguments='{"c":2}')),
    ]
    message = ResponseMessage(content=None, tool_calls=calls)
    body = as_json(bridge_response(completion(message, "tool_calls"), shell))
    validate("Response", body)
    assert body["status"] == "completed"
    assert [(i["type"], i["call_id"], i["arguments"]) for i in body["output"]] == [
        ("function_call", "call_a", '{"c":1}'),
        ("function_call", "call_b", '{"c":2}'),
    ]
    assert all(i["id"].startswith("fc_") and i["status"] == "completed" for i in body["output"])


def test_namespaced_calls_come_back_under_their_namespace() -> None:
    bridged = bridge_request(request(tools=CODEX_TOOLS))
    call = ToolCall(
        id="call_a", function=FunctionCall(name="multi_agent_v1__spawn_agent", arguments="{}")
    )
    message = ResponseMessage(content=None, tool_calls=[call])
    body = as_json(
        bridge_response(completion(message, "tool_calls"), bridged.shell, bridged.namespaced)
    )
    validate("Response", body)
    [item] = body["output"]
    assert (item["namespace"], item["name"]) == ("multi_agent_v1", "spawn_agent")


def test_length_becomes_incomplete() -> None:
    shell = bridge_request(request(max_output_tokens=2)).shell
    body = as_json(bridge_response(completion(ResponseMessage(content="one two"), "length"), shell))
    validate("Response", body)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["max_output_tokens"] == 2
    assert body["output"][0]["status"] == "incomplete"


def test_reasoning_content_becomes_a_reasoning_item_first() -> None:
    message = ResponseMessage(content="42", reasoning_content="thinking hard")
    body = as_json(bridge_response(completion(message), bridge_request(request()).shell))
    validate("Response", body)
    reasoning, text = body["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": "thinking hard"}]
    assert text["content"][0]["text"] == "42"


def test_empty_completion_still_has_a_message() -> None:
    body = as_json(
        bridge_response(completion(ResponseMessage(content=None)), bridge_request(request()).shell)
    )
    validate("Response", body)
    assert body["output"][0]["content"][0]["text"] == ""


# ---- stream conversion


def chunk(delta: ChunkDelta | None = None, finish: Any = None, usage: Usage | None = None) -> Any:
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
    return ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="mock", choices=choices, usage=usage or msgspec.UNSET
    )


def call_delta(
    index: int, call_id: str | None = None, name: str | None = None, args: str = ""
) -> Any:
    function = {"arguments": args}
    if name is not None:
        function["name"] = name
    return ChunkDelta(
        tool_calls=[ToolCallDelta(index=index, id=call_id or msgspec.UNSET, function=function)]
    )


async def stream_events(chunks: list[Any], **fields: Any) -> list[dict[str, Any]]:
    """The events a chunk list makes, as JSON, each validated against the spec."""

    async def source() -> AsyncIterator[ChatCompletionChunk]:
        for c in chunks:
            yield c

    bridged = bridge_request(request(**fields))
    stream = ResponseStream(bridged.shell, bridged.namespaced)
    events = []
    async for name, event in response_events(source(), stream):
        body = as_json(event)
        assert body["type"] == name
        check_event(body)
        events.append(body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


USAGE = Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)


async def test_text_stream_events_in_order() -> None:
    events = await stream_events(
        [
            chunk(ChunkDelta(role="assistant", content="")),
            chunk(ChunkDelta(content="Hello ")),
            chunk(ChunkDelta(content="world")),
            chunk(ChunkDelta(), "stop"),
            chunk(usage=USAGE),
        ]
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    assert events[2]["item"]["status"] == "in_progress"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == events[6]["text"] == "Hello world"
    assert events[7]["part"]["text"] == "Hello world"
    item_id = events[2]["item"]["id"]
    assert {e["item_id"] for e in events[3:8]} == {item_id}
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"]
    assert final["status"] == "completed"
    assert final["output"] == [events[8]["item"]]
    assert final["output"][0]["id"] == item_id
    assert final["usage"]["total_tokens"] == 5


async def test_tool_call_stream_is_stitched_by_index() -> None:
    events = await stream_events(
        [
            chunk(ChunkDelta(role="assistant", content=None)),
            chunk(call_delta(0, "call_a", "get_weather")),
            chunk(call_delta(0, args='{"city":')),
            chunk(call_delta(0, args='"Paris"}')),
            chunk(call_delta(1, "call_b", "get_time", '{"tz":')),
            chunk(call_delta(1, args='"CET"}')),
            chunk(ChunkDelta(), "tool_calls"),
            chunk(usage=USAGE),
        ],
        tools=[WEATHER_TOOL],
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    first, second = events[2]["item"], events[7]["item"]
    assert (first["call_id"], first["name"], first["arguments"]) == ("call_a", "get_weather", "")
    assert (second["call_id"], second["name"], events[7]["output_index"]) == (
        "call_b",
        "get_time",
        1,
    )
    first_deltas = "".join(e["delta"] for e in events[3:5])
    assert first_deltas == events[5]["arguments"] == '{"city":"Paris"}'
    assert events[10]["arguments"] == '{"tz":"CET"}'
    assert events[5]["name"] == "get_weather"
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["arguments"], o["status"]) for o in output] == [
        ("call_a", '{"city":"Paris"}', "completed"),
        ("call_b", '{"tz":"CET"}', "completed"),
    ]


async def test_text_then_tool_call_are_two_items() -> None:
    events = await stream_events(
        [
            chunk(ChunkDelta(content="Checking.")),
            chunk(call_delta(0, "call_a", "get_weather", "{}")),
            chunk(ChunkDelta(), "tool_calls"),
        ]
    )
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call"]
    assert "usage" not in events[-1]["response"]  # the backend sent none


async def test_reasoning_stream_becomes_summary_events() -> None:
    events = await stream_events(
        [
            chunk(ChunkDelta(reasoning_content="Let me ")),
            chunk(ChunkDelta(reasoning_content="think.")),
            chunk(ChunkDelta(content="42")),
            chunk(ChunkDelta(), "stop"),
        ]
    )
    assert [e["type"] for e in events[2:9]] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    assert events[6]["text"] == "Let me think."
    reasoning, message = events[-1]["response"]["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert message["content"][0]["text"] == "42"
    assert events[9]["output_index"] == 1


async def test_length_stream_ends_incomplete() -> None:
    events = await stream_events(
        [chunk(ChunkDelta(content="one ")), chunk(ChunkDelta(), "length"), chunk(usage=USAGE)],
        max_output_tokens=1,
    )
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert events[-2]["item"]["status"] == "incomplete"


async def test_empty_stream_still_completes_with_a_message() -> None:
    events = await stream_events([chunk(ChunkDelta(), "stop")])
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""


async def test_interleaved_tool_calls_are_an_upstream_error() -> None:
    stream = ResponseStream(bridge_request(request()).shell)
    stream.start("mock")
    stream.feed(chunk(call_delta(0, "call_a", "f", "{")))
    stream.feed(chunk(call_delta(1, "call_b", "g", "{")))
    with pytest.raises(UpstreamError, match="interleaved"):
        stream.feed(chunk(call_delta(0, args="}")))


async def test_error_event_continues_the_numbering() -> None:
    stream = ResponseStream(bridge_request(request()).shell)
    started = stream.start("mock")
    name, event = stream.error(UpstreamError("backend died"))
    body = as_json(event)
    check_event(body)
    assert name == "error"
    assert body == {
        "type": "error",
        "code": "upstream_error",
        "message": "backend died",
        "param": None,
        "sequence_number": len(started),
    }


async def test_streamed_namespaced_call_is_named_as_the_client_named_it() -> None:
    events = await stream_events(
        [
            chunk(call_delta(0, "call_1", "multi_agent_v1__spawn_agent", '{"task":')),
            chunk(call_delta(0, args='"x"}')),
            chunk(ChunkDelta(), "tool_calls"),
        ],
        tools=CODEX_TOOLS,
    )
    added = next(e for e in events if e["type"] == "response.output_item.added")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    final = events[-1]["response"]["output"][0]
    for item in (added["item"], final):
        assert (item["namespace"], item["name"]) == ("multi_agent_v1", "spawn_agent")
    assert done["name"] == "spawn_agent"
    assert final["arguments"] == '{"task":"x"}'


def test_event_names_are_their_types() -> None:
    stream = ResponseStream(bridge_request(request()).shell)
    for event in stream.start("mock"):
        name, payload = named(event)
        assert name == as_json(payload)["type"]


# ---- the route


def sse_named_events(text: str) -> list[dict[str, Any]]:
    """Parse a named-event SSE body; each event's name must be its `type`, and valid."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: "), block
        assert data_line.startswith("data: "), block
        event = json.loads(data_line[len("data: ") :])
        assert event["type"] == name_line[len("event: ") :]
        check_event(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


TOOL_MODELS: list[dict[str, Any]] = [
    {"id": "mock", "aliases": ["gpt-4o-mini"], "backend": "mock:"},
    {"id": "tools", "backend": "mock:", "options": {"tool_arguments": {"city": "Paris"}}},
    {"id": "broken", "backend": "mock:", "options": {"fail_after_tokens": 2}},
    {"id": "down", "backend": "mock:", "options": {"fail_with": "unavailable"}},
    {
        "id": "agent",
        "backend": "mock:",
        "options": {
            "tool_arguments": {"task": "count files"},
            "tool_name": "multi_agent_v1__spawn_agent",
            "answers_tool_results": True,
        },
    },
]


@pytest.fixture
async def tools_client(make_client: Any) -> AsyncIterator[AppClient]:
    """A gateway with a tool-calling mock and failing mocks."""
    async with make_client(make_config(TOOL_MODELS)) as c:
        yield c


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock", "input": "hello there", **extra}


async def test_route_non_streamed(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(instructions="be nice"), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"].startswith("req_")
    response = r.json()
    validate("Response", response)
    assert response["model"] == "mock"
    assert response["output"][0]["content"][0]["text"] == "You said: hello there"
    assert response["usage"]["output_tokens"] == 4


async def test_route_alias_answers_as_the_model_id(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(model="gpt-4o-mini"), headers=AUTH)
    assert r.json()["model"] == "mock"
    r = await client.post(
        "/v1/responses", json=body(model="gpt-4o-mini", stream=True), headers=AUTH
    )
    events = sse_named_events(r.text)
    assert {e["response"]["model"] for e in events if "response" in e} == {"mock"}


async def test_route_streamed(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(stream=True), headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_named_events(r.text)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "You said: hello there"
    assert events[-1]["response"]["usage"]["output_tokens"] == 4
    assert "[DONE]" not in r.text


async def test_route_max_output_tokens_is_incomplete(client: AppClient) -> None:
    r = await client.post(
        "/v1/responses", json=body(model="fixed", max_output_tokens=2), headers=AUTH
    )
    response = r.json()
    validate("Response", response)
    assert response["status"] == "incomplete"
    assert response["output"][0]["content"][0]["text"] == "one two "


async def test_route_tool_call_and_round_trip(tools_client: AppClient) -> None:
    first = await tools_client.post(
        "/v1/responses",
        json=body(model="tools", input="weather in Paris?", tools=[WEATHER_TOOL]),
        headers=AUTH,
    )
    response = first.json()
    validate("Response", response)
    [call] = response["output"]
    assert (call["type"], call["name"], json.loads(call["arguments"])) == (
        "function_call",
        "get_weather",
        {"city": "Paris"},
    )
    second = await tools_client.post(
        "/v1/responses",
        json=body(
            model="tools",
            input=[
                {"role": "user", "content": "weather in Paris?"},
                call,
                {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"},
            ],
            tools=[WEATHER_TOOL],
            tool_choice="none",
        ),
        headers=AUTH,
    )
    answer = second.json()
    validate("Response", answer)
    assert answer["output"][0]["content"][0]["text"] == "You said: weather in Paris?"
    assert answer["tool_choice"] == "none"


@pytest.mark.parametrize("stream", [False, True])
async def test_route_serves_codex_tools(tools_client: AppClient, stream: bool) -> None:
    """Codex's default tools: the web search is left out (and the answer says so), the
    namespaced function is called under its namespace, and its result is answered."""
    user = {"role": "user", "content": "count the files"}
    first = await tools_client.post(
        "/v1/responses",
        json=body(
            model="agent", input=[user], tools=CODEX_TOOLS, tool_choice="auto", stream=stream
        ),
        headers=AUTH,
    )
    assert first.status_code == 200, first.text
    assert first.headers["x-clawbot-warning"].startswith("tools[2] (web_search) left out")
    response = sse_named_events(first.text)[-1]["response"] if stream else first.json()
    validate("Response", response)
    [call] = response["output"]
    assert (call["type"], call["namespace"], call["name"]) == (
        "function_call",
        "multi_agent_v1",
        "spawn_agent",
    )
    assert json.loads(call["arguments"]) == {"task": "count files"}
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "3 files"}
    second = await tools_client.post(
        "/v1/responses",
        json=body(model="agent", input=[user, call, result], tools=CODEX_TOOLS),
        headers=AUTH,
    )
    answer = second.json()
    validate("Response", answer)
    assert answer["output"][0]["content"][0]["text"] == "You said: 3 files"


async def test_route_without_built_in_tools_has_no_warning(tools_client: AppClient) -> None:
    r = await tools_client.post(
        "/v1/responses", json=body(model="tools", tools=[WEATHER_TOOL]), headers=AUTH
    )
    assert r.status_code == 200
    assert "x-clawbot-warning" not in r.headers


async def test_route_streamed_tool_call(tools_client: AppClient) -> None:
    r = await tools_client.post(
        "/v1/responses",
        json=body(model="tools", tools=[WEATHER_TOOL], stream=True),
        headers=AUTH,
    )
    events = sse_named_events(r.text)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1  # the mock streams the name first, then argument pieces
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert "".join(deltas) == done["arguments"]
    assert json.loads(done["arguments"]) == {"city": "Paris"}
    assert events[-1]["response"]["output"][0]["arguments"] == done["arguments"]


async def test_route_needs_a_key(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body())
    assert r.status_code == 401
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_route_unknown_model_is_404(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(model="nope"), headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "mock"}, "input"),
        (body(input=5), "input"),
        (body(temperature=3), "temperature"),
        (body(max_output_tokens=0), "max_output_tokens"),
        (body(text={"format": {"type": "yaml"}}), "text.format.type"),
        (body(input=[{"role": "user", "content": 5}]), "input[0].content"),
        (body(tools=[{"type": "teleport"}]), "tools[0].type"),
        (body(previous_response_id="resp_1"), "previous_response_id"),
    ],
)
async def test_route_bad_body_is_400_naming_param(
    client: AppClient, payload: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/responses", json=payload, headers=AUTH)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[]"])
async def test_route_malformed_json_is_400(client: AppClient, raw: bytes) -> None:
    r = await client.post(
        "/v1/responses", content=raw, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_route_unknown_fields_are_ignored(client: AppClient) -> None:
    r = await client.post(
        "/v1/responses",
        json=body(
            store=False,
            include=["reasoning.encrypted_content"],
            prompt_cache_key="k",
            service_tier="auto",
            stream_options={"include_obfuscation": False},
            some_vendor_field={"nested": True},
        ),
        headers=AUTH,
    )
    assert r.status_code == 200, r.text


async def test_route_tools_on_a_model_without_them_is_400(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(tools=[WEATHER_TOOL]), headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools"


@pytest.mark.parametrize("stream", [False, True])
async def test_route_failure_before_first_byte_keeps_its_status(
    tools_client: AppClient, stream: bool
) -> None:
    r = await tools_client.post(
        "/v1/responses", json=body(model="down", stream=stream), headers=AUTH
    )
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/json")
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers["retry-after"] == "1"


async def test_route_failure_mid_stream_is_an_error_event(
    tools_client: AppClient,
) -> None:
    r = await tools_client.post(
        "/v1/responses", json=body(model="broken", input="a b c d", stream=True), headers=AUTH
    )
    assert r.status_code == 200
    events = sse_named_events(r.text)
    error = events[-1]
    assert error["type"] == "error"
    assert (error["code"], error["message"]) == (
        "upstream_error",
        "mock backend failed mid-generation",
    )
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "You said: "
    assert not any(e["type"] == "response.completed" for e in events)


async def test_route_non_streamed_failure_is_a_status(client: AppClient) -> None:
    r = await client.post("/v1/responses", json=body(model="broken"), headers=AUTH)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
