"""The master key, checked once for the whole admin API (`master_only`, the guard of its
router), and by the routes beside it that ask for it (`require_master`)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from app.api.middleware.pin import serving_gateway
from app.core.gateway import Gateway
from app.errors import AuthenticationFailed, PermissionDenied
from policies.context import credential_of


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


def master_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The guard of every /admin route."""
    require_master(connection.headers, serving_gateway(connection.app.state, connection.scope))
