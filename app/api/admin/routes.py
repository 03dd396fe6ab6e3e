"""The admin API under /admin (one router, the master key only: `master_only`): keys, usage,
errors, backends, reload; and GET /metrics and POST /v1/auth/token beside it."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, Router, get, patch, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath
from msgspec import UNSET, Meta, UnsetType

from app.api.bodies import decode_body
from app.api.middleware.pin import serving_gateway
from app.api.replies import json_response
from app.api.scope import arrival_of
from app.config import ConfigError
from app.core.gateway import Gateway
from app.core.reload import Reloader
from app.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from app.ledger.audit import recent_errors, usage_series, usage_summary
from app.ledger.keys import KeyRecord
from app.ledger.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from policies.context import credential_of

PositiveInt = Annotated[int, Meta(ge=1)]
_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SERIES_BUCKETS = 1000
"""The most buckets one `/admin/usage/series` answer may hold."""
MAX_ERRORS = 1000
"""The most rows one `/admin/errors` answer may hold."""


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /admin/keys."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    owner: str | None = None
    metadata: dict[str, Any] | None = None
    models: list[str] | None = None
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_parallel: PositiveInt | None = None
    budget_total_tokens: PositiveInt | None = None
    budget_period_tokens: PositiveInt | None = None
    budget_period: str | None = None
    expires_at: datetime | None = None
    expires_in_s: PositiveInt | None = None
    """Alternative to `expires_at`: seconds from now."""


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PATCH /admin/keys/{id}: only the fields given change; null clears a limit."""

    name: str | UnsetType = UNSET
    owner: str | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET
    requests_per_minute: int | UnsetType | None = UNSET
    tokens_per_minute: int | UnsetType | None = UNSET
    max_parallel: int | UnsetType | None = UNSET
    budget_total_tokens: int | UnsetType | None = UNSET
    budget_period_tokens: int | UnsetType | None = UNSET
    budget_period: str | UnsetType | None = UNSET
    expires_at: datetime | UnsetType | None = UNSET


class Rotate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /admin/keys/{id}/rotate."""

    grace_seconds: Annotated[int, Meta(ge=0)] = 3600
    """How long the old key keeps working."""


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


def require_master(headers: Mapping[str, str], gateway: Gateway) -> None:
    """Only the master key may use the admin API."""
    master = gateway.config.auth.api_key
    if not master:
        raise PermissionDenied("the admin API is off: set auth.api_key to use it")
    credential = credential_of(headers)
    if credential is None:
        raise AuthenticationFailed("missing master key")
    if not hmac.compare_digest(credential.encode(), master.encode()):
        if gateway.key_cache.lookup(credential) is not None:
            raise PermissionDenied("the admin API needs the master key, not an API key")
        raise AuthenticationFailed("invalid master key")


def _with_key(record: KeyRecord, plaintext: str) -> dict[str, Any]:
    return {**record.public(), "key": plaintext}


async def _record(gateway: Gateway, key_id: str) -> KeyRecord:
    record = await gateway.keys.get(key_id)
    if record is None:
        raise NotFound(f"no API key with id {key_id!r}", param="key_id")
    return record


@post("/keys", status_code=201)
async def create_key(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Create a key; its plaintext is in this response only."""
    body = decode_body(await request.body(), KeyCreate)
    fields = msgspec.structs.asdict(body)
    expires_in = fields.pop("expires_in_s")
    if expires_in is not None:
        fields["expires_at"] = datetime.now(UTC) + timedelta(seconds=expires_in)
    record, plaintext = await gateway.keys.create(**fields)
    gateway.key_cache.apply(record, plaintext)
    return json_response(_with_key(record, plaintext), status_code=201)


@get("/keys")
async def list_keys(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Every key (no plaintexts, no hashes); `?include_revoked=false` hides revoked ones."""
    include = request.query_params.get("include_revoked", "true").lower() != "false"
    records = await gateway.keys.list(include_revoked=include)
    return json_response({"object": "list", "data": [r.public() for r in records]})


@get("/keys/{key_id:str}")
async def get_key(gateway: NamedDependency[Gateway], key_id: FromPath[str]) -> Response[bytes]:
    """One key."""
    return json_response((await _record(gateway, key_id)).public())


@patch("/keys/{key_id:str}")
async def update_key(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], key_id: FromPath[str]
) -> Response[bytes]:
    """Change a key's name, models, limits, budget or expiry."""
    body = decode_body(await request.body(), KeyUpdate)
    changes = {
        name: getattr(body, name)
        for name in body.__struct_fields__
        if getattr(body, name) is not UNSET
    }
    record = await gateway.keys.update(key_id, **changes)
    gateway.key_cache.apply(record)
    return json_response(record.public())


@post("/keys/{key_id:str}/revoke", status_code=200)
async def revoke_key(gateway: NamedDependency[Gateway], key_id: FromPath[str]) -> Response[bytes]:
    """Revoke a key now; its tokens stop working too."""
    record = await gateway.keys.revoke(key_id)
    gateway.key_cache.apply(record)
    return json_response(record.public())


@post("/keys/{key_id:str}/rotate", status_code=201)
async def rotate_key(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], key_id: FromPath[str]
) -> Response[bytes]:
    """A new key with the same settings; the old one works for `grace_seconds` more."""
    raw = await request.body()
    body = decode_body(raw, Rotate) if raw.strip() else Rotate()
    record, plaintext = await gateway.keys.rotate(key_id, body.grace_seconds)
    gateway.key_cache.apply(record, plaintext)
    previous = await _record(gateway, key_id)
    gateway.key_cache.apply(previous)
    return json_response({**_with_key(record, plaintext), "previous": previous.public()}, 201)


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


@post("/v1/auth/token", status_code=200)
async def issue_token(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Exchange an API key for a bearer token that expires after `auth.token_ttl` seconds."""
    ctx = (await gateway.admit(arrival_of(request))).ctx
    if ctx.key is None:
        raise InvalidRequest(
            "only an API key can be exchanged for a token; create one with POST /admin/keys"
        )
    now = datetime.now(UTC)
    token, expires_at = gateway.signer.issue(ctx.key, now)
    return json_response(
        {
            "object": "auth.token",
            "token": token,
            "token_type": "bearer",
            "expires_at": expires_at,
            "expires_in": max(0, expires_at - int(now.timestamp())),
        }
    )


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Prometheus text format; 404 when `metrics.enabled` is false; the master key when
    `metrics.require_key`."""
    metrics = gateway.metrics
    if metrics is None:
        raise NotFound("metrics are off: set metrics.enabled to serve /metrics")
    if gateway.config.metrics.require_key:
        require_master(request.headers, gateway)
    return Response(content=metrics.render(), media_type=METRICS_CONTENT_TYPE)


@post("/reload", status_code=200)
async def reload_config(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Read clawbot.json again and apply it; the answer says what changed (400: what is wrong)."""
    reloader: Reloader = request.app.state.reloader
    try:
        report = await reloader.reload("POST /admin/reload")
    except ConfigError as exc:
        raise InvalidRequest(
            f"config not reloaded, the previous one keeps serving: {exc}", code="invalid_config"
        ) from exc
    return json_response(report)


def master_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The guard of every /admin route."""
    require_master(connection.headers, serving_gateway(connection.app.state, connection.scope))


router = Router(
    "/admin",
    guards=[master_only],
    route_handlers=[
        create_key,
        list_keys,
        get_key,
        update_key,
        revoke_key,
        rotate_key,
        usage,
        usage_by_bucket,
        list_errors,
        backends,
        reload_config,
    ],
)
"""The admin API: the master key only (`master_only`), checked once for all its routes."""
