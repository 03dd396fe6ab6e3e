"""POST /admin/reload: read clawbot.json again and apply it."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from app.api.replies import json_response
from app.config import ConfigError
from app.core.gateway import Gateway
from app.core.reload import Reloader
from app.errors import InvalidRequest


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
