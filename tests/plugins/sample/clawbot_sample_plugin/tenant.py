"""A policy plugin: every API key must name its tenant in its metadata."""

from __future__ import annotations

from typing import Any

import msgspec

from app.config import Config, ConfigError
from app.errors import PermissionDenied
from policies.context import RequestContext


class TenantOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`policies.plugin_options.sample_tenant`."""

    tenants: tuple[str, ...] = ()
    """Tenants served here; empty serves every tenant."""


class TenantPolicy:
    """Refuse keys without `metadata.tenant` (403 tenant_required) or with a tenant not served."""

    name = "sample_tenant"

    def __init__(self, options: dict[str, Any], config: Config) -> None:
        if not config.auth.api_key:
            raise ConfigError("sample_tenant needs auth.api_key: tenants come from API keys")
        try:
            self.options = msgspec.convert(options, type=TenantOptions)
        except msgspec.ValidationError as exc:
            raise ConfigError(str(exc)) from exc

    async def check(self, ctx: RequestContext) -> None:
        """Pass the master key; a key's tenant goes to `ctx.extra["tenant"]`."""
        if ctx.key is None:
            return
        tenant = (ctx.key.metadata or {}).get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise PermissionDenied(
                "this API key names no tenant: set metadata.tenant on it",
                code="tenant_required",
            )
        if self.options.tenants and tenant not in self.options.tenants:
            raise PermissionDenied(
                f"the tenant {tenant!r} is not served here", code="tenant_not_allowed"
            )
        ctx.extra["tenant"] = tenant
