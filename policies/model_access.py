"""Model permission: a key may be limited to some models (ids or aliases)."""

from __future__ import annotations

from collections.abc import Mapping

from app.errors import PermissionDenied
from policies.context import RequestContext


class ModelAccessPolicy:
    """Refuse a model outside the key's list with 403 model_not_allowed."""

    name = "model_access"

    def __init__(self, canonical: Mapping[str, str]) -> None:
        self._canonical = canonical
        """Every served id and alias, mapped to its model's id."""

    async def check(self, ctx: RequestContext) -> None:
        """Pass for the master key, keys without a list, and requests naming no model."""
        key = ctx.key
        if key is None or key.models is None or ctx.model is None:
            return
        if ctx.model not in self._canonical:
            return  # unknown model: the route answers 404 after the policies
        allowed = {self._canonical.get(name, name) for name in key.models}
        if self._canonical[ctx.model] not in allowed:
            raise PermissionDenied(
                f"this API key may not use the model {ctx.model!r}",
                param="model",
                code="model_not_allowed",
            )
