"""What a stream says about itself on the way through: its usage, its first generated token
and its failure, noted in the request's exchange (`observed`).

Every streaming route passes its backend's items through `observed` once, so the access line,
the audit row and the metrics read the same usage and time to first token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
from msgspec import Raw

from app.errors import failure_code
from app.ledger.exchange import Exchange
from app.protocol import UNSET, Usage


class _DeltaProbe(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None


class _ChoiceProbe(msgspec.Struct):
    delta: _DeltaProbe | None = None
    text: str | None = None


class _Probe(msgspec.Struct):
    choices: list[_ChoiceProbe] | None = None
    usage: Usage | None = None


_probe = msgspec.json.Decoder(_Probe).decode


def _has_token(choices: list[Any]) -> bool:
    """Whether a chunk's choices carry generated output: text, reasoning or a tool call."""
    for choice in choices:
        text = getattr(choice, "text", None)
        delta = getattr(choice, "delta", None)
        if text or (
            delta is not None
            and any(
                getattr(delta, name, None)
                for name in ("content", "reasoning_content", "reasoning", "refusal", "tool_calls")
            )
        ):
            return True
    return False


class _Seen(msgspec.Struct):
    usage: Usage | None
    usage_only: bool
    """The usage-only final chunk (no choices)."""
    token: bool
    """The chunk carries generated output."""


def _inspect(item: Any, want_token: bool) -> _Seen:
    """An item's usage and whether it carries a token (`want_token`: worth finding out)."""
    if isinstance(item, Raw):
        raw = bytes(item)
        has_usage = b'"usage"' in raw and b'"usage":null' not in raw and b'"usage": null' not in raw
        if not has_usage and not want_token:
            return _Seen(None, False, False)
        try:
            probe = _probe(raw)
        except msgspec.MsgspecError:
            return _Seen(None, False, False)
        choices = probe.choices or []
        usage_only = probe.usage is not None and probe.choices == []
        return _Seen(probe.usage, usage_only, want_token and _has_token(choices))
    usage = getattr(item, "usage", None)
    choices = getattr(item, "choices", None) or []
    token = want_token and _has_token(choices)
    if isinstance(usage, Usage):
        return _Seen(usage, not item.choices, token)
    return _Seen(None, False, token)


async def observed(
    source: AsyncIterator[Any], exchange: Exchange, *, strip_usage: bool
) -> AsyncIterator[Any]:
    """Pass a stream through, noting its usage, its first token and its failure in the
    exchange.

    With `strip_usage` the gateway asked the backend for usage the client did not ask for:
    the usage-only final chunk is dropped after it is noted.
    """
    async with aclosing(source):  # type: ignore[type-var]
        try:
            async for item in source:
                seen = _inspect(item, want_token=exchange.first_token_at is None)
                if seen.token:
                    exchange.first_token_at = time.perf_counter()
                if seen.usage is not None:
                    exchange.record_usage(seen.usage.prompt_tokens, seen.usage.completion_tokens)
                if strip_usage:
                    if seen.usage_only:
                        continue
                    if not isinstance(item, Raw) and getattr(item, "usage", UNSET) is None:
                        item.usage = UNSET
                yield item
        except Exception as exc:
            exchange.error_type = failure_code(exc)
            raise
