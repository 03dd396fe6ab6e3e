"""The one SSE encoder: `data: {json}` events and a final `data: [DONE]` (Chat Completions),
or named `event:` + `data:` events (the Responses and Messages APIs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import msgspec

from app.api.errors import encode_error_event

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


NamedEvent = tuple[str, Any]
"""An event's name (its `type`) and its JSON-encodable payload."""


def named_event(name: str, item: Any) -> bytes:
    """One `event: name` + `data:` event."""
    return b"event: " + name.encode() + b"\ndata: " + _encode(item) + b"\n\n"


async def encode_named_stream(
    first: NamedEvent,
    rest: AsyncIterator[NamedEvent],
    on_error: Callable[[Exception], NamedEvent],
) -> AsyncIterator[bytes]:
    """Encode a named-event stream whose first event was already produced.

    A failure after the first byte becomes the event `on_error` makes of it (these APIs have
    no `[DONE]`); the source is always closed, so a disconnect stops the generation.
    """
    async with aclosing(rest):  # type: ignore[type-var]
        yield named_event(*first)
        try:
            async for name, item in rest:
                yield named_event(name, item)
        except Exception as exc:
            yield named_event(*on_error(exc))
