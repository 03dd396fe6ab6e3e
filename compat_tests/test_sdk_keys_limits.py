"""API keys from the admin API, short-lived tokens, and rate limits, through the official SDK.

Keys are created with `POST /admin/keys` (master key; plain httpx, the SDK has no admin API) and
then used as the SDK's `api_key`. Each test creates its own keys, so limits never leak between
tests. The parallel-slot tests need a request that stays open for a known time, so they run on
a second small gateway serving a mock model with a per-token delay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from compat_tests.openapi_schema import validate
from compat_tests.support import (
    API_KEY,
    EMBEDDED_ALIAS,
    PASSTHROUGH,
    UPSTREAM,
    Server,
    chat_events,
    chat_text,
    error_body,
    json_body,
)
from tests.serving import ServerDidNotStart, serve

USER = [{"role": "user", "content": "one two three"}]

SLOW = "slow"
"""A mock model that waits `TOKEN_DELAY_S` before each token of `SLOW_REPLY`."""
FAST = "fast"
TOKEN_DELAY_S = 0.1
SLOW_REPLY = " ".join(f"w{i}" for i in range(60))

_GO_DURATION = re.compile(
    r"^(?:(?P<ms>\d+)ms|(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?)$"
)


# --- helpers --------------------------------------------------------------------------------


def create_key(admin: httpx.Client, **fields: Any) -> dict[str, Any]:
    """POST /admin/keys with the master key; the created key, plaintext included."""
    response = admin.post("/admin/keys", json={"name": "compat", **fields})
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    assert key["id"]
    assert key["key"].startswith("sk-")
    for name, value in fields.items():
        if name != "expires_in_s":
            assert key[name] == value, (name, key)
    return key


def revoke_key(admin: httpx.Client, key_id: str) -> None:
    """POST /admin/keys/{id}/revoke."""
    response = admin.post(f"/admin/keys/{key_id}/revoke")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == key_id


def sdk(server: Server, api_key: str, **options: Any) -> OpenAI:
    """An SDK client for this key that never retries unless told to."""
    options = {"max_retries": 0, "timeout": 30, **options}
    return OpenAI(base_url=server.base_url, api_key=api_key, **options)


def seconds(duration: str) -> float:
    """A Go-style duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `6m0s`."""
    match = _GO_DURATION.match(duration)
    assert duration, "empty duration"
    assert match, f"not a duration: {duration!r}"
    if match["ms"] is not None:
        return int(match["ms"]) / 1000
    return int(match["h"] or 0) * 3600 + int(match["m"] or 0) * 60 + float(match["s"] or 0)


def clear_of_minute_boundary(margin_s: float = 5.0) -> None:
    """Wait out the end of the current UTC minute if it is near.

    Request counts live in whole-minute windows, and the previous window's count is weighted
    (rounded down) by how much of it is still in the last 60 s: right after a boundary one
    earlier request weighs 0, so an exact count test must not straddle one.
    """
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.05)


def chat(client: OpenAI, model: str = UPSTREAM, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """A validated non-streamed chat completion: the raw response and its JSON."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=USER, **kwargs)
    body = json_body(raw)
    validate("CreateChatCompletionResponse", body)
    return raw, body


def streamed_text(client: OpenAI, model: str = UPSTREAM) -> tuple[Any, str]:
    """A validated streamed chat completion: the raw response and the text it streamed."""
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=USER, stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return response, chat_text(chat_events(response.iter_lines()))


def request_headers(headers: Any, limit: int, remaining: int) -> None:
    """The `x-ratelimit-*-requests` headers of an admitted request."""
    assert headers["x-ratelimit-limit-requests"] == str(limit), dict(headers)
    assert headers["x-ratelimit-remaining-requests"] == str(remaining), dict(headers)
    assert 0 < seconds(headers["x-ratelimit-reset-requests"]) <= 120, dict(headers)


def issue_token(server: Server, api_key: str) -> dict[str, Any]:
    """POST /v1/auth/token with an API key as the bearer."""
    response = httpx.post(
        f"{server.base_url}/auth/token",
        headers={"authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    token: dict[str, Any] = response.json()
    return token


# --- rate limits ----------------------------------------------------------------------------


def test_requests_per_minute(server: Server, http: httpx.Client) -> None:
    key = create_key(http, requests_per_minute=2)
    clear_of_minute_boundary()
    with sdk(server, key["key"]) as client:
        raw, body = chat(client)
        assert body["choices"][0]["message"]["content"]
        request_headers(raw.headers, limit=2, remaining=1)
        # No token limit is set, so no token headers.
        assert not any(h.startswith("x-ratelimit-") and h.endswith("-tokens") for h in raw.headers)

        response, text = streamed_text(client)
        assert text
        request_headers(response.headers, limit=2, remaining=0)

        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
    error = error_body(caught.value, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    retry_after = caught.value.response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 60


def test_every_route_counts_and_the_master_key_is_unlimited(
    server: Server, http: httpx.Client
) -> None:
    key = create_key(http, requests_per_minute=1)
    clear_of_minute_boundary()
    with sdk(server, key["key"]) as client:
        raw = client.models.with_raw_response.list()
        request_headers(raw.headers, limit=1, remaining=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
        assert error_body(caught.value, 429)["code"] == "rate_limit_exceeded"
    # The master key has no limits.
    with sdk(server, API_KEY) as master:
        raw = master.models.with_raw_response.list()
    assert not any(h.startswith("x-ratelimit-") for h in raw.headers)


def test_tokens_per_minute_headers(server: Server, http: httpx.Client) -> None:
    key = create_key(http, requests_per_minute=10, tokens_per_minute=10_000)
    clear_of_minute_boundary()
    with sdk(server, key["key"]) as client:
        raw, _ = chat(client)
        request_headers(raw.headers, limit=10, remaining=9)
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        first = int(raw.headers["x-ratelimit-remaining-tokens"])
        assert 0 <= first < 10_000
        assert 0 < seconds(raw.headers["x-ratelimit-reset-tokens"]) <= 120

        response, _ = streamed_text(client)
        request_headers(response.headers, limit=10, remaining=8)
        assert response.headers["x-ratelimit-limit-tokens"] == "10000"
        assert 0 <= int(response.headers["x-ratelimit-remaining-tokens"]) < first


# --- parallel limit and the SDK's retries -----------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(workdir: Path) -> Iterator[Server]:
    """A gateway with a slow and a fast mock model, so a request can hold a slot for a while."""
    config = {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60_000},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "models": [
            {
                "id": SLOW,
                "backend": "mock:",
                "options": {"reply": SLOW_REPLY, "token_delay_ms": TOKEN_DELAY_S * 1000},
            },
            {"id": FAST, "backend": "mock:"},
        ],
    }
    try:
        with serve(config, workdir / "slow", timeout_s=60) as running:
            yield Server(
                name="slow", base_url=running.base_url, origin=running.root, log=running.log_path
            )
    except ServerDidNotStart as exc:
        pytest.fail(f"slow server: {exc}")


@pytest.fixture(scope="module")
def slow_admin(slow_server: Server) -> Iterator[httpx.Client]:
    """The slow server's admin API, with the master key."""
    with httpx.Client(
        base_url=slow_server.origin, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as admin:
        yield admin


class Attempts:
    """httpx event hooks that record every attempt the SDK sends and what it got back."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []
        """(monotonic time, x-stainless-retry-count) of each request sent."""
        self.answers: list[tuple[int, str | None]] = []
        """(status, retry-after) of each response."""
        self.before_retry: Any = None
        """Called before a retry is sent (after the SDK's back-off sleep)."""

    def on_request(self, request: httpx.Request) -> None:
        if self.sent and self.before_retry is not None:
            self.before_retry()
        self.sent.append((time.monotonic(), request.headers.get("x-stainless-retry-count", "")))

    def on_response(self, response: httpx.Response) -> None:
        self.answers.append((response.status_code, response.headers.get("retry-after")))

    def client(self) -> httpx.Client:
        hooks = {"request": [self.on_request], "response": [self.on_response]}
        return httpx.Client(event_hooks=hooks, timeout=30)


def hold_slot(client: OpenAI, tokens: int) -> Any:
    """Open a stream on the slow model that lasts about `tokens` * TOKEN_DELAY_S seconds."""
    stream = client.chat.completions.create(
        model=SLOW, messages=USER, max_tokens=tokens, stream=True
    )
    assert stream.response.status_code == 200
    return stream


def test_parallel_limit_refuses_with_retry_after(
    slow_server: Server, slow_admin: httpx.Client
) -> None:
    key = create_key(slow_admin, max_parallel=1)
    with sdk(slow_server, key["key"]) as client:
        held = hold_slot(client, tokens=20)
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model=FAST, messages=USER)
            error = error_body(caught.value, 429)
            assert error["code"] == "rate_limit_exceeded"
            assert error["type"] == "rate_limit_error"
            assert caught.value.response.headers["retry-after"] == "1"
            text = "".join(chunk.choices[0].delta.content or "" for chunk in held if chunk.choices)
        finally:
            held.close()
        assert text.split() == SLOW_REPLY.split()[:20]
        # The stream is over: its slot is free again.
        _, body = chat(client, FAST)
        assert body["choices"][0]["message"]["content"]


def test_sdk_retry_honours_retry_after_and_succeeds(
    slow_server: Server, slow_admin: httpx.Client
) -> None:
    key = create_key(slow_admin, max_parallel=1)
    attempts = Attempts()
    with sdk(slow_server, key["key"]) as holder:
        # ~2 s: still open when the first attempt arrives, drained before the retry is sent.
        held = hold_slot(holder, tokens=20)
        attempts.before_retry = lambda: list(held)
        with (
            attempts.client() as http_client,
            sdk(slow_server, key["key"], max_retries=1, http_client=http_client) as retrying,
        ):
            completion = retrying.chat.completions.create(model=FAST, messages=USER)
    assert completion.choices[0].message.content == "You said: one two three"
    assert attempts.answers == [(429, "1"), (200, None)]
    assert [count for _, count in attempts.sent] == ["0", "1"]
    # The SDK waited the 1 s the server asked for before retrying.
    assert attempts.sent[1][0] - attempts.sent[0][0] >= 0.95


def test_sdk_retries_then_raises_rate_limit_error(
    slow_server: Server, slow_admin: httpx.Client
) -> None:
    key = create_key(slow_admin, max_parallel=1)
    attempts = Attempts()
    with sdk(slow_server, key["key"]) as holder:
        # ~5 s: outlasts the first attempt and both retries (1 s apart).
        held = hold_slot(holder, tokens=50)
        try:
            with (
                attempts.client() as http_client,
                sdk(slow_server, key["key"], max_retries=2, http_client=http_client) as retrying,
                pytest.raises(openai.RateLimitError) as caught,
            ):
                retrying.chat.completions.create(model=FAST, messages=USER)
        finally:
            held.close()
    assert error_body(caught.value, 429)["code"] == "rate_limit_exceeded"
    assert attempts.answers == [(429, "1")] * 3
    assert [count for _, count in attempts.sent] == ["0", "1", "2"]
    gaps = [b[0] - a[0] for a, b in zip(attempts.sent, attempts.sent[1:], strict=False)]
    assert all(gap >= 0.95 for gap in gaps), gaps


# --- authentication and permissions ---------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    ["sk-clawbot-" + "x" * 43, "sk-wrong", "tok-clawbot-e30.bm90LWEtc2lnbmF0dXJl"],
    ids=["unknown-key", "garbage", "forged-token"],
)
def test_wrong_key(server: Server, wrong: str) -> None:
    with sdk(server, wrong) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
        assert error_body(caught.value, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert error_body(caught.value, 401)["code"] == "invalid_api_key"


def test_revoked_key(server: Server, http: httpx.Client) -> None:
    key = create_key(http)
    with sdk(server, key["key"]) as client:
        chat(client)
        revoke_key(http, key["id"])
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
        assert error_body(caught.value, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_expired_key(server: Server, http: httpx.Client) -> None:
    key = create_key(http, expires_in_s=2)
    expires_at = datetime.fromisoformat(key["expires_at"]).timestamp()
    with sdk(server, key["key"]) as client:
        client.models.list()
        time.sleep(max(0.0, expires_at - time.time()) + 0.1)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
        assert error_body(caught.value, 401)["code"] == "invalid_api_key"


def test_key_restricted_to_a_model(server: Server, http: httpx.Client) -> None:
    key = create_key(http, models=[UPSTREAM])
    with sdk(server, key["key"]) as client:
        _, body = chat(client, UPSTREAM)
        assert body["model"] == UPSTREAM
        for other in (PASSTHROUGH, EMBEDDED_ALIAS):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                client.chat.completions.create(model=other, messages=USER)
            error = error_body(caught.value, 403)
            assert error["code"] == "model_not_allowed"
            assert error["type"] == "permission_error"
            assert error["param"] == "model"
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.embeddings.create(model=PASSTHROUGH, input="hi")
        assert error_body(caught.value, 403)["code"] == "model_not_allowed"


# --- short-lived tokens -----------------------------------------------------------------------


def test_token_works_until_its_key_is_revoked(server: Server, http: httpx.Client) -> None:
    key = create_key(http)
    issued = issue_token(server, key["key"])
    assert issued["token_type"] == "bearer"
    assert isinstance(issued["token"], str)
    assert issued["token"] != key["key"]
    assert isinstance(issued["expires_at"], int)
    assert isinstance(issued["expires_in"], int)
    assert 0 < issued["expires_in"] <= 3600
    assert abs(issued["expires_at"] - (time.time() + issued["expires_in"])) <= 5

    with sdk(server, issued["token"]) as client:
        _, body = chat(client)
        assert body["choices"][0]["message"]["content"] == "You said: one two three"
        _, text = streamed_text(client)
        assert text == "You said: one two three"
        raw = client.models.with_raw_response.list()
        validate("ListModelsResponse", json_body(raw))
        assert UPSTREAM in {m.id for m in raw.parse().data}

        revoke_key(http, key["id"])
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=UPSTREAM, messages=USER)
        assert error_body(caught.value, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    # Nor can the revoked key get a new token.
    response = httpx.post(
        f"{server.base_url}/auth/token", headers={"authorization": f"Bearer {key['key']}"}
    )
    assert response.status_code == 401
    validate("ErrorResponse", response.json())
