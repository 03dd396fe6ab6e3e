"""OpenAI's list pagination: `limit`, `order`, and `after` / `before` cursors naming an id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidRequest

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, and whether more follow."""

    items: list[T]
    has_more: bool


def check_paging(limit: int, order: str) -> None:
    """`limit` from 1 to 100 (10000 for files), `order` asc or desc."""
    if not 1 <= limit <= 10000:
        raise InvalidRequest("limit must be from 1 to 100", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc', not {order!r}", param="order")


async def page_of(
    session: AsyncSession,
    query: Select[Any],
    model: Any,
    *,
    limit: int,
    order: str,
    after: str | None,
    before: str | None,
    id_column: Any = None,
) -> Page[Any]:
    """Rows of `query` ordered by (created_at, id), after/before a cursor row."""
    check_paging(limit, order)
    ident = id_column if id_column is not None else model.id
    created = model.created_at
    descending = order == "desc"
    for cursor, forward in ((after, True), (before, False)):
        if not cursor:
            continue
        at = await session.scalar(select(created).where(ident == cursor))
        if at is None:
            raise InvalidRequest(
                f"{'after' if forward else 'before'}: no object with id {cursor!r}",
                param="after" if forward else "before",
            )
        later = forward != descending  # asc+after and desc+before: rows that come later
        if later:
            query = query.where(or_(created > at, and_(created == at, ident > cursor)))
        else:
            query = query.where(or_(created < at, and_(created == at, ident < cursor)))
    ordering = (created.desc(), ident.desc()) if descending else (created.asc(), ident.asc())
    rows = list((await session.scalars(query.order_by(*ordering).limit(limit + 1))).all())
    return Page(items=rows[:limit], has_more=len(rows) > limit)
