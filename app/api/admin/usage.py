"""What the audit log says: token usage by key and model, and over time; recent errors; and
every deployment's health and load (/admin/usage, /admin/usage/series, /admin/errors,
/admin/backends)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency

from app.api.replies import json_response
from app.core.gateway import Gateway
from app.errors import InvalidRequest
from app.ledger.audit import recent_errors, usage_series, usage_summary

_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)$")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


MAX_SERIES_BUCKETS = 1000
"""The most buckets one `/admin/usage/series` answer may hold."""


MAX_ERRORS = 1000
"""The most rows one `/admin/errors` answer may hold."""


def parse_duration(text: str) -> timedelta | None:
    """`24h`, `30m`, `7d`, `90s` as a timedelta; None when `text` is not a duration."""
    match = _DURATION.match(text.strip())
    if match is None:
        return None
    return timedelta(seconds=float(match["n"]) * _UNITS[match["unit"]])


def parse_time(text: str, now: datetime, param: str = "since") -> datetime:
    """A duration before `now` (`24h`, `7d`), or an ISO 8601 time (UTC when naive)."""
    ago = parse_duration(text)
    if ago is not None:
        return now - ago
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidRequest(
            f"{text!r} is neither a duration like 24h nor an ISO 8601 time", param=param
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _group_by(text: str) -> list[Literal["key_id", "model"]]:
    groups = [g for g in text.split(",") if g]
    if not set(groups) <= {"key_id", "model"}:
        raise InvalidRequest("group_by takes key_id, model or both", param="group_by")
    return groups  # type: ignore[return-value]


@get("/usage")
async def usage(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Requests and tokens per key and model over a period (`since`, `until`, `group_by`)."""
    now = datetime.now(UTC)
    query = request.query_params
    since = parse_time(query.get("since", "24h"), now)
    until = parse_time(query["until"], now, "until") if "until" in query else now
    groups = _group_by(query.get("group_by", "key_id,model"))
    rows = await usage_summary(gateway.db, since=since, until=until, group_by=groups)
    return json_response(
        {
            "object": "list",
            "since": since.isoformat(),
            "until": until.isoformat(),
            "data": [msgspec.to_builtins(r) for r in rows],
        }
    )


@get("/usage/series")
async def usage_by_bucket(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """API requests and tokens per key and model per time bucket (`since`, `until`, `bucket`,
    `group_by`); `since` moves back to the start of its bucket, so every bucket is whole."""
    now = datetime.now(UTC)
    query = request.query_params
    bucket = parse_duration(query.get("bucket", "1h"))
    seconds = 0.0 if bucket is None else bucket.total_seconds()
    if bucket is None or seconds < 1 or not seconds.is_integer():
        raise InvalidRequest(
            "bucket is a whole number of seconds or more, like 90s, 5m, 1h or 1d", param="bucket"
        )
    since = parse_time(query.get("since", "24h"), now)
    until = parse_time(query["until"], now, "until") if "until" in query else now
    since = datetime.fromtimestamp(since.timestamp() // seconds * seconds, UTC)
    if since >= until:
        raise InvalidRequest("since must be before until", param="since")
    if (until - since) / bucket > MAX_SERIES_BUCKETS:
        raise InvalidRequest(
            f"more than {MAX_SERIES_BUCKETS} buckets of {query.get('bucket', '1h')} from since "
            "to until: choose a larger bucket or a shorter period",
            param="bucket",
        )
    groups = _group_by(query.get("group_by", "key_id,model"))
    points = await usage_series(
        gateway.db, since=since, until=until, bucket=bucket, group_by=groups
    )
    return json_response(
        {
            "object": "list",
            "since": since.isoformat(),
            "until": until.isoformat(),
            "bucket_s": int(seconds),
            "data": points,
        }
    )


@get("/errors")
async def list_errors(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """The latest requests answered with status >= 400, newest first (`limit`, default 50)."""
    text = request.query_params.get("limit", "50")
    limit = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= limit <= MAX_ERRORS:
        raise InvalidRequest(
            f"limit is a whole number from 1 to {MAX_ERRORS}, not {text!r}", param="limit"
        )
    rows = await recent_errors(gateway.db, limit=limit)
    return json_response({"object": "list", "data": rows})


@get("/backends")
async def backends(gateway: NamedDependency[Gateway]) -> Response[bytes]:
    """Every model's pool: each deployment's health, load, failures and cooldown."""
    data = []
    for served in gateway.models:
        routing = served.config.routing
        data.append(
            {
                "model": served.config.id,
                "strategy": routing.strategy,
                "retries": routing.retries,
                "health_check_interval_s": routing.health_check_interval_s,
                "fallbacks": list(served.config.fallbacks),
                "context_window_fallbacks": list(served.config.context_window_fallbacks),
                "deployments": served.pool.snapshot(),
            }
        )
    return json_response({"object": "list", "data": data})
