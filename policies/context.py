"""What policies see of a request."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.ledger.keys import KeyRecord
    from app.ledger.ratelimit import Admission


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
    token_estimate: int | None = None
    """Tokens this request is expected to use, once estimated (`tokens()`); None: unknown."""
    estimate_tokens: Callable[[], int] | None = None
    """How `tokens()` estimates them: tokenizing costs, so only what needs the figure asks."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The request's headers (lower-case names), for policies that read one (plugins)."""
    admission: Admission | None = None
    """What the rate-limit policy admitted: its headers go out, its slots are released after."""
    extra: dict[str, Any] = field(default_factory=dict)
    """For plugins' own findings."""

    def tokens(self) -> int | None:
        """The request's token estimate, made on first use; None when it cannot be known."""
        if self.token_estimate is None and self.estimate_tokens is not None:
            self.token_estimate = self.estimate_tokens()
        return self.token_estimate


def credential_of(headers: dict[str, str] | Any) -> str | None:
    """The client's credential: `Authorization: Bearer …` or else `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    key = headers.get("x-api-key")
    return str(key) if key else None
