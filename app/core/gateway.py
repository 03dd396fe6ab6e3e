"""The running gateway: config, served models, storage and the policy chain, built once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from limits.errors import ConfigurationError

from app.config import Config, ConfigError, ModelConfig, model_deployments
from app.core.knowledge import ModelCalls, embedding_model_of
from app.errors import ModelNotFound
from app.knowledge.base import KnowledgeBase
from app.ledger.audit import AuditEntry, AuditWriter
from app.ledger.exchange import Exchange, log_access
from app.ledger.keys import KeyCache, KeyStore, TokenSigner, token_secret
from app.ledger.metrics import Metrics
from app.ledger.ratelimit import Admission, Limits, RateLimiter
from app.ledger.storage.database import Database
from app.routing.build import build_pool
from app.routing.health import HealthMonitor
from app.routing.pool import Pool
from app.routing.shared import RouterState
from backends.base import (
    Backend,
    BackendFactory,
    BackendSpec,
    Capabilities,
    SelfDescribing,
    backend_scheme,
    common_capabilities,
)
from backends.memory import MemoryBudget
from policies.api_key import ApiKeyPolicy
from policies.base import Policy
from policies.budget import BudgetPolicy
from policies.context import RequestContext, credential_of
from policies.ip_allowlist import IpAllowlistPolicy
from policies.model_access import ModelAccessPolicy
from policies.plugins import load_plugin_policies
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

    @property
    def context_length(self) -> int | None:
        """The configured window, else the first a deployment reports (an in-process model
        knows its own once loaded); None when nobody says."""
        if self.config.context_length:
            return self.config.context_length
        for backend in self.backends:
            if isinstance(backend, SelfDescribing) and (length := backend.state().context_length):
                return length
        return None

    @property
    def loaded(self) -> bool | None:
        """Whether an in-process deployment has its weights in memory; None for remote pools."""
        states = [b.state().loaded for b in self.backends if isinstance(b, SelfDescribing)]
        known = [s for s in states if s is not None]
        return any(known) if known else None


def _limits(
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    max_parallel: int | None,
    tokens_per_period: int | None = None,
    period: Any = None,
) -> Limits | None:
    limits = Limits(requests_per_minute, tokens_per_minute, max_parallel, tokens_per_period, period)
    return limits if limits != Limits() else None


Disconnect = Callable[[], Awaitable[None]]
"""Returns once the client has gone away (the web layer builds it from the connection)."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request as the core sees it, built by the web layer (`app.api.scope.arrival_of`): the core
    never reads the ASGI scope itself."""

    request_id: str
    client_ip: str
    route: str
    headers: Mapping[str, str]
    """Lower-case names."""
    exchange: Exchange
    """The request's bookkeeping record, filled as it is served."""
    disconnected: Disconnect


@dataclass(frozen=True, slots=True)
class Call:
    """An admitted request: what the policies learned, the model it names, its exchange."""

    ctx: RequestContext
    served: ServedModel | None
    exchange: Exchange
    disconnected: Disconnect

    @property
    def model(self) -> ServedModel:
        """The served model (`Gateway.admit_model` guarantees one)."""
        assert self.served is not None, "admitted without a model"
        return self.served


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
    memory: MemoryBudget
    """RAM budget shared by the in-process models (carried over on reload)."""
    policies: tuple[Policy, ...] = ()
    names: dict[str, ServedModel] = field(default_factory=dict)
    carried: bool = False
    """Built on reload from a running gateway, whose database, key cache and limiter it shares
    (already started)."""
    in_flight: int = 0
    """HTTP requests being served by this gateway (counted by `app.core.reload.PinGateway`)."""
    monitor: HealthMonitor = field(init=False)
    router_state: RouterState | None = field(init=False, default=None)
    """Cooldowns and health shared with other replicas (Redis), if configured."""
    metrics: Metrics | None = field(init=False, default=None)
    """Prometheus metrics; set by `app.api.app.create_app` when `metrics.enabled`."""
    knowledge: KnowledgeBase | None = field(init=False, default=None)
    """Files, vector stores and search (`knowledge.enabled`); one per process, kept on reload."""
    model_calls: ModelCalls | None = field(init=False, default=None)
    """How the knowledge base reaches the models (pointed at the new ones on reload)."""

    def __post_init__(self) -> None:
        for served in self.models:
            for name in (served.config.id, *served.config.aliases):
                self.names[name] = served
        pools = [(s.pool, s.config.routing) for s in self.models if not s.config.base]
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
        previous: Gateway | None = None,
    ) -> Gateway:
        """Build backends (no weights loaded yet), storage and policies; ConfigError if invalid.

        With `previous` (a hot reload), its unchanged models keep their backends, and its
        database, key cache, limiter and (settings unchanged) audit writer carry over.
        """
        memory = previous.memory if previous else MemoryBudget(_budget_bytes(config))
        models = _served_models(config, factories, memory, previous)
        db = previous.db if previous else Database(config.database.url)
        keys = previous.keys if previous else KeyStore(db)
        gateway = cls(
            config=config,
            models=models,
            db=db,
            keys=keys,
            key_cache=(
                previous.key_cache
                if previous
                else KeyCache(keys, poll_interval_s=config.auth.key_cache_poll_s)
            ),
            signer=TokenSigner(
                token_secret(config.auth.api_key, config.auth.token_secret or None),
                config.auth.token_ttl,
            ),
            limiter=previous.limiter if previous else _limiter(config),
            audit=_audit_writer(config, db, previous),
            memory=memory,
            carried=previous is not None,
        )
        if config.knowledge.enabled:
            embedding_model_of(config)  # an unknown name is a config error, not a 404 later
            if previous is not None and previous.knowledge is not None:
                gateway.knowledge, gateway.model_calls = previous.knowledge, previous.model_calls
            else:
                calls = gateway.model_calls = ModelCalls(config, gateway.names)
                gateway.knowledge = KnowledgeBase(
                    db,
                    config.knowledge,
                    embed=calls.embed,
                    embedding_model=calls.embedding_model,
                    rerank_with=calls.rerank,
                )
        policies: list[Policy] = []
        if config.policies.ip_allowlist.api:  # before authentication: 403, never 401
            policies.append(IpAllowlistPolicy(config.policies.ip_allowlist.api))
        if config.auth.api_key:
            canonical = {name: served.config.id for name, served in gateway.names.items()}
            policies += [
                ApiKeyPolicy(config.auth.api_key, gateway.key_cache, gateway.signer),
                ModelAccessPolicy(canonical),
                BudgetPolicy(),
            ]
        # Plugins run before the rate limits: a request they refuse holds no slot, uses no quota.
        policies += load_plugin_policies(config)
        policies.append(RateLimitPolicy(gateway.limiter, gateway.limits_for))
        policies.extend(extra_policies)
        gateway.policies = tuple(policies)
        return gateway

    async def start(self) -> None:
        """Migrate the database, load keys, start the writer and every backend (on reload: only
        the new backends, and the carried parts take the new settings)."""
        if not self.carried:
            await self.db.upgrade()
            await self.key_cache.start()
            await self.limiter.warm_up()
        if self.audit is not None:
            self.audit.start()
        for served in self.models:
            if served.ready:  # kept from the running gateway
                continue
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
        for served in self.models:
            if served.config.base:  # learns what its base's backends learned on loading
                served.refresh_capabilities()
        if self.carried:
            self.key_cache.poll_interval_s = self.config.auth.key_cache_poll_s
            self.limiter.on_storage_error = self.config.rate_limits.on_storage_error
            self.limiter.timeout = self.config.rate_limits.timeout_s
        self.monitor.start()
        if self.router_state is not None:
            self.router_state.start()
        if self.model_calls is not None:
            self.model_calls.point_at(self.config, self.names)
        if self.knowledge is not None and not self.carried:
            self.knowledge.start()

    async def aclose(self) -> None:
        """Flush the audit log, close backends, the limiter and the database."""
        await self.monitor.aclose()
        if self.router_state is not None:
            await self.router_state.aclose()
        if self.audit is not None:
            await self.audit.aclose()
        if self.knowledge is not None:
            await self.knowledge.aclose()
        results = await asyncio.gather(
            *(backend.aclose() for backend in unique_backends(self.models)),
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

    async def close_replaced(self, successor: Gateway) -> None:
        """Close what this gateway holds and `successor` does not share: the old gateway's own
        parts once its requests are done, or a new one's after its start failed."""
        await self.monitor.aclose()
        if self.router_state is not None and self.router_state is not successor.router_state:
            await self.router_state.aclose()
        if self.audit is not None and self.audit is not successor.audit:
            await self.audit.aclose()
        kept_models = {id(served) for served in successor.models}
        kept = {id(backend) for served in successor.models for backend in served.backends}
        closing = [b for b in unique_backends(self.models) if id(b) not in kept]
        results = await asyncio.gather(
            *(backend.aclose() for backend in closing),
            *([] if self.key_cache is successor.key_cache else [self.key_cache.aclose()]),
            *([] if self.limiter is successor.limiter else [self.limiter.aclose()]),
            return_exceptions=True,
        )
        if self.db is not successor.db:
            await self.db.aclose()
        for served in self.models:
            if id(served) not in kept_models:
                served.ready = False
        for result in results:
            if isinstance(result, BaseException):
                log.warning("closing failed: %r", result)

    def ingestion_stats(self) -> dict[str, float] | None:
        """The knowledge base's ingestion counters, for /metrics (None without one)."""
        if self.knowledge is None:
            return None
        stats = self.knowledge.ingestor.stats
        return {
            "files_completed": stats.files_completed,
            "files_failed": stats.files_failed,
            "chunks_indexed": stats.chunks_indexed,
            "seconds": stats.seconds,
        }

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
        if needs_tokens:
            ctx.tokens()
        return subjects

    async def admit_model(
        self, arrival: Arrival, model: str, estimate: Callable[[], int] | None = None
    ) -> Call:
        """`admit` for a request naming a model: `Call.model` is the resolved one."""
        call = await self.admit(arrival, model, estimate)
        assert call.served is not None  # admit raised ModelNotFound otherwise
        return call

    async def admit(
        self, arrival: Arrival, model: str | None = None, estimate: Callable[[], int] | None = None
    ) -> Call:
        """Run the policy chain on a request; then an unknown model is a 404.

        The model is looked up first so policies see it, but reported missing only after
        authentication, so unauthenticated clients learn nothing about what is served.
        """
        served = self.names.get(model) if model is not None else None
        ctx = RequestContext(
            request_id=arrival.request_id,
            client_ip=arrival.client_ip,
            route=arrival.route,
            credential=credential_of(arrival.headers),
            headers=arrival.headers,
            model=served.config.id if served else model,
            estimate_tokens=estimate,
        )
        exchange = arrival.exchange
        exchange.ctx = ctx
        for policy in self.policies:
            await policy.check(ctx)
        if ctx.admission is not None:
            exchange.response_headers.update(ctx.admission.headers())
            exchange.on_finish.append(_releaser(ctx.admission))
        if model is not None and served is None:
            self.resolve(model)
        return Call(ctx=ctx, served=served, exchange=exchange, disconnected=arrival.disconnected)

    async def finish(self, exchange: Exchange) -> None:
        """After the answer: settle rate limits with real usage, write the access line, then
        queue the audit row."""
        await exchange.settle()  # a no-op when the answer's last byte already settled it
        if self.metrics is not None:
            self.metrics.observe(exchange)
        if self.config.logging.access_log:
            log_access(exchange)
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


def _budget_bytes(config: Config) -> int | None:
    budget = config.memory.budget_mb
    return None if budget is None else budget * 1024 * 1024


def _served_models(
    config: Config,
    factories: dict[str, BackendFactory] | None,
    memory: MemoryBudget,
    previous: Gateway | None,
) -> tuple[ServedModel, ...]:
    """Each configured model and its pool. On reload, a model whose backends' settings are
    unchanged keeps its (started) backends, and its whole pool, breakers included, when its
    routing and deployments are unchanged too; any other change builds new backends."""
    timeout_s = config.model_server.timeout / 1000
    created = int(time.time())
    running: dict[str, ServedModel] = {}
    if previous is not None and previous.config.model_server.timeout == config.model_server.timeout:
        running = {served.config.id: served for served in previous.models}
    models: list[ServedModel | None] = []
    for i, model in enumerate(config.models):
        old = running.get(model.id)
        if model.base:
            models.append(None)  # served by its base's pool, made below
        elif old is None or _backend_settings(old.config) != _backend_settings(model):
            pool = build_pool(
                model, index=i, default_timeout_s=timeout_s, factories=factories, memory=memory
            )
            models.append(ServedModel(model, pool, created))
        elif old.config == model:
            models.append(old)
        elif (old.config.routing, old.config.deployments) == (model.routing, model.deployments):
            models.append(ServedModel(model, old.pool, old.created, ready=old.ready))
        else:
            reuse = _handing_over(old.backends, model)
            pool = build_pool(
                model, index=i, default_timeout_s=timeout_s, factories=reuse, memory=memory
            )
            models.append(ServedModel(model, pool, old.created, ready=old.ready))
    by_name = {
        name: served
        for served in models
        if served is not None
        for name in (served.config.id, *served.config.aliases)
    }
    return tuple(
        served
        if served is not None
        else ServedModel(model, by_name[model.base].pool, created, ready=True)
        for model, served in zip(config.models, models, strict=True)
    )


def unique_backends(models: Sequence[ServedModel]) -> list[Backend]:
    """Every backend once (a model with a `base` shares its base's)."""
    seen: dict[int, Backend] = {}
    for served in models:
        for backend in served.backends:
            seen.setdefault(id(backend), backend)
    return list(seen.values())


def _backend_settings(model: ModelConfig) -> tuple[Any, ...]:
    """What a model's backends are built from; the rest of its config is read per request."""
    deployments = tuple(
        (d.backend, d.upstream_model, d.api_key, d.api_key_env, d.timeouts, d.options)
        for d in model_deployments(model)
    )
    return (model.options, model.context_length, deployments)


def _handing_over(backends: Sequence[Backend], model: ModelConfig) -> dict[str, BackendFactory]:
    """Factories that give `build_pool` these running backends, in deployment order."""
    queue = iter(backends)

    def take(spec: BackendSpec) -> Backend:
        return next(queue)

    return {backend_scheme(d.backend): take for d in model_deployments(model)}


def _audit_writer(config: Config, db: Database, previous: Gateway | None) -> AuditWriter | None:
    """The audit writer; a reload keeps the running one unless its settings changed."""
    settings = config.audit
    if not settings.enabled:
        return None
    if previous is not None and previous.audit is not None:
        running = previous.config.audit
        if (running.max_queue, running.batch_size) == (settings.max_queue, settings.batch_size):
            return previous.audit
    return AuditWriter(db, max_queue=settings.max_queue, batch_size=settings.batch_size)


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
