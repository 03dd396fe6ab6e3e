"""The admin API (keys, usage, errors, backends, reload: one router under /admin, the master
key only) and its dashboard; GET /metrics and POST /v1/auth/token sit beside it."""

from __future__ import annotations

from litestar import Router

from app.api.admin import keys, reload, usage
from app.api.admin.guard import master_only

router = Router(
    "/admin",
    guards=[master_only],
    route_handlers=[
        keys.create_key,
        keys.list_keys,
        keys.get_key,
        keys.update_key,
        keys.revoke_key,
        keys.rotate_key,
        usage.usage,
        usage.usage_by_bucket,
        usage.list_errors,
        usage.backends,
        reload.reload_config,
    ],
)
"""The admin API: the master key only (`master_only`), checked once for all its routes."""
