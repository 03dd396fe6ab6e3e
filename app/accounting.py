"""Per-request bookkeeping that needs the whole exchange: status, timings, usage, headers.

`Accounting` wraps the app below `Edge`. Handlers and policies fill the request's `Exchange`
as they learn things (the key, the model, the backend, token usage, the rate-limit admission);
when the response has been sent, or the client has gone, the gateway's `finish` turns it into
the rate-limit correction and the audit row. Nothing here touches the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from app.edge import refuse, request_id_of
from app.logs import REQUEST_ID

if TYPE_CHECKING:
    from app.context import RequestContext

log = logging.getLogger("clawbot.gateway")

AUDITED_PREFIXES = ("/v1/", "/admin/")
"""Routes that get an audit row; probes (/health, /ready) would only drown it."""
UNAUDITED_PREFIXES = ("/admin/ui",)
"""The dashboard's static files: the API calls it makes are audited, its assets are not."""


@dataclass(slots=True)
class Exchange:
    """What is learned about one request while it is served."""

    started: float
    route: str
    request_id: str = ""
    method: str = ""
    client_ip: str | None = None
    ctx: RequestContext | None = None
    backend: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int = 0
    error_type: str | None = None
    first_token_at: float | None = None
    """When a stream's first generated token (text, reasoning, a tool call) passed through:
    what TTFT measures, rather than the first byte (a Responses stream sends
    `response.created` long before the model has produced anything)."""
    finished_at: float | None = None
    template: str | None = None
    """The matched route's path template (`/admin/keys/{key_id}`); None if none matched."""
    upstream_s: float = 0.0
    """Time spent waiting on backends (every attempt, every stream item), for metrics."""
    request_body: bytes | None = None
    response_body: bytearray | None = None
    """Collected only when body logging is enabled."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Added to the response when it starts (rate-limit headers)."""
    on_finish: list[Callable[[Exchange], Awaitable[None]]] = field(default_factory=list)
    """Run once, just before the answer's last byte leaves (or when the exchange ends without
    one): release parallel slots, correct token counts. Before, not after: a client that sends
    its next request as soon as it has read the answer must find its slot free."""

    @property
    def audited(self) -> bool:
        """Whether this route gets an audit row."""
        return self.route.startswith(AUDITED_PREFIXES) and not self.route.startswith(
            UNAUDITED_PREFIXES
        )

    @property
    def latency_ms(self) -> float:
        """From the request's arrival to the last byte of the answer."""
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return (end - self.started) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """For streams: from arrival to the first generated token; None if none came."""
        if not self.stream or self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def record_usage(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Token usage, once known."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    async def settle(self) -> None:
        """Run the `on_finish` callbacks, once; a failing one is logged, the rest still run."""
        callbacks, self.on_finish = self.on_finish, []
        for callback in callbacks:
            try:
                await callback(self)
            except Exception:
                log.exception("finishing request %s failed", self.request_id)


def exchange_of(scope: Scope | dict[str, Any]) -> Exchange | None:
    """The exchange `Accounting` opened for this request, if any."""
    state: dict[str, Any] = scope.get("state") or {}
    exchange = state.get("exchange")
    return exchange if isinstance(exchange, Exchange) else None


def exchange_for(scope: Scope | dict[str, Any]) -> Exchange:
    """The request's exchange; a detached one when the app runs without `Accounting`."""
    return exchange_of(scope) or Exchange(started=time.perf_counter(), route=str(scope["path"]))


Finisher = Callable[[Exchange], Awaitable[None]]
_BODY_CAP = 1 << 20


def _capturing(receive: Receive, exchange: Exchange) -> Receive:
    """A receive that also keeps the request body (up to 1 MiB) for the audit log."""

    async def wrapped() -> ReceiveMessage:
        message = await receive()
        body = exchange.request_body
        if message["type"] == "http.request" and body is not None and len(body) < _BODY_CAP:
            exchange.request_body = body + message.get("body", b"")
        return message

    return wrapped


class Accounting:
    """ASGI middleware: opens an `Exchange` per HTTP request and finishes it after the answer."""

    answers_refusals = True
    """`Edge` leaves its refusals (admin allowlist) to this, so they are audited too."""

    def __init__(self, app: ASGIApp, finish: Finisher, *, keep_bodies: bool = False) -> None:
        self.app = app
        self.finish = finish
        self.keep_bodies = keep_bodies
        self.in_flight = 0
        """HTTP requests being served."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        exchange = Exchange(
            started=time.perf_counter(),
            route=scope["path"],
            request_id=request_id_of(scope),
            method=scope["method"],  # type: ignore[typeddict-item]  # http scopes have it
            client_ip=client[0] if client else None,
        )
        logged_as = REQUEST_ID.set(exchange.request_id)
        self.in_flight += 1
        state: dict[str, Any] = scope.setdefault("state", {})
        state["exchange"] = exchange
        if self.keep_bodies:
            exchange.response_body = bytearray()
            exchange.request_body = b""
            receive = _capturing(receive, exchange)

        async def send_and_observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                if exchange.response_headers:
                    headers = list(message.get("headers", ()))
                    headers.extend(
                        (k.encode(), v.encode()) for k, v in exchange.response_headers.items()
                    )
                    message["headers"] = headers
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if exchange.response_body is not None and len(exchange.response_body) < _BODY_CAP:
                    exchange.response_body.extend(body)
                if not message.get("more_body", False):
                    exchange.finished_at = time.perf_counter()
                    await exchange.settle()
            await send(message)

        try:
            refusal = state.get("refusal")
            if refusal is None:
                await self.app(scope, receive, send_and_observe)
            else:
                exchange.error_type = await refuse(refusal, send_and_observe)
        finally:
            if exchange.finished_at is None:
                exchange.finished_at = time.perf_counter()
            self.in_flight -= 1
            exchange.template = scope.get("path_template")
            try:
                await self.finish(exchange)
            finally:
                REQUEST_ID.reset(logged_as)
