"""API keys: create, list, read, change, revoke and rotate them (/admin/keys, master key),
and POST /v1/auth/token, which trades a key for a short-lived bearer token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from msgspec import UNSET, Meta, UnsetType

from app.api.bodies import decode_body
from app.api.replies import json_response
from app.api.scope import arrival_of
from app.core.gateway import Gateway
from app.errors import InvalidRequest, NotFound
from app.ledger.keys import KeyRecord

PositiveInt = Annotated[int, Meta(ge=1)]


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
