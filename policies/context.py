"""What policies see of a request."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.ledger.keys import KeyRecord


@dataclass(slots=True)
class RequestContext:
    """One request as the policy chain sees it; policies may fill in what they learn."""

    request_id: str
    client_ip: str
    route: str
    credential: str | None
    """The bearer token or `x-api-key` the client sent, if any."""
    model: str | None = None
    """The public model id the request resolved to."""
    key_id: str | None = None
    """Id of the authenticated key (never the key itself); "master" for the master key."""
    key: KeyRecord | None = None
    """The authenticated key's record (None for the master key or with auth off)."""
    token_estimate: int = 0
    """Tokens this request is expected to use, for token limits (0 until estimated)."""
    estimate_tokens: Callable[[], int] | None = None
    """Computes `token_estimate` on demand: tokenizing costs, so only limits that need it ask."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The request's headers (lower-case names), for policies that read one (plugins)."""
    extra: dict[str, Any] = field(default_factory=dict)


def credential_of(headers: dict[str, str] | Any) -> str | None:
    """The client's credential: `Authorization: Bearer …` or else `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    key = headers.get("x-api-key")
    return str(key) if key else None
