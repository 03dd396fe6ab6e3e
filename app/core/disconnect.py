"""Cancel a non-streaming backend call when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from app.core.gateway import Disconnect
from app.errors import ClientClosedRequest

T = TypeVar("T")


async def unless_disconnected(disconnected: Disconnect, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it (and so its generation) if the client leaves.

    Call this only after the request body was read (`Call.disconnected` then waits for the
    disconnect alone). One watcher task per call; the work itself is not wrapped in a task.
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await disconnected()
        gone = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ClientClosedRequest("the client disconnected before the answer was ready") from None
    finally:
        watcher.cancel()
