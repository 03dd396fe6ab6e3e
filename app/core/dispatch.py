"""Sends a request to its model's pool, and on to the model's fallbacks when configured.

Within a pool, `app.routing.pool` fails over between deployments. Across models there are two
kinds of fallback: `context_window_fallbacks` when the prompt does not fit (estimated before
sending, or reported by the backend), and `fallbacks` when the whole pool failed or had
nothing healthy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from app.core.gateway import Gateway, ServedModel
from app.errors import GatewayError, ServiceUnavailable, UpstreamStatusError, UpstreamTimeout
from app.ledger.exchange import Exchange
from app.routing.pool import Deployment, EmptyStream, is_retryable, pull_head
from policies.context import RequestContext

T = TypeVar("T")
X = TypeVar("X")
R = TypeVar("R")

Run = Callable[[ServedModel, Deployment], Awaitable[T]]
StreamRun = Callable[[ServedModel, Deployment], AsyncIterator[X]]

BACKEND_HEADER = "x-clawbot-backend"
_OVERFLOW_PHRASES = ("context length", "context window", "maximum context", "too many tokens")

log = logging.getLogger("clawbot.dispatch")


class PerModel(Generic[R]):
    """A request prepared once per model it is sent to (fallbacks have their own defaults)."""

    def __init__(self, req: R, prepare: Callable[[R, ServedModel], R]) -> None:
        self._req = req
        self._prepare = prepare
        self._done: dict[str, R] = {}

    def __call__(self, served: ServedModel) -> R:
        """The request as `served` gets it."""
        prepared = self._done.get(served.config.id)
        if prepared is None:
            prepared = self._done[served.config.id] = self._prepare(self._req, served)
        return prepared


def is_context_overflow(exc: GatewayError) -> bool:
    """Whether the backend refused the prompt as too long for the model."""
    if exc.code == "context_length_exceeded":
        return True
    if isinstance(exc, UpstreamStatusError) and exc.upstream_status in (400, 413):
        text = str(exc).lower()
        return any(phrase in text for phrase in _OVERFLOW_PHRASES)
    return False


def _pool_failed(exc: GatewayError) -> bool:
    if isinstance(exc, ServiceUnavailable | UpstreamTimeout):
        return True
    return is_retryable(exc)


class _Waited(Generic[X]):
    """A backend's stream, adding the time spent waiting on each item to `upstream_s`."""

    __slots__ = ("_exchange", "_items")

    def __init__(self, items: AsyncIterator[X], exchange: Exchange) -> None:
        self._items = items
        self._exchange = exchange

    def __aiter__(self) -> _Waited[X]:
        return self

    async def __anext__(self) -> X:
        started = time.perf_counter()
        try:
            return await anext(self._items)
        finally:
            self._exchange.upstream_s += time.perf_counter() - started

    async def aclose(self) -> None:
        """Close the backend's stream."""
        close = getattr(self._items, "aclose", None)
        if close is not None:
            await close()


class Dispatcher:
    """Routes one request: its model first, then that model's fallbacks, each at most once."""

    def __init__(self, gateway: Gateway, exchange: Exchange, ctx: RequestContext) -> None:
        self._gateway = gateway
        self._exchange = exchange
        self._ctx = ctx

    def first(self, served: ServedModel) -> ServedModel:
        """`served`, or its first context-window fallback that fits when the prompt won't."""
        fallbacks = served.config.context_window_fallbacks
        if not fallbacks:
            return served
        length = served.context_length
        estimate = self._ctx.tokens() if length else None
        if length is None or estimate is None or estimate <= length:
            return served
        for name in fallbacks:
            other = self._gateway.resolve(name)
            other_length = other.context_length
            if other_length is None or estimate <= other_length:
                log.info(
                    "request %s: ~%d tokens exceed %s's window (%d); sent to %s",
                    self._ctx.request_id,
                    estimate,
                    served.config.id,
                    length,
                    other.config.id,
                )
                return other
        return served

    def next(self, current: ServedModel, exc: GatewayError, tried: set[str]) -> ServedModel | None:
        """The model to try after `current` failed with `exc`, if any."""
        if is_context_overflow(exc):
            names = current.config.context_window_fallbacks
        elif _pool_failed(exc):
            names = current.config.fallbacks
        else:
            return None
        for name in names:
            other = self._gateway.resolve(name)
            if other.config.id not in tried:
                log.warning(
                    "request %s: %s failed (%s); falling back to %s",
                    self._ctx.request_id,
                    current.config.id,
                    exc.code,
                    other.config.id,
                )
                return other
        return None

    def _after(self, current: ServedModel, exc: GatewayError, tried: set[str]) -> ServedModel:
        """The next model to try, or `exc` again when there is none."""
        following = self.next(current, exc, tried)
        if following is None:
            raise exc
        tried.add(following.config.id)
        return following

    def _tracked(
        self, served: ServedModel, run: Callable[[ServedModel, Deployment], T]
    ) -> Callable[[Deployment], T]:
        exchange = self._exchange

        def attempt(d: Deployment) -> T:
            exchange.backend = d.label
            exchange.response_headers[BACKEND_HEADER] = f"{served.config.id}/{d.name}"
            return run(served, d)

        return attempt

    def _waited(self, run: Run[T]) -> Run[T]:
        """`run`, adding the time spent waiting on the backend to `upstream_s`."""
        exchange = self._exchange

        async def waited(served: ServedModel, d: Deployment) -> T:
            started = time.perf_counter()
            try:
                return await run(served, d)
            finally:
                exchange.upstream_s += time.perf_counter() - started

        return waited

    def _waited_stream(self, run: StreamRun[X]) -> StreamRun[X]:
        exchange = self._exchange
        return lambda served, d: _Waited(run(served, d), exchange)

    async def call(self, served: ServedModel, run: Run[T]) -> T:
        """Answer from `served`'s pool or a fallback's."""
        current = self.first(served)
        tried = {current.config.id}
        run = self._waited(run)
        while True:
            try:
                return await current.pool.call(self._tracked(current, run))
            except GatewayError as exc:
                current = self._after(current, exc, tried)

    def stream(self, served: ServedModel, run: StreamRun[X]) -> AsyncIterator[X]:
        """Stream from `served`'s pool or, until the first item, a fallback's."""
        config = served.config
        run = self._waited_stream(run)
        if not config.fallbacks and not config.context_window_fallbacks:
            return served.pool.stream(self._tracked(served, run))
        return self._stream_with_fallbacks(served, run)

    async def _stream_with_fallbacks(
        self, served: ServedModel, run: StreamRun[X]
    ) -> AsyncGenerator[X, None]:
        current = self.first(served)
        tried = {current.config.id}
        while True:
            items = current.pool.stream(self._tracked(current, run))
            try:
                head = await pull_head(items)
            except GatewayError as exc:
                current = self._after(current, exc, tried)
                continue
            if isinstance(head, EmptyStream):
                return
            try:
                yield head
                async for item in items:
                    yield item
            finally:
                await items.aclose()
            return
