"""POST /v1/chat/completions on the mock backend."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import AUTH, AppClient, make_config


def chat(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "mock",
        "messages": [{"role": "user", "content": "hello there"}],
    }
    body.update(extra)
    return body


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into JSON objects, with the literal "[DONE]" kept as a string."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_non_streamed_reply(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "mock"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "You said: hello there",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert r.headers["x-request-id"].startswith("req_")


async def test_alias_resolves_to_public_id(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=AUTH)
    assert r.status_code == 200
    assert r.json()["model"] == "mock"


async def test_stream_is_sse_with_done(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "You said: hello there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_include_usage_adds_final_usage_chunk(client: AppClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers=AUTH,
    )
    chunks = sse_events(r.text)[:-1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_stream_options_accepted_without_stream(client: AppClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(stream_options={"include_usage": True}), headers=AUTH
    )
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_length_limit(client: AppClient, field: str) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(model="fixed", **{field: 2}), headers=AUTH
    )
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "one two "
    assert choice["finish_reason"] == "length"


async def test_stop_sequence(client: AppClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(model="fixed", stop=["three"]), headers=AUTH
    )
    assert r.json()["choices"][0]["message"]["content"] == "one two "


async def test_model_default_params_apply(make_client: Any) -> None:
    config = make_config(
        [
            {
                "id": "m",
                "backend": "mock:",
                "options": {"reply": "a b c d"},
                "params": {"max_tokens": 1},
            }
        ]
    )
    async with make_client(config) as c:
        r = await c.post("/v1/chat/completions", json=chat(model="m"), headers=AUTH)
        assert r.json()["choices"][0]["message"]["content"] == "a "
        r = await c.post("/v1/chat/completions", json=chat(model="m", max_tokens=3), headers=AUTH)
        assert r.json()["choices"][0]["message"]["content"] == "a b c "


async def test_logprobs(client: AppClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=1), headers=AUTH
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["You ", "said: ", "hello ", "there"]
    assert all(len(c["top_logprobs"]) == 1 for c in content)


async def test_top_logprobs_needs_logprobs(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(top_logprobs=2), headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "top_logprobs"


async def test_common_extras_are_accepted(client: AppClient) -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "parts"}],
            },
        ],
        parallel_tool_calls=True,
        user="u1",
        metadata={"k": "v"},
        store=False,
        reasoning_effort="low",
        seed=7,
        temperature=0.2,
        top_p=0.9,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        some_vendor_field={"nested": True},
    )
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "You said: hello parts"


async def test_n_above_one_is_a_clear_400(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(n=2), headers=AUTH)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n"
    assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "mock", "messages": []}, "messages"),
        ({"model": "mock", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "mock", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "mock", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "mock", "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"model": "mock", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            {"model": "mock", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        (
            {"model": "mock", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            "max_tokens",
        ),
        (
            {"model": "mock", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        (
            {"model": "mock", "messages": [{"role": "user", "content": [{"type": "audio_blob"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
async def test_bad_input_is_400_naming_param(
    client: AppClient, body: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert "x-request-id" in r.headers


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
async def test_malformed_bodies_are_400(client: AppClient, raw: bytes) -> None:
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_unknown_model_is_404(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(model="nope"), headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


async def test_tools_unsupported_by_backend_is_400(client: AppClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = await client.post("/v1/chat/completions", json=chat(tools=tools), headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools"


def tool(name: str = "f", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [tool(), tool()]}, "tools[1].function.name"),
        ({"tools": [tool(parameters={"type": "string"})]}, "tools[0].function.parameters"),
        ({"tools": [tool("bad name!")]}, "tools[0].function.name"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [tool()], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice.function.name",
        ),
    ],
)
async def test_malformed_tools_are_400(make_client: Any, extra: dict[str, Any], param: str) -> None:
    config = make_config([{"id": "t", "backend": "mock:", "options": {"tool_arguments": {}}}])
    async with make_client(config) as client:
        r = await client.post("/v1/chat/completions", json=chat(model="t", **extra), headers=AUTH)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].startswith(param), error
        assert error["type"] == "invalid_request_error"


WEB_SEARCH = {"type": "web_search", "external_web_access": False}


@pytest.mark.parametrize("stream", [False, True])
async def test_built_in_tools_are_left_out_with_a_warning(make_client: Any, stream: bool) -> None:
    config = make_config([{"id": "t", "backend": "mock:", "options": {"tool_arguments": {}}}])
    async with make_client(config) as client:
        offered = [WEB_SEARCH, tool("g"), {"type": "file_search"}]
        r = await client.post(
            "/v1/chat/completions",
            json=chat(model="t", tools=offered, stream=stream),
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        warning = r.headers["x-clawbot-warning"]
        assert warning.startswith("tools[0] (web_search), tools[2] (file_search) left out")
        calls = (
            [e["choices"][0]["delta"] for e in sse_events(r.text)[:-1] if e["choices"]]
            if stream
            else [r.json()["choices"][0]["message"]]
        )
        names = [
            c["function"]["name"]
            for d in calls
            for c in d.get("tool_calls") or []
            if "function" in c and c["function"].get("name")
        ]
        assert names == ["g"]
        # Only built-in tools: answered as a plain chat, or refused when a call is required.
        r = await client.post(
            "/v1/chat/completions", json=chat(model="t", tools=[WEB_SEARCH]), headers=AUTH
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"]
        r = await client.post(
            "/v1/chat/completions",
            json=chat(model="t", tools=[WEB_SEARCH], tool_choice="required"),
            headers=AUTH,
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tool_choice"
        # A bad function tool beside a built-in one is still named by its own place.
        r = await client.post(
            "/v1/chat/completions",
            json=chat(model="t", tools=[WEB_SEARCH, tool("bad name!")]),
            headers=AUTH,
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tools[1].function.name"


async def test_images_unsupported_by_backend_is_400(client: AppClient) -> None:
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    r = await client.post(
        "/v1/chat/completions",
        json=chat(messages=[{"role": "user", "content": content}]),
        headers=AUTH,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].content"


async def test_failure_after_first_byte_is_error_event_then_done(
    client: AppClient,
) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat(model="broken", stream=True), headers=AUTH
    )
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "api_error"
    assert error["code"] == "upstream_error"
    assert "delta" in events[-3]["choices"][0]


async def test_failure_before_first_byte_is_a_status(client: AppClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(model="broken"), headers=AUTH)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"


async def test_body_over_limit_is_413(make_client: Any) -> None:
    async with make_client(make_config(max_body_bytes=1024)) as c:
        r = await c.post(
            "/v1/chat/completions",
            json=chat(messages=[{"role": "user", "content": "x" * 4000}]),
            headers=AUTH,
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
