"""GET /metrics: Prometheus' text format; the master key when `metrics.require_key`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency

from app.api.admin.guard import require_master
from app.core.gateway import Gateway
from app.errors import NotFound
from app.ledger.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


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
