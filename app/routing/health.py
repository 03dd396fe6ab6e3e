"""Background health checks: every deployment of every pool, each pool on its own interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from app.config import RoutingSettings
from app.routing.pool import Deployment, Pool
from app.routing.shared import RouterState

log = logging.getLogger("clawbot.monitor")


async def check_deployment(
    pool: Pool, d: Deployment, timeout_s: float, state: RouterState | None = None
) -> bool:
    """Ask one deployment whether it serves; record the answer on the pool (and `state`)."""
    error: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            healthy = await d.backend.health()
        if not healthy:
            error = "the backend reports it cannot serve"
    except TimeoutError:
        error = f"no answer within {timeout_s}s"
    except Exception as exc:  # a probe must never kill the monitor
        error = f"{type(exc).__name__}: {exc}"
    d.checked_at = time.time()
    d.check_error = error
    recovered = False
    if error is None:
        recovered = pool.mark_healthy(d.name)
    else:
        pool.mark_unhealthy(d.name)
    if state is not None:
        state.checked(pool, d, error is None, recovered)
    return error is None


class HealthMonitor:
    """Runs the active health checks that routing's cooldowns rely on to end early."""

    def __init__(
        self, pools: Sequence[tuple[Pool, RoutingSettings]], state: RouterState | None = None
    ) -> None:
        self._pools = [(p, s) for p, s in pools if s.health_check_interval_s > 0]
        self._state = state
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """One task per pool with checks enabled."""
        for pool, settings in self._pools:
            self._tasks.append(
                asyncio.create_task(self._run(pool, settings), name=f"health:{pool.name}")
            )

    async def check_all(self) -> None:
        """One round of checks over every pool (also what each task does per interval)."""
        await asyncio.gather(*(self._round(p, s) for p, s in self._pools))

    async def _round(self, pool: Pool, settings: RoutingSettings) -> None:
        timeout_s = settings.health_check_timeout_s
        await asyncio.gather(
            *(check_deployment(pool, d, timeout_s, self._state) for d in pool.deployments)
        )

    async def _run(self, pool: Pool, settings: RoutingSettings) -> None:
        while True:
            await asyncio.sleep(settings.health_check_interval_s)
            try:
                await self._round(pool, settings)
            except Exception:
                log.exception("health checks of %s failed", pool.name)

    async def aclose(self) -> None:
        """Stop every task."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
