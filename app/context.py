"""What policies see of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    """Id of the authenticated key (never the key itself)."""
    token_estimate: int = 0
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
