"""In-process models under a RAM budget: loaded on demand, least recently used unloaded first.

Each in-process model registers here with an estimate of what it needs loaded (weights, KV
cache, compute buffers: `backends.llamacpp.gguf.estimate_footprint`). Before a request uses a model
that is not loaded, the budget unloads idle models, least recently used first, until the new
one fits; a model serving requests is never unloaded. When everything loaded is busy and
nothing more fits, the request waits for one to become idle, up to its timeout (then 503
`server_busy`). The budget is per process: with `--workers N`, each worker has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from app.errors import ServerBusy

log = logging.getLogger("clawbot.memory")

MIB = 1024 * 1024


class Resident(Protocol):
    """A model the budget can load and unload."""

    name: str
    footprint: int
    """Bytes it needs when loaded (estimated)."""

    @property
    def loaded(self) -> bool:
        """Weights in memory."""

    in_use: int
    """Requests using it now; never unloaded while positive."""
    last_used: float

    async def load(self) -> None:
        """Load the weights and create the contexts."""

    async def unload(self) -> None:
        """Free everything `load` made."""


class MemoryBudget:
    """The models of one process and the RAM they may use together (`None`: no limit)."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self._residents: list[Resident] = []
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self.unloads = 0
        """Models unloaded to make room so far."""

    def register(self, resident: Resident) -> None:
        """Track `resident` (its weights are not loaded yet)."""
        self._residents.append(resident)

    def unregister(self, resident: Resident) -> None:
        """Forget `resident` (it is closing)."""
        if resident in self._residents:
            self._residents.remove(resident)
        self._idle.set()

    @property
    def used_bytes(self) -> int:
        """Estimated bytes of the loaded models."""
        return sum(r.footprint for r in self._residents if r.loaded)

    def released(self) -> None:
        """A request finished with a model: a waiting load may now unload it."""
        self._idle.set()

    async def ensure_loaded(self, resident: Resident, timeout_s: float) -> None:
        """Load `resident`, first unloading idle models (LRU first) until it fits."""
        deadline = time.monotonic() + timeout_s
        async with self._lock:
            if resident.loaded:
                return
            while not self._fits(resident):
                victim = self._least_recently_used(resident)
                if victim is not None:
                    log.info(
                        "unloading %s (least recently used, ~%d MiB) to make room for %s "
                        "(~%d MiB; budget %d MiB)",
                        victim.name,
                        victim.footprint // MIB,
                        resident.name,
                        resident.footprint // MIB,
                        (self.limit_bytes or 0) // MIB,
                    )
                    await victim.unload()
                    self.unloads += 1
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerBusy(
                        f"model {resident.name!r} is not loaded and the memory budget is held "
                        "by models serving requests; retry later",
                        retry_after=max(1.0, timeout_s / 4),
                    )
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), remaining)
            await resident.load()

    def _fits(self, resident: Resident) -> bool:
        if self.limit_bytes is None:
            return True
        return self.used_bytes + resident.footprint <= self.limit_bytes

    def _least_recently_used(self, keep: Resident) -> Resident | None:
        idle = [r for r in self._residents if r.loaded and r.in_use == 0 and r is not keep]
        return min(idle, key=lambda r: r.last_used, default=None)
