"""What the Files and Vector Stores routes share: admission, the principal, timestamps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Request

from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.errors import InvalidRequest, NotFound
from app.knowledge.base import KnowledgeBase
from app.knowledge.records import Principal


async def admitted(
    request: Request[Any, Any, Any], gateway: Gateway
) -> tuple[KnowledgeBase, Principal]:
    """Run the policy chain (key, IP, rate limits); the knowledge base and who calls."""
    call = await gateway.admit(arrival_of(request))
    if gateway.knowledge is None:
        raise NotFound("the knowledge base is turned off on this server (knowledge.enabled)")
    return gateway.knowledge, Principal.of(call.ctx.key_id)


def unix(at: datetime | None) -> int | None:
    """Seconds since the epoch (naive datetimes, as SQLite returns them, are UTC)."""
    if at is None:
        return None
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def page_args(request: Request[Any, Any, Any], *, default_limit: int = 20) -> dict[str, Any]:
    """`limit`, `order`, `after` and `before` from the query string (400 on a bad limit)."""
    query = request.query_params
    raw = query.get("limit")
    try:
        limit = int(raw) if raw is not None else default_limit
    except ValueError:
        raise InvalidRequest(f"limit must be an integer, not {raw!r}", param="limit") from None
    return {
        "limit": limit,
        "order": query.get("order") or "desc",
        "after": query.get("after") or None,
        "before": query.get("before") or None,
    }
