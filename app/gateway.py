"""The running gateway: config, served models and the policy chain, built once from config."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from litestar import Request

from app.config import Config, ModelConfig
from app.context import RequestContext, credential_of
from app.edge import request_id_of
from app.errors import ModelNotFound
from app.storage.database import Database
from backends.base import Backend, BackendFactory, build_backend
from policies.base import Policy
from policies.master_key import MasterKeyPolicy

log = logging.getLogger("clawbot.gateway")


@dataclass(slots=True)
class ServedModel:
    """A configured model and the backend serving it."""

    config: ModelConfig
    backend: Backend
    created: int
    ready: bool = False


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs; lives in the Litestar app's state."""

    config: Config
    models: tuple[ServedModel, ...]
    policies: tuple[Policy, ...]
    db: Database
    names: dict[str, ServedModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for served in self.models:
            for name in (served.config.id, *served.config.aliases):
                self.names[name] = served

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        factories: dict[str, BackendFactory] | None = None,
        extra_policies: Sequence[Policy] = (),
    ) -> Gateway:
        """Build backends (no weights loaded yet) and the policy chain; ConfigError if invalid."""
        timeout_s = config.model_server.timeout / 1000
        created = int(time.time())
        models = tuple(
            ServedModel(
                model,
                build_backend(model, timeout_s=timeout_s, index=i, factories=factories),
                created,
            )
            for i, model in enumerate(config.models)
        )
        policies: list[Policy] = []
        if config.auth.api_key:
            policies.append(MasterKeyPolicy(config.auth.api_key))
        policies.extend(extra_policies)
        db = Database(config.database.url)
        return cls(config=config, models=models, policies=tuple(policies), db=db)

    async def start(self) -> None:
        """Migrate the database, then start every backend; any failure stops start-up."""
        await self.db.upgrade()
        for served in self.models:
            started = time.perf_counter()
            await served.backend.start()
            served.ready = True
            log.info(
                "model %s ready (%s) in %.2fs",
                served.config.id,
                served.config.backend,
                time.perf_counter() - started,
            )

    async def aclose(self) -> None:
        """Close every backend, even when some fail to close."""
        results = await asyncio.gather(
            *(served.backend.aclose() for served in self.models), return_exceptions=True
        )
        await self.db.aclose()
        for served, result in zip(self.models, results, strict=True):
            served.ready = False
            if isinstance(result, BaseException):
                log.warning("closing %s failed: %r", served.config.id, result)

    def resolve(self, name: str) -> ServedModel:
        """The model with this id or alias, or 404 model_not_found."""
        served = self.names.get(name)
        if served is None:
            raise ModelNotFound(
                f"the model {name!r} does not exist; GET /v1/models lists the served models",
                param="model",
            )
        return served

    async def admit_model(
        self, request: Request[Any, Any, Any], model: str
    ) -> tuple[RequestContext, ServedModel]:
        """`admit` for a request naming a model; returns the resolved model too."""
        ctx, served = await self.admit(request, model)
        assert served is not None  # admit raised ModelNotFound otherwise
        return ctx, served

    async def admit(
        self, request: Request[Any, Any, Any], model: str | None = None
    ) -> tuple[RequestContext, ServedModel | None]:
        """Run the policy chain on a request; then an unknown model is a 404.

        The model is looked up first so policies see it, but reported missing only after
        authentication, so unauthenticated clients learn nothing about what is served.
        """
        client = request.client
        served = self.names.get(model) if model is not None else None
        ctx = RequestContext(
            request_id=request_id_of(request.scope),
            client_ip=client.host if client else "",
            route=request.scope["path"],
            credential=credential_of(request.headers),
            model=served.config.id if served else model,
        )
        for policy in self.policies:
            await policy.check(ctx)
        if model is not None and served is None:
            self.resolve(model)
        return ctx, served
