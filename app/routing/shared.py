"""Routing state shared by replicas through Redis: cooldowns and failed health checks.

Each replica keeps its own breakers and health checks; this only spreads bad news. A replica
whose breaker trips writes `<prefix><model>:<deployment>:cooldown` (the wall-clock end of the
cooldown, expiring with it); one whose health check fails writes `...:down` (expiring after
two check intervals, so a replica that dies cannot keep a deployment out). Every
`sync_interval_s` each replica reads all keys in one MGET and applies them: a remote cooldown
extends its own, a remote `down` marks the deployment unhealthy until its own next check
passes. A replica that sees a deployment recover deletes both keys. Redis being down only
loses the sharing: routing goes on with local state, and the failure is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence

import coredis

from app.config import RoutingSettings
from app.routing.pool import Deployment, Pool

log = logging.getLogger("clawbot.router_state")

_TIMEOUT_S = 0.5


class RouterState:
    """The Redis side of routing state; without Redis, the gateway has none of these."""

    def __init__(
        self,
        url: str,
        pools: Sequence[tuple[Pool, RoutingSettings]],
        *,
        sync_interval_s: float = 1.0,
        key_prefix: str = "clawbot:router:",
    ) -> None:
        self._client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
        self._pools = list(pools)
        self._settings = {pool.name: settings for pool, settings in pools}
        self._interval = sync_interval_s
        self._prefix = key_prefix
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._clearing: set[str] = set()
        """Keys of recovered deployments whose deletion has not completed yet."""
        self._cleared_at: dict[str, float] = {}
        """When each key's last deletion by this replica completed (monotonic)."""
        self._failing = False
        for pool, _ in self._pools:
            pool.on_trip = self._tripped

    def key(self, pool: Pool, d: Deployment, kind: str) -> str:
        """The Redis key of one fact about one deployment."""
        return f"{self._prefix}{pool.name}:{d.name}:{kind}"

    def start(self) -> None:
        """Start reading what other replicas report."""
        self._task = asyncio.create_task(self._run(), name="router-state")

    async def aclose(self) -> None:
        """Stop syncing; writes still in flight are given a moment to land."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            await asyncio.wait(self._pending, timeout=_TIMEOUT_S)
        self._client.connection_pool.disconnect()

    def _spawn(self, op: str, request: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                async with asyncio.timeout(_TIMEOUT_S):
                    await request
                self._recovered()
            except Exception as exc:
                self._failed(op, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _tripped(self, pool: Pool, d: Deployment) -> None:
        remaining = d.cooldown_remaining(pool.clock())
        if remaining <= 0:
            return
        until = time.time() + remaining
        self._spawn(
            "publish a cooldown",
            self._client.set(self.key(pool, d, "cooldown"), repr(until), px=_ms(remaining)),
        )

    def checked(self, pool: Pool, d: Deployment, healthy: bool, recovered: bool) -> None:
        """A local health check's result: failures are published, recoveries clear the marks."""
        if not healthy:
            ttl = 2 * self._settings[pool.name].health_check_interval_s
            reason = d.check_error or "health check failed"
            self._spawn(
                "publish a failed health check",
                self._client.set(self.key(pool, d, "down"), reason, px=_ms(max(ttl, 1.0))),
            )
        elif recovered:
            keys = (self.key(pool, d, "down"), self.key(pool, d, "cooldown"))
            self._clearing.update(keys)

            async def clear() -> None:
                try:
                    await self._client.delete(keys)
                finally:
                    self._clearing.difference_update(keys)
                    done = time.monotonic()
                    self._cleared_at.update(dict.fromkeys(keys, done))

            self._spawn("clear a recovered deployment", clear())

    async def sync(self) -> None:
        """Read every shared mark once and apply it to the local pools."""
        entries = [
            (pool, d)
            for pool, _ in self._pools
            if len(pool.deployments) > 1
            for d in pool.deployments
        ]
        if not entries:
            return
        keys = tuple(self.key(p, d, kind) for p, d in entries for kind in ("cooldown", "down"))
        asked = time.monotonic()
        async with asyncio.timeout(_TIMEOUT_S):
            values = await self._client.mget(keys)
        now_wall = time.time()
        for i, (pool, d) in enumerate(entries):
            if self._stale(keys[2 * i + 1], asked):
                continue  # this replica saw it recover: the marks it read are being deleted
            cooldown, down = values[2 * i], values[2 * i + 1]
            if cooldown is not None:
                _apply_cooldown(pool, d, float(cooldown) - now_wall)
            if down is not None and d.healthy:
                pool.mark_unhealthy(d.name)
                d.check_error = f"reported by another replica: {down}"

    def _stale(self, key: str, asked: float) -> bool:
        """Whether a mark read at `asked` may predate this replica's deletion of it."""
        return key in self._clearing or self._cleared_at.get(key, -1.0) >= asked

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
                self._recovered()
            except Exception as exc:
                self._failed("read shared routing state", exc)
            await asyncio.sleep(self._interval)

    def _failed(self, op: str, exc: BaseException) -> None:
        if not self._failing:
            log.warning("router state: cannot %s in Redis (%r); routing on local state", op, exc)
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("router state: Redis reachable again")
            self._failing = False


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _apply_cooldown(pool: Pool, d: Deployment, remaining: float) -> None:
    """Extend the local cooldown to a remote one that ends later."""
    if remaining <= 0 or d.cooldown_remaining(pool.clock()) >= remaining - 0.05:
        return
    log.warning(
        "pool %s: deployment %s cools down for %.0fs (reported by another replica)",
        pool.name,
        d.name,
        remaining,
    )
    d.cooldown_until = pool.clock() + remaining
    d.half_open = False
    d.failures.clear()
