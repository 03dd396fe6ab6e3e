"""The policy protocol."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from policies.context import RequestContext


@runtime_checkable
class Policy(Protocol):
    """A single-purpose check on a request; raises a GatewayError to refuse it."""

    name: str

    async def check(self, ctx: RequestContext) -> None:
        """Pass, or raise a GatewayError."""
