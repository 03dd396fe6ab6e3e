"""Rate limits: requests, tokens and parallel requests per key (and per model, if configured)."""

from __future__ import annotations

from collections.abc import Callable

from app.ledger.ratelimit import Limits, RateLimiter
from policies.context import RequestContext


class RateLimitPolicy:
    """Admit the request against every limit that applies, or raise RateLimited."""

    name = "rate_limit"

    def __init__(
        self,
        limiter: RateLimiter,
        limits_for: Callable[[RequestContext], list[tuple[str, Limits]]],
    ) -> None:
        self._limiter = limiter
        self._limits_for = limits_for

    async def check(self, ctx: RequestContext) -> None:
        """Admit, leaving the `Admission` in `ctx.admission` for headers and release."""
        subjects = self._limits_for(ctx)
        if not subjects:
            return
        ctx.admission = await self._limiter.admit_all(subjects, ctx.token_estimate or 0)
