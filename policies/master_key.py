"""Authentication by the master key (`auth.api_key`)."""

from __future__ import annotations

import hmac

from app.context import RequestContext
from app.errors import AuthenticationFailed


class MasterKeyPolicy:
    """Admit only requests carrying the master key, compared in constant time."""

    name = "master_key"

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def check(self, ctx: RequestContext) -> None:
        """Raise 401 unless the credential equals the master key."""
        if ctx.credential is None:
            raise AuthenticationFailed(
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        if not hmac.compare_digest(ctx.credential.encode(), self._key):
            raise AuthenticationFailed("invalid API key")
        ctx.key_id = "master"
