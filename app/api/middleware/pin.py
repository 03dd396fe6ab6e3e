"""The middleware that pins each request to the gateway current when it arrived, so that a
reload (`app.core.reload`) never changes the gateway under a request being served."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send

from app.core.gateway import Gateway
from app.core.reload import Reloader

GATEWAY = "gateway"
"""The scope-state key of the pinned gateway."""


class PinGateway:
    """ASGI middleware: each HTTP request is served to its end by the gateway that was current
    when it arrived, and counted in that gateway's `in_flight` meanwhile."""

    def __init__(self, app: ASGIApp, reloader: Reloader) -> None:
        self.app = app
        self.reloader = reloader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        gateway = self.reloader.current
        state: dict[str, Any] = scope.setdefault("state", {})
        state[GATEWAY] = gateway
        gateway.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gateway.in_flight -= 1


def gateway_of(scope: Scope) -> Gateway | None:
    """The gateway `PinGateway` pinned this request to."""
    state: dict[str, Any] = scope.get("state") or {}
    gateway = state.get(GATEWAY)
    return gateway if isinstance(gateway, Gateway) else None


def serving_gateway(state: State, scope: Scope) -> Gateway:
    """The gateway this request is pinned to, else the current one (the app's `gateway`
    dependency, and what guards read)."""
    reloader: Reloader = state.reloader
    return gateway_of(scope) or reloader.current
