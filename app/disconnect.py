"""Cancel a non-streaming backend call when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from litestar.types import Receive

from app.errors import ClientClosedRequest

T = TypeVar("T")


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it (and so its generation) if the client leaves.

    Call this only after the request body was read: the next ASGI message is then the
    disconnect, if any. One watcher task per call; the work itself is not wrapped in a task.
    """
    handler = asyncio.current_task()
    assert handler is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not disconnected:
            raise
        handler.uncancel()
        raise ClientClosedRequest("the client disconnected before the answer was ready") from None
    finally:
        watcher.cancel()
