"""A client that goes away stops its generation (non-streamed and streamed), on a real server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.disconnect import unless_disconnected
from app.errors import ClientClosedRequest
from tests.serving import serve

LONG = {
    "model": "smol",
    "messages": [{"role": "user", "content": "Write a long essay about the history of ships."}],
    "max_tokens": 400,
    "temperature": 0,
}
SHORT = {**LONG, "max_tokens": 4}
CONFIG = {  # one slot: a request queues behind any generation still running
    "models": [
        {
            "id": "smol",
            "backend": "llamacpp:embedded",
            "context_length": 1024,
            "options": {"slots": 1},
        }
    ],
}


async def timed(client: httpx.AsyncClient, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_frees_the_model(tmp_path: Path, stream: bool) -> None:
    with serve(CONFIG, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=120) as client:
            await timed(client, SHORT)  # warm up
            full = await timed(client, LONG)
            assert full > 1.0, "the long request must take long enough to be cut"

            async with httpx.AsyncClient(base_url=server.root, timeout=120) as doomed:
                task = asyncio.create_task(
                    doomed.post("/v1/chat/completions", json={**LONG, "stream": stream})
                )
                await asyncio.sleep(0.3)
                task.cancel()  # closes the connection mid-generation
                with pytest.raises(asyncio.CancelledError):
                    await task
            # With the generation still running, this would queue behind the rest of it.
            after = await timed(client, SHORT)
            assert after < full / 2, (after, full)


# ---- unless_disconnected on its own


async def test_result_when_client_stays() -> None:
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await unless_disconnected(receive, work()) == 7  # type: ignore[arg-type]


async def test_disconnect_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def work() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with pytest.raises(ClientClosedRequest):
        await unless_disconnected(receive, work())  # type: ignore[arg-type]
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_other_cancellation_propagates() -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def handler() -> None:
        await unless_disconnected(receive, asyncio.sleep(30))  # type: ignore[arg-type]

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
