"""GET /health (liveness) and GET /ready (every model loaded)."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from app.api.replies import json_response
from app.core.gateway import Gateway
from app.errors import ServiceUnavailable


@get("/health")
async def health() -> Response[bytes]:
    """The process answers."""
    return json_response({"status": "ok"})


@get("/ready")
async def ready(gateway: NamedDependency[Gateway]) -> Response[bytes]:
    """200 once every model is loaded, else 503 naming those that are not."""
    missing = [m.config.id for m in gateway.models if not m.ready]
    if missing:
        raise ServiceUnavailable(f"models not loaded yet: {', '.join(missing)}", retry_after=1)
    return json_response({"status": "ready", "models": [m.config.id for m in gateway.models]})
