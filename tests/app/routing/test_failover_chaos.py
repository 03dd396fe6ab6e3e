"""Failover under chaos: a real gateway in front of real fake upstreams that die, hang and fail.

Each test starts `tests/fake_upstream.py` processes and a `clawbot serve` process whose model
`chat` is a pool of them, then kills, hangs or breaks deployments while requests run, and checks
what clients see (status, body, stream framing, `x-clawbot-backend`) and what the gateway says in
`/admin/backends`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_upstream import Upstream
from tests.serving import serve

pytestmark = pytest.mark.slow

MASTER_KEY = "sk-master-test"
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
MODEL = "chat"
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
HEALTH_CHECK_INTERVAL_S = 0.5
MARGIN_S = 1.5
"""Slack on top of a configured timeout before a request counts as slow."""
FAST_S = 0.5
"""A request that skips a deployment out of rotation answers within this."""

Spawn = Callable[..., Upstream]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start fake upstreams (`Upstream`'s arguments); every one is killed at the end."""
    started: list[Upstream] = []

    def start(name: str, **options: Any) -> Upstream:
        upstream = Upstream(name, log_dir=tmp_path, **options)
        started.append(upstream)
        return upstream.start()

    try:
        yield start
    finally:
        for upstream in started:
            upstream.kill()


def deployment(upstream: Upstream, priority: int, **timeouts: float) -> dict[str, Any]:
    """A pool entry for `upstream`, named after it."""
    entry: dict[str, Any] = {
        "name": upstream.name,
        "backend": upstream.url,
        "priority": priority,
        "upstream_model": "fake",
    }
    if timeouts:
        entry["timeouts"] = timeouts
    return entry


def gateway_config(deployments: list[dict[str, Any]], **routing: Any) -> dict[str, Any]:
    """A gateway serving `chat` from `deployments`, priority failover unless `routing` says."""
    settings = {
        "strategy": "priority",
        "retries": 2,
        "failures_to_trip": 3,
        "failure_window_s": 60,
        "cooldown_s": 30,
        "health_check_interval_s": HEALTH_CHECK_INTERVAL_S,
        "health_check_timeout_s": 0.5,
        **routing,
    }
    return {
        "model_server": {"host": "127.0.0.1", "timeout": 30_000},
        "auth": {"api_key": MASTER_KEY},
        "audit": {"enabled": False},
        "logging": {"level": "WARNING"},
        "models": [{"id": MODEL, "routing": settings, "deployments": deployments}],
    }


@asynccontextmanager
async def running(config: dict[str, Any], workdir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway as a process on `config`, and a client to it."""
    with serve(config, workdir) as server:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=server.root, headers=AUTH, timeout=30, limits=limits
        ) as client:
            yield client


Gateway = Callable[[dict[str, Any]], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """`async with gateway(config) as client`: the gateway on `config`, and a client to it."""
    return lambda config: running(config, tmp_path / "gateway")


def served_by(response: httpx.Response) -> str | None:
    """The deployment named by `x-clawbot-backend` (`chat/NAME` gives `NAME`)."""
    header = response.headers.get("x-clawbot-backend")
    if header is None:
        return None
    model, _, name = header.partition("/")
    assert model == MODEL, header
    return name


def check_error_body(body: Any) -> dict[str, Any]:
    """An OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["type"], str), error
    return error


async def backends(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """`GET /admin/backends` for `chat`: its deployments by name."""
    response = await client.get("/admin/backends")
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["object"] == "list", listing
    [pool] = [p for p in listing["data"] if p["model"] == MODEL]
    assert pool["strategy"] == "priority", pool
    return {d["name"]: d for d in pool["deployments"]}


async def poll(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Whether `condition` held within `timeout_s` (checked every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@dataclass
class Outcome:
    """What a client saw of one chat completion."""

    stream: bool
    started: float
    ended: float = 0.0
    status: int | None = None
    backend: str | None = None
    result: str = ""
    """`ok`; `cut` (an error event, then [DONE]); `status N: ...`; or what went wrong."""
    text: str = ""
    body: Any = None
    """The JSON of a non-200 answer."""
    headers: httpx.Headers | None = None

    @property
    def elapsed(self) -> float:
        """Seconds from sending to the end of the answer."""
        return self.ended - self.started


def stream_result(lines: list[str]) -> tuple[str, str]:
    """`ok`, `cut` or a complaint, and the streamed text, of an SSE body's lines."""
    payloads = [line[5:].strip() for line in lines if line.startswith("data:")]
    if not payloads or payloads[-1] != "[DONE]" or payloads.count("[DONE]") != 1:
        return f"no single final [DONE]: {payloads[-3:]}", ""
    events = [json.loads(p) for p in payloads[:-1]]
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events
        if "error" not in event
        for choice in event["choices"]
    )
    errors = [i for i, event in enumerate(events) if "error" in event]
    if errors:
        if errors != [len(events) - 1]:
            return f"error event not last: {events[-3:]}", text
        check_error_body(events[-1])
        return "cut", text
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    if finishes != ["stop"]:
        return f"finish reasons {finishes}", text
    return "ok", text


async def chat(client: httpx.AsyncClient, *, stream: bool) -> Outcome:
    """Send one chat completion and classify what came back; never raises."""
    outcome = Outcome(stream=stream, started=time.monotonic())
    try:
        if stream:
            body = {**BODY, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                outcome.status, outcome.backend = response.status_code, served_by(response)
                outcome.headers = response.headers
                lines = [line async for line in response.aiter_lines()]
            if response.status_code == 200:
                outcome.result, outcome.text = stream_result(lines)
            else:
                outcome.body = json.loads("\n".join(lines))
        else:
            response = await client.post("/v1/chat/completions", json=BODY)
            outcome.status, outcome.backend = response.status_code, served_by(response)
            outcome.headers = response.headers
            if response.status_code == 200:
                outcome.text = response.json()["choices"][0]["message"]["content"]
                outcome.result = "ok"
            else:
                outcome.body = response.json()
        if outcome.status != 200:
            outcome.result = f"status {outcome.status}: {json.dumps(outcome.body)[:300]}"
    except (httpx.HTTPError, ValueError, KeyError, AssertionError) as exc:
        outcome.result = f"broken: {exc!r}"
    outcome.ended = time.monotonic()
    return outcome


def check_text(outcome: Outcome, chunks: dict[str, int]) -> None:
    """The text matches the deployment named in the header (see tests/fake_upstream.py)."""
    name = outcome.backend
    assert name is not None, outcome
    if not outcome.stream:
        assert outcome.text == f"hello from {name}", outcome
    elif outcome.result == "ok":
        assert outcome.text == f"{name} " * chunks[name], outcome
    else:  # a cut stream sent only some of its chunks
        assert f"{name} " * (outcome.text.count(" ")) == outcome.text, outcome


def served(outcome: Outcome, backend: str) -> None:
    """The request succeeded from `backend`."""
    assert (outcome.result, outcome.backend) == ("ok", backend), outcome


async def test_kill_primary_mid_load(spawn: Spawn, gateway: Gateway) -> None:
    chunks = {"primary": 10, "backup": 3, "spare": 3}
    primary = spawn("primary", chunk_delay_s=0.05, chunks=chunks["primary"])  # 0.5 s streams
    backup = spawn("backup", chunk_delay_s=0.01, chunks=chunks["backup"])
    spare = spawn("spare", chunks=chunks["spare"])
    config = gateway_config(
        [
            deployment(primary, 0, connect_s=1, first_token_s=2, total_s=10),
            deployment(backup, 1),
            deployment(spare, 2),
        ]
    )
    async with gateway(config) as client:
        served(await chat(client, stream=False), "primary")
        outcomes: list[Outcome] = []
        stop_at = time.monotonic() + 3.0

        async def worker(stream: bool) -> None:
            while time.monotonic() < stop_at:
                outcomes.append(await chat(client, stream=stream))

        workers = [asyncio.create_task(worker(stream=i >= 20)) for i in range(26)]
        await asyncio.sleep(1.0)
        killing_at = time.monotonic()
        await asyncio.to_thread(primary.kill)
        killed_at = time.monotonic()  # reaped: nothing that starts after this reaches it
        await asyncio.gather(*workers)

        plain = [o for o in outcomes if not o.stream]
        streams = [o for o in outcomes if o.stream]
        assert len(plain) > 20
        assert len(streams) > 6
        assert [o for o in plain if o.result != "ok"] == []
        assert [o for o in streams if o.result not in ("ok", "cut")] == []
        for o in outcomes:
            check_text(o, chunks)
        before = {o.backend for o in outcomes if o.ended < killing_at}
        assert before == {"primary"}, "under priority failover the primary serves everything"
        after = {o.backend for o in outcomes if o.started > killed_at}
        assert after == {"backup"}, after
        # A primary stream takes half a second: one that started on it less than 0.4 s before
        # the kill cannot have completed, so it must have been cut (error event, [DONE]).
        doomed = [
            o
            for o in streams
            if o.backend == "primary" and killing_at - 0.4 < o.started < killing_at
        ]
        assert [o for o in doomed if o.result != "cut"] == []
        cut = [o for o in streams if o.result == "cut"]
        assert {o.backend for o in cut} <= {"primary"}
        assert [o for o in cut if o.ended > killed_at + MARGIN_S] == [], "cut late"
        assert backup.requests() > 0
        assert spare.requests() == 0

        await asyncio.to_thread(primary.restart)
        restarted_at = time.monotonic()
        back = [await chat(client, stream=False)]
        while back[-1].backend != "primary" and time.monotonic() < restarted_at + 3.0:
            await asyncio.sleep(0.1)
            back.append(await chat(client, stream=False))
        assert [o for o in back if o.result != "ok"] == []
        assert back[-1].backend == "primary", [o.backend for o in back]
        served(await chat(client, stream=True), "primary")


async def test_hanging_primary_trips_its_breaker(spawn: Spawn, gateway: Gateway) -> None:
    primary = spawn("primary", mode="hang")
    backup = spawn("backup")
    timeout_s = 1.0
    config = gateway_config(
        [
            deployment(primary, 0, connect_s=1, first_token_s=timeout_s, total_s=timeout_s),
            deployment(backup, 1),
        ],
        health_check_interval_s=0,  # the breaker alone takes it out (see the next test)
    )
    async with gateway(config) as client:
        for stream in (False, True, False):  # failures_to_trip
            outcome = await chat(client, stream=stream)
            served(outcome, "backup")
            assert timeout_s < outcome.elapsed < timeout_s + MARGIN_S, outcome

        state = await backends(client)
        assert state["primary"]["state"] == "open", state
        assert state["primary"]["cooldown_remaining_s"] > 0, state
        assert state["primary"]["total_failures"] == 3, state
        assert state["primary"]["total_successes"] == 0, state
        assert state["backup"]["total_successes"] == 3, state
        assert state["backup"]["state"] == "closed", state

        for stream in (False, True, False, True):
            outcome = await chat(client, stream=stream)
            served(outcome, "backup")
            assert outcome.elapsed < FAST_S, outcome
        assert primary.requests() == 3


@pytest.mark.parametrize("mode", ["hang", "down-health"])
async def test_failed_health_check_takes_the_primary_out(
    spawn: Spawn, gateway: Gateway, mode: str
) -> None:
    # down-health: /v1/models answers 503 while completions would still succeed
    primary = spawn("primary", mode=mode)
    backup = spawn("backup")
    config = gateway_config(
        [deployment(primary, 0, first_token_s=5, total_s=5), deployment(backup, 1)]
    )
    async with gateway(config) as client:

        async def primary_unhealthy() -> bool:
            return (await backends(client))["primary"]["healthy"] is False

        assert await poll(primary_unhealthy, HEALTH_CHECK_INTERVAL_S + 0.5 + MARGIN_S)
        for stream in (False, True):
            outcome = await chat(client, stream=stream)
            served(outcome, "backup")
            assert outcome.elapsed < FAST_S, outcome
        assert primary.requests() == 0


@pytest.mark.parametrize("mode", ["500", "429"])
async def test_failing_primary_fails_over_and_counts(
    spawn: Spawn, gateway: Gateway, mode: str
) -> None:
    primary = spawn("primary", mode=mode)
    backup = spawn("backup")
    config = gateway_config([deployment(primary, 0), deployment(backup, 1)])
    async with gateway(config) as client:
        for stream in (False, True, False, True, False):
            served(await chat(client, stream=stream), "backup")
        state = await backends(client)
        tried = primary.requests()
        assert 1 <= tried <= 3, "the primary is out of rotation after failures_to_trip"
        assert state["primary"]["total_failures"] == tried, state
        assert state["primary"]["total_successes"] == 0, state
        assert state["primary"]["state"] == "open", state
        assert state["primary"]["healthy"] is True, "its /v1/models still answers"
        assert state["backup"]["total_successes"] == 5, state
        assert backup.requests() == 5


async def test_all_deployments_down(spawn: Spawn, gateway: Gateway) -> None:
    primary = spawn("primary")
    backup = spawn("backup")
    config = gateway_config([deployment(primary, 0), deployment(backup, 1)])
    async with gateway(config) as client:
        served(await chat(client, stream=False), "primary")
        primary.kill()
        backup.kill()

        def check_503(outcome: Outcome) -> dict[str, Any]:
            assert outcome.status == 503, outcome
            assert outcome.headers is not None
            assert float(outcome.headers["retry-after"]) > 0, outcome.headers
            assert outcome.headers["content-type"].startswith("application/json")
            return check_error_body(outcome.body)

        for stream in (False, True):  # before the health checks notice: refused connections
            check_503(await chat(client, stream=stream))

        async def both_out() -> bool:
            state = await backends(client)
            return not any(d["healthy"] and d["state"] == "closed" for d in state.values())

        assert await poll(both_out, HEALTH_CHECK_INTERVAL_S + 0.5 + MARGIN_S)
        for stream in (False, True, False):
            outcome = await chat(client, stream=stream)
            error = check_503(outcome)
            assert error["code"] == "no_healthy_backend", error
            assert outcome.elapsed < 1.0, outcome


@pytest.mark.parametrize("stream", [True, False], ids=["slow-stream", "hang"])
async def test_timed_out_upstream_is_cancelled(
    spawn: Spawn, gateway: Gateway, stream: bool
) -> None:
    if stream:  # the first chunk comes at once, the next after 3 s: the stream times out
        primary = spawn("primary", chunk_delay_s=3.0, chunks=5)
    else:
        primary = spawn("primary", mode="hang")
    backup = spawn("backup")
    total_s = 1.0
    config = gateway_config(
        [deployment(primary, 0, total_s=total_s), deployment(backup, 1)],
        health_check_interval_s=0,
    )
    async with gateway(config) as client:
        outcome = await chat(client, stream=stream)
        if stream:
            assert (outcome.status, outcome.result, outcome.backend) == (200, "cut", "primary")
            assert outcome.text == "", outcome
        else:
            served(outcome, "backup")
        assert outcome.elapsed < total_s + MARGIN_S, outcome

        async def let_go() -> bool:
            stats = await asyncio.to_thread(primary.stats)
            return stats["disconnects"] == 1 and stats["active"] == 0

        assert await poll(let_go, 2.0), primary.stats()
        assert primary.requests() == 1
