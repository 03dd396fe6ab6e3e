"""The running gateway: config, served models, storage and the policy chain, built once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from limits.errors import ConfigurationError
from litestar import Request

from app.accounting import Exchange, exchange_of
from app.audit import AuditEntry, AuditWriter
from app.config import Config, ConfigError, ModelConfig
from app.context import RequestContext, credential_of
from app.edge import request_id_of
from app.errors import ModelNotFound
from app.keys import KeyCache, KeyStore, TokenSigner, token_secret
from app.monitor import HealthMonitor
from app.pools import build_pool
from app.ratelimit import Admission, Limits, RateLimiter
from app.router_state import RouterState
from app.routing import Pool
from app.storage.database import Database
from backends.base import Backend, BackendFactory, Capabilities, common_capabilities
from policies.api_key import ApiKeyPolicy
from policies.base import Policy
from policies.budget import BudgetPolicy
from policies.model_access import ModelAccessPolicy
from policies.rate_limit import RateLimitPolicy

log = logging.getLogger("clawbot.gateway")


@dataclass(slots=True)
class ServedModel:
    """A configured model and the pool of deployments serving it."""

    config: ModelConfig
    pool: Pool
    created: int
    capabilities: Capabilities = field(init=False)
    """What every deployment can do: requests are checked against this before routing, so
    whether one is accepted never depends on which deployment it would land on."""
    ready: bool = False

    def __post_init__(self) -> None:
        self.refresh_capabilities()

    def refresh_capabilities(self) -> None:
        """Recompute what every deployment can do (some learn it when their model loads)."""
        self.capabilities = common_capabilities(
            d.backend.capabilities for d in self.pool.deployments
        )

    @property
    def backends(self) -> list[Backend]:
        """Every deployment's backend."""
        return [d.backend for d in self.pool.deployments]


def _limits(
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    max_parallel: int | None,
    tokens_per_period: int | None = None,
    period: Any = None,
) -> Limits | None:
    limits = Limits(requests_per_minute, tokens_per_minute, max_parallel, tokens_per_period, period)
    return limits if limits != Limits() else None


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs; lives in the Litestar app's state."""

    config: Config
    models: tuple[ServedModel, ...]
    db: Database
    keys: KeyStore
    key_cache: KeyCache
    signer: TokenSigner
    limiter: RateLimiter
    audit: AuditWriter | None
    policies: tuple[Policy, ...] = ()
    names: dict[str, ServedModel] = field(default_factory=dict)
    monitor: HealthMonitor = field(init=False)
    router_state: RouterState | None = field(init=False, default=None)
    """Cooldowns and health shared with other replicas (Redis), if configured."""

    def __post_init__(self) -> None:
        for served in self.models:
            for name in (served.config.id, *served.config.aliases):
                self.names[name] = served
        pools = [(served.pool, served.config.routing) for served in self.models]
        router = self.config.router
        if not router.state.startswith("memory://"):
            self.router_state = RouterState(
                router.state,
                pools,
                sync_interval_s=router.sync_interval_s,
                key_prefix=router.key_prefix,
            )
        self.monitor = HealthMonitor(pools, self.router_state)

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        factories: dict[str, BackendFactory] | None = None,
        extra_policies: Sequence[Policy] = (),
    ) -> Gateway:
        """Build backends (no weights loaded yet), storage and policies; ConfigError if invalid."""
        timeout_s = config.model_server.timeout / 1000
        created = int(time.time())
        models = tuple(
            ServedModel(
                model,
                build_pool(model, index=i, default_timeout_s=timeout_s, factories=factories),
                created,
            )
            for i, model in enumerate(config.models)
        )
        db = Database(config.database.url)
        keys = KeyStore(db)
        gateway = cls(
            config=config,
            models=models,
            db=db,
            keys=keys,
            key_cache=KeyCache(keys, poll_interval_s=config.auth.key_cache_poll_s),
            signer=TokenSigner(
                token_secret(config.auth.api_key, config.auth.token_secret or None),
                config.auth.token_ttl,
            ),
            limiter=_limiter(config),
            audit=(
                AuditWriter(
                    db, max_queue=config.audit.max_queue, batch_size=config.audit.batch_size
                )
                if config.audit.enabled
                else None
            ),
        )
        policies: list[Policy] = []
        if config.auth.api_key:
            canonical = {name: served.config.id for name, served in gateway.names.items()}
            policies += [
                ApiKeyPolicy(config.auth.api_key, gateway.key_cache, gateway.signer),
                ModelAccessPolicy(canonical),
                BudgetPolicy(),
            ]
        policies.append(RateLimitPolicy(gateway.limiter, gateway.limits_for))
        policies.extend(extra_policies)
        gateway.policies = tuple(policies)
        return gateway

    async def start(self) -> None:
        """Migrate the database, load keys, start the writer and every backend."""
        await self.db.upgrade()
        await self.key_cache.start()
        await self.limiter.warm_up()
        if self.audit is not None:
            self.audit.start()
        for served in self.models:
            started = time.perf_counter()
            for deployment in served.pool.deployments:
                await deployment.backend.start()
            served.refresh_capabilities()
            served.ready = True
            log.info(
                "model %s ready (%s) in %.2fs",
                served.config.id,
                ", ".join(d.label for d in served.pool.deployments),
                time.perf_counter() - started,
            )
        self.monitor.start()
        if self.router_state is not None:
            self.router_state.start()

    async def aclose(self) -> None:
        """Flush the audit log, close backends, the limiter and the database."""
        await self.monitor.aclose()
        if self.router_state is not None:
            await self.router_state.aclose()
        if self.audit is not None:
            await self.audit.aclose()
        results = await asyncio.gather(
            *(backend.aclose() for served in self.models for backend in served.backends),
            self.key_cache.aclose(),
            self.limiter.aclose(),
            return_exceptions=True,
        )
        await self.db.aclose()
        for served in self.models:
            served.ready = False
        for result in results:
            if isinstance(result, BaseException):
                log.warning("closing failed: %r", result)

    def resolve(self, name: str) -> ServedModel:
        """The model with this id or alias, or 404 model_not_found."""
        served = self.names.get(name)
        if served is None:
            raise ModelNotFound(
                f"the model {name!r} does not exist; GET /v1/models lists the served models",
                param="model",
            )
        return served

    def limits_for(self, ctx: RequestContext) -> list[tuple[str, Limits]]:
        """The key's and the model's limits; estimates tokens only if a token limit applies."""
        subjects: list[tuple[str, Limits]] = []
        key = ctx.key
        if key is not None:
            limits = _limits(
                key.requests_per_minute,
                key.tokens_per_minute,
                key.max_parallel,
                key.budget_period_tokens,
                key.budget_period,
            )
            if limits is not None:
                subjects.append((f"key:{key.id}", limits))
        served = self.names.get(ctx.model) if ctx.model else None
        if served is not None:
            m = served.config.limits
            limits = _limits(m.requests_per_minute, m.tokens_per_minute, m.max_parallel)
            if limits is not None:
                subjects.append((f"model:{served.config.id}", limits))
        needs_tokens = any(
            limits.tokens_per_minute is not None or limits.tokens_per_period is not None
            for _, limits in subjects
        )
        if needs_tokens and ctx.estimate_tokens is not None:
            ctx.token_estimate = ctx.estimate_tokens()
        return subjects

    async def admit_model(
        self,
        request: Request[Any, Any, Any],
        model: str,
        estimate: Callable[[], int] | None = None,
    ) -> tuple[RequestContext, ServedModel]:
        """`admit` for a request naming a model; returns the resolved model too."""
        ctx, served = await self.admit(request, model, estimate)
        assert served is not None  # admit raised ModelNotFound otherwise
        return ctx, served

    async def admit(
        self,
        request: Request[Any, Any, Any],
        model: str | None = None,
        estimate: Callable[[], int] | None = None,
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
            estimate_tokens=estimate,
        )
        exchange = exchange_of(request.scope)
        if exchange is not None:
            exchange.ctx = ctx
        for policy in self.policies:
            await policy.check(ctx)
        admission = ctx.extra.get("rate_limit")
        if exchange is not None and isinstance(admission, Admission):
            exchange.response_headers.update(admission.headers())
            exchange.on_finish.append(_releaser(admission))
        if model is not None and served is None:
            self.resolve(model)
        return ctx, served

    async def finish(self, exchange: Exchange) -> None:
        """After the answer: settle rate limits with real usage, then queue the audit row."""
        for callback in exchange.on_finish:
            try:
                await callback(exchange)
            except Exception:
                log.exception("finishing request %s failed", exchange.request_id)
        if self.audit is None or not exchange.audited:
            return
        ctx = exchange.ctx
        bodies = self.config.audit.bodies
        self.audit.submit(
            AuditEntry(
                request_id=exchange.request_id,
                ts=datetime.now(UTC),
                key_id=ctx.key_id if ctx else None,
                client_ip=exchange.client_ip,
                route=exchange.route,
                model=ctx.model if ctx else None,
                backend=exchange.backend,
                status=exchange.status,
                error_type=exchange.error_type,
                latency_ms=round(exchange.latency_ms, 3),
                ttft_ms=None if exchange.ttft_ms is None else round(exchange.ttft_ms, 3),
                prompt_tokens=exchange.prompt_tokens,
                completion_tokens=exchange.completion_tokens,
                stream=exchange.stream,
                request_body=_text(exchange.request_body) if bodies else None,
                response_body=_text(exchange.response_body) if bodies else None,
            )
        )


def _limiter(config: Config) -> RateLimiter:
    settings = config.rate_limits
    try:
        return RateLimiter(
            settings.storage, on_storage_error=settings.on_storage_error, timeout=settings.timeout_s
        )
    except (ValueError, ConfigurationError) as exc:
        raise ConfigError(f"rate_limits.storage: {exc}") from exc


def _releaser(admission: Admission) -> Callable[[Exchange], Any]:
    async def release(exchange: Exchange) -> None:
        used = None
        if exchange.prompt_tokens is not None or exchange.completion_tokens is not None:
            used = (exchange.prompt_tokens or 0) + (exchange.completion_tokens or 0)
        await admission.release(used)

    return release


def _text(body: bytes | bytearray | None) -> str | None:
    return None if body is None else bytes(body).decode("utf-8", "replace")
