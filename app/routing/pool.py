"""The router's core: a pool of deployments per public model, try order, failover and breakers."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from app.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from backends.base import Backend

T = TypeVar("T")
X = TypeVar("X")

BreakerState = Literal["closed", "open", "half_open"]

log = logging.getLogger("clawbot.routing")


@dataclass(frozen=True, slots=True)
class Breaker:
    """When a deployment is taken out of rotation, and for how long."""

    failures_to_trip: int = 3
    """Failures within `window_s` that open the breaker."""
    window_s: float = 60.0
    """Sliding window over which failures are counted."""
    cooldown_s: float = 30.0
    """Time out of rotation before one trial request is let through."""


@dataclass(eq=False)
class Deployment:
    """One backend serving a public model, with its routing settings and runtime state."""

    name: str
    backend: Backend
    weight: int = 1
    priority: int = 0
    """Lower is tried first by priority failover."""
    max_parallel: int | None = None
    """Most requests in flight at once; a full deployment is skipped."""
    first_token_s: float | None = None
    """Time allowed a stream to yield its first item before the next deployment is tried."""
    total_s: float | None = None
    """Time allowed one whole call (a stream until its end)."""
    label: str = ""
    """The backend spec without credentials, for logs, audit and `/admin/backends`."""
    in_flight: int = field(default=0, init=False)
    failures: deque[float] = field(default_factory=deque, init=False)
    """Times of recent failures, within the breaker's window."""
    cooldown_until: float | None = field(default=None, init=False)
    """Set while the breaker is open or half-open (after the cooldown, until a trial succeeds)."""
    half_open: bool = field(default=False, init=False)
    """A trial request is in flight; no other request may use the deployment."""
    healthy: bool = field(default=True, init=False)
    """Set by the health-check hooks; an unhealthy deployment gets no traffic."""
    total_successes: int = field(default=0, init=False)
    total_failures: int = field(default=0, init=False)
    checked_at: float | None = field(default=None, init=False)
    """Wall-clock time of the last health check."""
    check_error: str | None = field(default=None, init=False)
    """Why the last health check failed."""

    def state(self, now: float) -> BreakerState:
        """The breaker's state at `now`."""
        if self.cooldown_until is None:
            return "closed"
        return "open" if now < self.cooldown_until else "half_open"

    def eligible(self, now: float) -> bool:
        """Whether a new request may be sent here at `now`."""
        if not self.healthy:
            return False
        if self.max_parallel is not None and self.in_flight >= self.max_parallel:
            return False
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.half_open)

    def cooldown_remaining(self, now: float) -> float:
        """Seconds until the breaker lets a trial through (0 when it would now)."""
        if self.cooldown_until is None:
            return 0.0
        return max(0.0, self.cooldown_until - now)

    def acquire(self, now: float) -> bool:
        """Count a request in flight; returns whether it is the half-open trial."""
        self.in_flight += 1
        trial = self.state(now) == "half_open"
        if trial:
            self.half_open = True
        return trial

    def release(self, trial: bool) -> None:
        """Stop counting a request in flight (outcome recorded separately, if any)."""
        self.in_flight -= 1
        if trial:
            self.half_open = False

    def record_success(self) -> None:
        """An attempt answered: a successful trial closes the breaker."""
        self.total_successes += 1
        if self.cooldown_until is not None:
            self.cooldown_until = None
            self.half_open = False
            self.failures.clear()

    def record_failure(self, now: float, breaker: Breaker, trial: bool) -> None:
        """An attempt failed upstream: a failed trial re-opens, N failures in the window trip."""
        self.total_failures += 1
        if trial:
            self._trip(now, breaker)
            return
        if self.state(now) != "closed":
            return
        self.failures.append(now)
        while self.failures and self.failures[0] <= now - breaker.window_s:
            self.failures.popleft()
        if len(self.failures) >= breaker.failures_to_trip:
            self._trip(now, breaker)

    def _trip(self, now: float, breaker: Breaker) -> None:
        log.warning("deployment %s cools down for %.0fs", self.name, breaker.cooldown_s)
        self.cooldown_until = now + breaker.cooldown_s
        self.half_open = False
        self.failures.clear()

    def reset(self) -> None:
        """Close the breaker and forget failures (a health check found it serving)."""
        self.cooldown_until = None
        self.half_open = False
        self.failures.clear()


class Strategy(Protocol):
    """Decides the order in which a request tries the eligible deployments."""

    def order(self, deployments: Sequence[Deployment], now: float) -> list[Deployment]:
        """The try order for one request (the first is the pick; the rest are fallbacks)."""
        ...


class PriorityFailover:
    """The primary (lowest priority value) first, then the backups; config order breaks ties."""

    def order(self, deployments: Sequence[Deployment], now: float) -> list[Deployment]:
        """Deployments by priority."""
        return sorted(deployments, key=lambda d: d.priority)


class WeightedRoundRobin:
    """Smooth weighted round robin (nginx's): picks in proportion to weight, interleaved."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def order(self, deployments: Sequence[Deployment], now: float) -> list[Deployment]:
        """The weighted pick first, then the others by their current weight."""
        if not deployments:
            return []
        total = 0
        for d in deployments:
            self._current[d.name] = self._current.get(d.name, 0) + d.weight
            total += d.weight
        ranked = sorted(deployments, key=lambda d: -self._current[d.name])
        self._current[ranked[0].name] -= total
        return ranked


class LeastBusy:
    """Fewest requests in flight first; ties by priority, then name."""

    def order(self, deployments: Sequence[Deployment], now: float) -> list[Deployment]:
        """Deployments by load."""
        return sorted(deployments, key=lambda d: (d.in_flight, d.priority, d.name))


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure before the first byte may be tried on another deployment."""
    if isinstance(exc, UpstreamStatusError):
        return exc.upstream_status == 429 or exc.upstream_status >= 500
    return isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamError)


class EmptyStream:
    """A stream that ended before its first item."""


async def pull_head(it: AsyncIterator[X]) -> X | EmptyStream:
    """A stream's first item, before anything of it is sent: until then a failure can still go
    to another deployment or model, after it never (the first item commits the stream). A
    stream that fails or ends here is closed."""
    try:
        return await anext(it)
    except StopAsyncIteration:
        await _aclose(it)
        return EmptyStream()
    except BaseException:
        await _aclose(it)
        raise


class Pool:
    """The deployments behind one public model, and the policy for choosing among them."""

    def __init__(
        self,
        name: str,
        deployments: Sequence[Deployment],
        strategy: Strategy,
        *,
        retries: int = 2,
        deadline_s: float = 60.0,
        breaker: Breaker = Breaker(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [d.name for d in deployments]
        if not deployments or len(set(names)) != len(names):
            raise ValueError(f"pool {name!r} needs deployments with distinct names: {names}")
        self.name = name
        self.deployments = list(deployments)
        self.strategy = strategy
        self.retries = retries
        self.deadline_s = deadline_s
        self.breaker = breaker
        self.clock = clock
        self.on_trip: Callable[[Pool, Deployment], None] | None = None
        """Called when a deployment's breaker opens (shared state publishes it)."""

    def deployment(self, name: str) -> Deployment:
        """The deployment called `name`."""
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def mark_healthy(self, name: str) -> bool:
        """Health-check hook: the deployment answers; if it was down, its breaker closes.

        A deployment that stayed up keeps its breaker: a server whose `/models` answers
        while its completions fail must still cool down. Returns whether it was down.
        """
        d = self.deployment(name)
        if d.healthy:
            return False
        log.info("pool %s: deployment %s is healthy again", self.name, d.name)
        d.healthy = True
        d.reset()
        return True

    def mark_unhealthy(self, name: str) -> None:
        """Health-check hook: take the deployment out of rotation until marked healthy."""
        d = self.deployment(name)
        if d.healthy:
            log.warning("pool %s: deployment %s failed its health check", self.name, d.name)
            d.healthy = False

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-deployment state for `/admin/backends`."""
        now = self.clock()
        out = []
        for d in self.deployments:
            recent = sum(1 for t in d.failures if t > now - self.breaker.window_s)
            out.append(
                {
                    "name": d.name,
                    "backend": d.label,
                    "healthy": d.healthy,
                    "state": d.state(now),
                    "eligible": d.eligible(now),
                    "in_flight": d.in_flight,
                    "max_parallel": d.max_parallel,
                    "weight": d.weight,
                    "priority": d.priority,
                    "recent_failures": recent,
                    "total_failures": d.total_failures,
                    "total_successes": d.total_successes,
                    "cooldown_remaining_s": round(d.cooldown_remaining(now), 3),
                    "checked_at": d.checked_at,
                    "check_error": d.check_error,
                }
            )
        return out

    def _failed(self, d: Deployment, trial: bool) -> None:
        if len(self.deployments) == 1:
            # Nothing to fail over to: a cooldown would only turn transient errors into 503s.
            # Health checks still take a pool of one out when it is down.
            d.total_failures += 1
            return
        before = d.cooldown_until
        d.record_failure(self.clock(), self.breaker, trial)
        if d.cooldown_until is not None and d.cooldown_until != before and self.on_trip:
            self.on_trip(self, d)

    def _no_healthy(self, now: float) -> ServiceUnavailable:
        cooling = [d.cooldown_remaining(now) for d in self.deployments if d.healthy]
        waits = [w for w in cooling if w > 0]
        retry_after = max(1.0, float(math.ceil(min(waits)))) if waits else 1.0
        return ServiceUnavailable(
            f"no healthy backend for model {self.name!r}",
            code="no_healthy_backend",
            retry_after=retry_after,
        )

    async def _attempt(
        self, d: Deployment, run: Callable[[Deployment], Awaitable[T]], limit: float | None
    ) -> T:
        if limit is None:
            return await run(d)
        try:
            async with asyncio.timeout(limit):
                return await run(d)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"deployment {d.name!r} did not answer within {limit}s") from exc

    async def _first(
        self, run: Callable[[Deployment], Awaitable[T]], *, streaming: bool
    ) -> tuple[Deployment, bool, T]:
        """Run `run` on deployments in try order until one answers; it stays acquired."""
        order = self.strategy.order(
            [d for d in self.deployments if d.eligible(self.clock())], self.clock()
        )
        if not order:
            raise self._no_healthy(self.clock())
        last: GatewayError | None = None
        attempts = 0
        for d in order:
            if attempts > self.retries:
                break
            if not d.eligible(self.clock()):
                continue
            attempts += 1
            trial = d.acquire(self.clock())
            limit = _first_item_limit(d) if streaming else d.total_s
            try:
                result = await self._attempt(d, run, limit)
            except GatewayError as exc:
                d.release(trial)
                if not is_retryable(exc):
                    raise
                self._failed(d, trial)
                log.warning("pool %s: deployment %s failed: %s", self.name, d.name, exc)
                last = exc
                continue
            except BaseException:
                d.release(trial)
                raise
            d.record_success()
            return d, trial, result
        if last is None:
            raise self._no_healthy(self.clock())
        raise last

    async def _within_deadline(
        self, run: Callable[[Deployment], Awaitable[T]], *, streaming: bool
    ) -> tuple[Deployment, bool, T]:
        deadline = asyncio.timeout(self.deadline_s)
        try:
            async with deadline:
                return await self._first(run, streaming=streaming)
        except TimeoutError as exc:
            if deadline.expired():
                raise UpstreamTimeout(
                    f"no deployment of {self.name!r} answered within {self.deadline_s}s"
                ) from exc
            raise

    async def call(self, fn: Callable[[Deployment], Awaitable[T]]) -> T:
        """Run `fn` on a deployment, failing over on upstream failures."""
        d, trial, result = await self._within_deadline(fn, streaming=False)
        d.release(trial)
        return result

    async def stream(self, fn: Callable[[Deployment], AsyncIterator[X]]) -> AsyncGenerator[X, None]:
        """Stream from a deployment; fails over until the first item, never after."""
        iterators: list[AsyncIterator[X]] = []
        started = asyncio.get_running_loop().time()

        async def first(d: Deployment) -> X | EmptyStream:
            it = fn(d)
            head = await pull_head(it)
            if not isinstance(head, EmptyStream):
                iterators.append(it)
            return head

        d, trial, head = await self._within_deadline(first, streaming=True)
        try:
            if isinstance(head, EmptyStream):
                return
            it = iterators[-1]
            try:
                yield head
                if d.total_s is None:
                    async for item in it:
                        yield item
                else:
                    async for item in _until(it, d, started + d.total_s):
                        yield item
            except GatewayError as exc:
                if is_retryable(exc):
                    self._failed(d, trial=False)
                raise
            finally:
                await _aclose(it)
        finally:
            d.release(trial)


def _first_item_limit(d: Deployment) -> float | None:
    if d.first_token_s is None:
        return d.total_s
    if d.total_s is None:
        return d.first_token_s
    return min(d.first_token_s, d.total_s)


async def _until(it: AsyncIterator[X], d: Deployment, deadline: float) -> AsyncIterator[X]:
    """The rest of a stream, cut with UpstreamTimeout at `deadline` (event-loop time).

    The timeout wraps each `anext` rather than the loop: a timeout around a `yield` would
    fire in the consumer's code instead of the upstream read it is meant to cancel.
    """
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                item = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"deployment {d.name!r} did not finish its stream within {d.total_s}s"
            ) from exc
        yield item


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()
