"""The router's pools: try order per strategy, failover, retries, deadline, breakers, streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from app.config import ModelConfig
from app.errors import (
    InvalidRequest,
    ServiceUnavailable,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.protocol import ChatCompletionRequest, ChatMessage
from app.routing.pool import (
    Breaker,
    Deployment,
    LeastBusy,
    Pool,
    PriorityFailover,
    Strategy,
    WeightedRoundRobin,
)
from backends.base import Backend, BackendSpec, Capabilities
from backends.mock import MockBackend

HANG = "hang"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fake:
    """A backend whose calls follow a script: None answers, an exception raises, HANG hangs."""

    capabilities = Capabilities()

    def __init__(
        self,
        name: str,
        script: Iterable[BaseException | str | None] = (),
        *,
        gate: asyncio.Event | None = None,
        items: Iterable[str] = ("x", "y", "z"),
        fail_at: int | None = None,
        item_delay: float = 0.0,
        hang_at: int | None = None,
    ) -> None:
        self.name = name
        self.item_delay = item_delay
        self.hang_at = hang_at
        self.script = list(script)
        self.gate = gate
        self.items = list(items)
        self.fail_at = fail_at
        self.calls = 0
        self.stream_closed = False

    async def _outcome(self) -> None:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else None
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == HANG:
            await asyncio.sleep(3600)

    async def chat(self, req: Any) -> str:
        await self._outcome()
        return self.name

    async def stream_chat(self, req: Any) -> AsyncIterator[str]:
        try:
            await self._outcome()
            for index, item in enumerate(self.items):
                if index == self.fail_at:
                    raise UpstreamError(f"{self.name} broke mid-stream")
                if index == self.hang_at:
                    await asyncio.sleep(3600)
                if index:
                    await asyncio.sleep(self.item_delay)
                yield f"{self.name}:{item}"
        finally:
            self.stream_closed = True


def deployment(backend: Any, **kw: Any) -> Deployment:
    return Deployment(backend.name, backend, **kw)


def make_pool(
    *backends: Any,
    strategy: Strategy | None = None,
    clock: Clock | None = None,
    **kw: Any,
) -> Pool:
    deployments = [deployment(b, priority=i) for i, b in enumerate(backends)]
    return Pool("m", deployments, strategy or PriorityFailover(), clock=clock or Clock(), **kw)


def with_down_spare(backend: Any, **kw: Any) -> Pool:
    """A pool whose only live deployment is `backend` (a pool of one never cools down)."""
    pool = make_pool(backend, Fake("spare"), **kw)
    pool.mark_unhealthy("spare")
    return pool


async def chat(pool: Pool) -> Any:
    return await pool.call(lambda d: d.backend.chat(REQ))


async def collect(pool: Pool) -> list[Any]:
    return [item async for item in pool.stream(lambda d: d.backend.stream_chat(REQ))]


async def drain(stream: AsyncIterator[Any], into: list[Any]) -> None:
    async for item in stream:
        into.append(item)


async def until(predicate: Any) -> None:
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


REQ = ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content="hi")])


def names(deployments: list[Deployment]) -> list[str]:
    return [d.name for d in deployments]


# strategies


def test_priority_failover_orders_by_priority_then_config_order() -> None:
    ds = [
        deployment(Fake("c"), priority=2),
        deployment(Fake("b"), priority=1),
        deployment(Fake("z"), priority=0),
        deployment(Fake("a"), priority=1),
    ]
    assert names(PriorityFailover().order(ds, 0.0)) == ["z", "b", "a", "c"]


def test_weighted_round_robin_is_smooth_and_deterministic() -> None:
    ds = [
        deployment(Fake("a"), weight=3),
        deployment(Fake("b"), weight=2),
        deployment(Fake("c"), weight=1),
    ]
    wrr = WeightedRoundRobin()
    picks = [wrr.order(ds, 0.0)[0].name for _ in range(6)]
    assert picks == ["a", "b", "a", "c", "b", "a"]
    assert sorted(names(wrr.order(ds, 0.0))) == ["a", "b", "c"]


async def test_weighted_round_robin_distribution_is_proportional() -> None:
    backends = [Fake("a"), Fake("b"), Fake("c")]
    ds = [deployment(b, weight=w) for b, w in zip(backends, (5, 3, 2), strict=True)]
    pool = Pool("m", ds, WeightedRoundRobin(), clock=Clock())
    answers = [await chat(pool) for _ in range(100)]
    assert [answers.count(n) for n in "abc"] == [50, 30, 20]
    assert [b.calls for b in backends] == [50, 30, 20]


def test_least_busy_orders_by_in_flight_then_priority_then_name() -> None:
    ds = [
        deployment(Fake("c"), priority=0),
        deployment(Fake("b"), priority=1),
        deployment(Fake("a"), priority=1),
        deployment(Fake("d"), priority=0),
    ]
    ds[0].in_flight = 2
    ds[3].in_flight = 1
    assert names(LeastBusy().order(ds, 0.0)) == ["a", "b", "d", "c"]


async def test_least_busy_sends_concurrent_calls_to_the_idle_deployment() -> None:
    gate = asyncio.Event()
    a, b = Fake("a", gate=gate), Fake("b")
    pool = make_pool(a, b, strategy=LeastBusy())
    first = asyncio.create_task(chat(pool))
    await until(lambda: pool.deployment("a").in_flight == 1)
    assert await chat(pool) == "b"
    gate.set()
    assert await first == "a"
    assert [d.in_flight for d in pool.deployments] == [0, 0]


# failover and retries


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("connect refused"),
        UpstreamTimeout("slow"),
        UpstreamError("bad gateway"),
        UpstreamStatusError("overloaded", upstream_status=429),
        UpstreamStatusError("boom", upstream_status=500),
        UpstreamStatusError("down", upstream_status=503),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'upstream_status', '')}",
)
async def test_upstream_failure_fails_over_to_the_next_deployment(error: Exception) -> None:
    a, b = Fake("a", [error]), Fake("b")
    pool = make_pool(a, b)
    assert await chat(pool) == "b"
    assert (a.calls, b.calls) == (1, 1)
    assert pool.deployment("a").total_failures == 1
    assert pool.deployment("b").total_successes == 1
    assert [d.in_flight for d in pool.deployments] == [0, 0]


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad"),
        UpstreamStatusError("bad request", upstream_status=400),
        UpstreamStatusError("no such model", upstream_status=404),
        ValueError("a bug"),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'upstream_status', '')}",
)
async def test_client_errors_propagate_without_failover_or_blame(error: Exception) -> None:
    a, b = Fake("a", [error]), Fake("b")
    pool = make_pool(a, b)
    with pytest.raises(type(error)) as caught:
        await chat(pool)
    assert caught.value is error
    assert b.calls == 0
    assert pool.deployment("a").total_failures == 0
    assert pool.deployment("a").in_flight == 0


async def test_retries_limit_the_attempts_and_the_last_error_propagates() -> None:
    errors = [UpstreamUnavailable(f"down {i}") for i in range(4)]
    backends = [Fake(n, [e]) for n, e in zip("abcd", errors, strict=True)]
    pool = make_pool(*backends, retries=2)
    with pytest.raises(UpstreamUnavailable) as caught:
        await chat(pool)
    assert caught.value is errors[2]
    assert [b.calls for b in backends] == [1, 1, 1, 0]


async def test_zero_retries_tries_only_the_pick() -> None:
    a, b = Fake("a", [UpstreamStatusError("boom", upstream_status=502)]), Fake("b")
    pool = make_pool(a, b, retries=0)
    with pytest.raises(UpstreamStatusError):
        await chat(pool)
    assert b.calls == 0


async def test_each_deployment_is_tried_at_most_once_per_request() -> None:
    a, b = Fake("a", [UpstreamError("x")]), Fake("b", [UpstreamError("y")])
    pool = make_pool(a, b, retries=5)
    with pytest.raises(UpstreamError, match="y"):
        await chat(pool)
    assert (a.calls, b.calls) == (1, 1)


async def test_total_deadline_ends_the_failover_with_a_timeout() -> None:
    a, b = Fake("a", [UpstreamError("x")]), Fake("b", [HANG])
    pool = make_pool(a, b, deadline_s=0.05)
    with pytest.raises(UpstreamTimeout, match=r"within 0\.05s"):
        await chat(pool)
    assert b.calls == 1
    assert [d.in_flight for d in pool.deployments] == [0, 0]
    assert pool.deployment("b").total_failures == 0


async def test_deployment_timeout_counts_as_failure_and_fails_over() -> None:
    a, b = Fake("a", [HANG]), Fake("b")
    ds = [deployment(a, total_s=0.02), deployment(b, priority=1)]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    assert await chat(pool) == "b"
    assert pool.deployment("a").total_failures == 1
    assert pool.deployment("a").in_flight == 0


async def test_cancelled_caller_releases_in_flight() -> None:
    a = Fake("a", [HANG])
    pool = make_pool(a)
    task = asyncio.create_task(chat(pool))
    await until(lambda: a.calls == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.deployment("a").in_flight == 0
    assert pool.deployment("a").total_failures == 0


# max_parallel


async def test_a_full_deployment_is_skipped() -> None:
    gate = asyncio.Event()
    a, b = Fake("a", gate=gate), Fake("b")
    ds = [deployment(a, max_parallel=1), deployment(b, priority=1)]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    first = asyncio.create_task(chat(pool))
    await until(lambda: pool.deployment("a").in_flight == 1)
    assert not pool.deployment("a").eligible(0.0)
    assert await chat(pool) == "b"
    gate.set()
    assert await first == "a"
    assert await chat(pool) == "a"


async def test_all_full_answers_no_healthy_backend() -> None:
    gate = asyncio.Event()
    a = Fake("a", gate=gate)
    pool = Pool("m", [deployment(a, max_parallel=1)], PriorityFailover(), clock=Clock())
    first = asyncio.create_task(chat(pool))
    await until(lambda: a.calls == 1)
    with pytest.raises(ServiceUnavailable) as caught:
        await chat(pool)
    assert caught.value.code == "no_healthy_backend"
    assert caught.value.retry_after == 1.0
    gate.set()
    await first


# breaker


async def test_breaker_trips_after_n_failures_in_the_window() -> None:
    clock = Clock()
    a, b = Fake("a", [UpstreamError("x")] * 3), Fake("b")
    pool = make_pool(a, b, clock=clock, breaker=Breaker(failures_to_trip=3, window_s=60))
    for _ in range(3):
        assert await chat(pool) == "b"
        clock.advance(10)
    assert pool.deployment("a").state(clock()) == "open"
    assert await chat(pool) == "b"
    assert a.calls == 3


async def test_failures_outside_the_window_do_not_trip() -> None:
    clock = Clock()
    a, b = Fake("a", [UpstreamError("x")] * 3), Fake("b")
    pool = make_pool(a, b, clock=clock, breaker=Breaker(failures_to_trip=3, window_s=60))
    for _ in range(3):
        assert await chat(pool) == "b"
        clock.advance(31)
    assert pool.deployment("a").state(clock()) == "closed"
    assert await chat(pool) == "a"
    assert pool.snapshot()[0]["recent_failures"] == 1


async def trip(pool: Pool, clock: Clock) -> None:
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await chat(pool)
    assert pool.deployment("a").state(clock()) == "open"


async def test_nothing_eligible_answers_immediately_with_retry_after() -> None:
    clock = Clock()
    a = Fake("a", [UpstreamError("x")] * 3)
    pool = with_down_spare(a, clock=clock, retries=0, breaker=Breaker(cooldown_s=30))
    await trip(pool, clock)
    for elapsed, expected in ((0.0, 30.0), (10.0, 20.0), (0.5, 20.0), (19.2, 1.0)):
        clock.advance(elapsed)
        with pytest.raises(ServiceUnavailable) as caught:
            await chat(pool)
        assert caught.value.code == "no_healthy_backend"
        assert caught.value.status_code == 503
        assert caught.value.retry_after == expected
    assert a.calls == 3


async def test_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    clock = Clock()
    gate = asyncio.Event()
    a = Fake("a", [UpstreamError("x")] * 3)
    pool = with_down_spare(a, clock=clock, retries=0, breaker=Breaker(cooldown_s=30))
    await trip(pool, clock)
    clock.advance(30)
    assert pool.deployment("a").state(clock()) == "half_open"
    a.gate = gate
    trial = asyncio.create_task(chat(pool))
    await until(lambda: a.calls == 4)
    with pytest.raises(ServiceUnavailable, match="no healthy backend"):
        await chat(pool)
    assert a.calls == 4
    gate.set()
    assert await trial == "a"
    assert pool.deployment("a").state(clock()) == "closed"
    assert [await chat(pool) for _ in range(2)] == ["a", "a"]


async def test_failed_trial_reopens_the_breaker() -> None:
    clock = Clock()
    a = Fake("a", [UpstreamError("x")] * 4)
    pool = with_down_spare(a, clock=clock, retries=0, breaker=Breaker(cooldown_s=30))
    await trip(pool, clock)
    clock.advance(31)
    with pytest.raises(UpstreamError):
        await chat(pool)
    assert pool.deployment("a").state(clock()) == "open"
    assert pool.deployment("a").cooldown_remaining(clock()) == 30
    clock.advance(30)
    assert await chat(pool) == "a"
    assert pool.deployment("a").state(clock()) == "closed"


async def test_trial_ending_in_a_client_error_frees_the_trial_slot() -> None:
    clock = Clock()
    a = Fake("a", [*[UpstreamError("x")] * 3, InvalidRequest("bad")])
    pool = with_down_spare(a, clock=clock, retries=0)
    await trip(pool, clock)
    clock.advance(30)
    with pytest.raises(InvalidRequest):
        await chat(pool)
    assert pool.deployment("a").state(clock()) == "half_open"
    assert pool.deployment("a").eligible(clock())
    assert await chat(pool) == "a"
    assert pool.deployment("a").state(clock()) == "closed"


async def test_tripped_primary_sends_traffic_to_backup_until_it_recovers() -> None:
    clock = Clock()
    a, b = Fake("a", [UpstreamUnavailable("x")] * 3), Fake("b")
    pool = make_pool(a, b, clock=clock, breaker=Breaker(cooldown_s=30))
    assert [await chat(pool) for _ in range(5)] == ["b"] * 5
    assert a.calls == 3
    clock.advance(30)
    assert await chat(pool) == "a"
    assert await chat(pool) == "a"


async def test_health_hooks() -> None:
    clock = Clock()
    a, b = Fake("a", [UpstreamError("x")] * 3), Fake("b")
    pool = make_pool(a, b, clock=clock, retries=0)
    pool.mark_unhealthy("b")
    await trip(pool, clock)
    with pytest.raises(ServiceUnavailable) as caught:
        await chat(pool)
    assert caught.value.retry_after == 30
    pool.mark_healthy("a")
    assert pool.deployment("a").state(clock()) == "open", "a check that passes keeps the breaker"
    pool.mark_unhealthy("a")
    pool.mark_healthy("a")
    assert pool.deployment("a").state(clock()) == "closed", "down then up closes the breaker"
    assert await chat(pool) == "a"
    pool.mark_unhealthy("a")
    with pytest.raises(ServiceUnavailable) as caught:
        await chat(pool)
    assert caught.value.retry_after == 1
    pool.mark_healthy("b")
    assert await chat(pool) == "b"
    with pytest.raises(KeyError):
        pool.mark_healthy("nope")


def test_snapshot() -> None:
    clock = Clock()
    pool = make_pool(Fake("a"), Fake("b"), clock=clock)
    a = pool.deployment("a")
    a.record_failure(clock(), pool.breaker, trial=False)
    a.in_flight = 1
    pool.deployment("b")._trip(clock(), pool.breaker)
    clock.advance(12.5)
    assert pool.snapshot() == [
        {
            "name": "a",
            "backend": "",
            "healthy": True,
            "state": "closed",
            "eligible": True,
            "in_flight": 1,
            "max_parallel": None,
            "weight": 1,
            "priority": 0,
            "recent_failures": 1,
            "total_failures": 1,
            "total_successes": 0,
            "cooldown_remaining_s": 0.0,
            "checked_at": None,
            "check_error": None,
        },
        {
            "name": "b",
            "backend": "",
            "healthy": True,
            "state": "open",
            "eligible": False,
            "in_flight": 0,
            "max_parallel": None,
            "weight": 1,
            "priority": 1,
            "recent_failures": 0,
            "total_failures": 0,
            "total_successes": 0,
            "cooldown_remaining_s": 17.5,
            "checked_at": None,
            "check_error": None,
        },
    ]


def test_pool_needs_distinct_deployments() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Pool("m", [], PriorityFailover())
    with pytest.raises(ValueError, match="distinct"):
        Pool("m", [deployment(Fake("a")), deployment(Fake("a"))], PriorityFailover())


# streams


async def test_stream_fails_over_before_the_first_item() -> None:
    a, b = Fake("a", [UpstreamUnavailable("refused")]), Fake("b")
    pool = make_pool(a, b)
    assert await collect(pool) == ["b:x", "b:y", "b:z"]
    assert a.stream_closed
    assert pool.deployment("a").total_failures == 1
    assert [d.in_flight for d in pool.deployments] == [0, 0]


async def test_stream_fails_over_when_the_first_item_breaks() -> None:
    a, b = Fake("a", fail_at=0), Fake("b")
    pool = make_pool(a, b)
    assert await collect(pool) == ["b:x", "b:y", "b:z"]


async def test_stream_first_item_timeout_fails_over() -> None:
    a, b = Fake("a", [HANG]), Fake("b")
    ds = [deployment(a, total_s=0.02), deployment(b, priority=1)]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    assert await collect(pool) == ["b:x", "b:y", "b:z"]
    assert a.stream_closed


async def test_stream_is_never_retried_after_the_first_item() -> None:
    a, b = Fake("a", fail_at=2), Fake("b")
    pool = make_pool(a, b)
    got: list[str] = []
    with pytest.raises(UpstreamError, match="mid-stream"):
        await drain(pool.stream(lambda d: d.backend.stream_chat(REQ)), got)
    assert got == ["a:x", "a:y"]
    assert b.calls == 0
    assert pool.deployment("a").in_flight == 0
    assert pool.deployment("a").total_failures == 1


async def test_stream_client_error_before_first_item_propagates() -> None:
    a, b = Fake("a", [InvalidRequest("bad")]), Fake("b")
    pool = make_pool(a, b)
    with pytest.raises(InvalidRequest):
        await collect(pool)
    assert b.calls == 0
    assert pool.deployment("a").in_flight == 0


async def test_stream_holds_in_flight_until_it_ends() -> None:
    pool = make_pool(Fake("a"))
    d = pool.deployment("a")
    seen = []
    async for _ in pool.stream(lambda d: d.backend.stream_chat(REQ)):
        seen.append(d.in_flight)
    assert seen == [1, 1, 1]
    assert d.in_flight == 0
    assert d.total_successes == 1


async def test_stream_closed_early_releases_and_closes_the_upstream() -> None:
    a = Fake("a")
    pool = make_pool(a)
    stream = pool.stream(lambda d: d.backend.stream_chat(REQ))
    assert await anext(stream) == "a:x"
    assert pool.deployment("a").in_flight == 1
    await stream.aclose()
    assert pool.deployment("a").in_flight == 0
    assert a.stream_closed
    assert pool.deployment("a").total_failures == 0


async def test_empty_stream_yields_nothing_and_releases() -> None:
    pool = make_pool(Fake("a", items=()))
    assert await collect(pool) == []
    assert pool.deployment("a").in_flight == 0


async def test_stream_nothing_eligible() -> None:
    pool = make_pool(Fake("a"))
    pool.mark_unhealthy("a")
    with pytest.raises(ServiceUnavailable, match="no healthy backend"):
        await collect(pool)


# with the shipped mock backend


def mock(name: str, **options: Any) -> Backend:
    model = ModelConfig(id=name, backend="mock:", options=options)
    return MockBackend(BackendSpec(model, "mock", "", 60.0))


async def test_mock_backends_through_a_pool() -> None:
    ds = [
        Deployment("broken", mock("broken", reply="one two", fail_after_tokens=0)),
        Deployment("ok", mock("ok", reply="one two"), priority=1),
    ]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    answer = await pool.call(lambda d: d.backend.chat(REQ))
    assert answer.choices[0].message.content == "one two"
    assert pool.deployment("broken").total_failures == 1
    pool.mark_unhealthy("broken")  # its stream would fail after the role chunk: not retried
    chunks = await collect(pool)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two"
    assert [d.in_flight for d in ds] == [0, 0]


async def test_mock_backend_mid_stream_failure_is_not_retried() -> None:
    ds = [
        Deployment("a", mock("a", reply="one two three", fail_after_tokens=1)),
        Deployment("b", mock("b", reply="one two three"), priority=1),
    ]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    got: list[Any] = []
    with pytest.raises(UpstreamError, match="mid-generation"):
        await drain(pool.stream(lambda d: d.backend.stream_chat(REQ)), got)
    assert [c.choices[0].delta.content for c in got] == ["", "one "]
    assert pool.deployment("b").total_successes == 0
    assert pool.deployment("a").in_flight == 0


async def test_stream_total_timeout_cuts_a_stream_after_its_first_item() -> None:
    a = Fake("a", hang_at=1)
    ds = [deployment(a, total_s=0.05), deployment(Fake("b"), priority=1)]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    got: list[Any] = []
    with pytest.raises(UpstreamTimeout, match=r"did not finish its stream within 0\.05s"):
        await drain(pool.stream(lambda d: d.backend.stream_chat(REQ)), got)
    assert got == ["a:x"], "never retried once an item was sent"
    assert a.stream_closed, "the upstream read was cancelled"
    assert pool.deployment("a").in_flight == 0
    assert pool.deployment("a").total_failures == 1


async def test_first_token_timeout_only_bounds_the_first_item() -> None:
    a = Fake("a", item_delay=0.04)
    ds = [Deployment("a", a, first_token_s=0.05, total_s=5)]
    pool = Pool("m", ds, PriorityFailover(), clock=Clock())
    assert await collect(pool) == ["a:x", "a:y", "a:z"]


async def test_a_pool_of_one_never_cools_down() -> None:
    clock = Clock()
    a = Fake("a", [UpstreamError("x")] * 5)
    pool = make_pool(a, clock=clock)
    for _ in range(5):
        with pytest.raises(UpstreamError):
            await chat(pool)
    assert pool.deployment("a").state(clock()) == "closed"
    assert pool.deployment("a").total_failures == 5
    assert await chat(pool) == "a"
