"""The middleware that opens each request's `Exchange` (app.ledger.exchange) and finishes it.

`Accounting` wraps the app below `Edge`. Handlers and policies fill the request's `Exchange`
as they learn things (the key, the model, the backend, token usage, the rate-limit admission);
when the response has been sent, or the client has gone, the gateway's `finish` turns it into
the rate-limit correction and the audit row. Nothing here touches the database.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from app.api import scope as scope_keys
from app.api.scope import request_id_of
from app.ledger.exchange import Exchange
from app.logs import REQUEST_ID

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
        state[scope_keys.EXCHANGE] = exchange
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
            await self.app(scope, receive, send_and_observe)
        finally:
            if exchange.finished_at is None:
                exchange.finished_at = time.perf_counter()
            self.in_flight -= 1
            exchange.template = scope.get("path_template")
            try:
                await self.finish(exchange)
            finally:
                REQUEST_ID.reset(logged_as)
