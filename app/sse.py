"""The one SSE encoder: `data: {json}` events, a final `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec

from app.wire_errors import encode_error_event

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def event(item: Any) -> bytes:
    """One `data:` event holding `item` as JSON."""
    return b"data: " + _encode(item) + b"\n\n"


async def encode_stream(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """Encode a stream whose first item was already produced.

    A failure after the first byte becomes an error event, then `[DONE]`; the source
    iterator is always closed, so a client that disconnects stops its generation.
    """
    async with aclosing(rest):  # type: ignore[type-var]
        yield event(first)
        try:
            async for item in rest:
                yield event(item)
        except Exception as exc:
            yield b"data: " + encode_error_event(exc) + b"\n\n"
        yield DONE
