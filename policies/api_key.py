"""Authentication: the master key, a database API key, or a short-lived token."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from app.errors import AuthenticationFailed
from app.ledger.keys import TOKEN_PREFIX, KeyCache, TokenSigner
from policies.context import RequestContext


class ApiKeyPolicy:
    """Admit the master key, a usable API key, or a valid token of a usable key.

    Keys are found in the in-memory key cache (no database round-trip); a token names its
    key, and that key must still be usable, so revoking a key ends its tokens too.
    """

    name = "api_key"

    def __init__(self, master_key: str, keys: KeyCache, signer: TokenSigner) -> None:
        self._master = master_key.encode()
        self._keys = keys
        self._signer = signer

    async def check(self, ctx: RequestContext) -> None:
        """Raise 401 invalid_api_key unless the credential is good."""
        credential = ctx.credential
        if credential is None:
            raise AuthenticationFailed(
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        if self._master and hmac.compare_digest(credential.encode(), self._master):
            ctx.key_id = "master"
            return
        now = datetime.now(UTC)
        if credential.startswith(TOKEN_PREFIX):
            record = self._keys.by_id(self._signer.verify(credential, now))
        else:
            record = self._keys.lookup(credential)
        if record is None:
            raise AuthenticationFailed("invalid API key")
        reason = record.usable(now)
        if reason is not None:
            raise AuthenticationFailed(f"this API key is {reason}")
        ctx.key = record
        ctx.key_id = record.id
