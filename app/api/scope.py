"""What the gateway keeps in an ASGI scope's `state`, one accessor per key.

`request_id` (set by `Edge`) and `exchange` (opened by `Accounting`); `gateway` (the pinned
one) is `app.api.middleware.pin`'s. Everything else reads them through here, and routes hand
the core an `Arrival` made of them (`arrival_of`).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from litestar import Request
from litestar.types import Scope

from app.core.gateway import Arrival
from app.ledger.exchange import Exchange

REQUEST_ID = "request_id"
EXCHANGE = "exchange"


def request_id_of(scope: Scope) -> str:
    """The id `Edge` gave this request (a fresh one for scopes that never passed it)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get(REQUEST_ID)
    if rid is None:
        rid = state[REQUEST_ID] = f"req_{secrets.token_hex(12)}"
    return str(rid)


def exchange_of(scope: Scope | dict[str, Any]) -> Exchange | None:
    """The exchange `Accounting` opened for this request, if any."""
    state: dict[str, Any] = scope.get("state") or {}
    exchange = state.get(EXCHANGE)
    return exchange if isinstance(exchange, Exchange) else None


def exchange_for(scope: Scope | dict[str, Any]) -> Exchange:
    """The request's exchange; a detached one when the app runs without `Accounting`."""
    return exchange_of(scope) or Exchange(started=time.perf_counter(), route=str(scope["path"]))


def arrival_of(request: Request[Any, Any, Any]) -> Arrival:
    """The request as the core takes it (`Gateway.admit`)."""
    client = request.client
    receive = request.receive

    async def disconnected() -> None:
        # Only after the body was read: the next message is then the disconnect, if any.
        while (await receive())["type"] != "http.disconnect":
            pass

    return Arrival(
        request_id=request_id_of(request.scope),
        client_ip=client.host if client else "",
        route=request.scope["path"],
        headers=request.headers,
        exchange=exchange_for(request.scope),
        disconnected=disconnected,
    )
