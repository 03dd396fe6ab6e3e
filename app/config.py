"""clawbot.json, parsed once into frozen Structs; errors name the bad key and value."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta, Struct

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ConfigError(Exception):
    """clawbot.json (or an override) is invalid; the message names the key and value."""


class ModelServer(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where and how the gateway listens."""

    host: str = "127.0.0.1"
    """Address to bind; a non-loopback address requires `auth.api_key`."""
    port: Port = 8080
    """TCP port to bind; 0 picks a free one."""
    protocol: Literal["http", "https"] = "http"
    """`https` serves TLS directly with `tls_cert` / `tls_key`."""
    timeout: PositiveInt = 600_000
    """Default total time for one backend call, in milliseconds."""
    tls_cert: str = ""
    """PEM certificate chain, for protocol https."""
    tls_key: str = ""
    """PEM private key, for protocol https."""
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    """Request bodies above this are refused with 413."""
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version a client may use (protocol https)."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDRs of reverse proxies whose `X-Forwarded-For` names the real client."""
    workers: PositiveInt = 1
    """Worker processes sharing the listening socket; above 1 needs shared storage (Redis
    rate limits and router state, a database every worker reaches)."""


class Auth(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Credentials; `CLAWBOT_API_KEY` in the environment overrides `api_key`."""

    api_key: str = ""
    """Master key, accepted as `Authorization: Bearer` or `x-api-key`; empty disables auth."""
    token_ttl: PositiveInt = 3600
    """Lifetime of short-lived tokens, in seconds."""
    token_secret: str = ""
    """Signs short-lived tokens; empty derives it from `api_key`. Env: `CLAWBOT_TOKEN_SECRET`."""
    key_cache_poll_s: Annotated[float, Meta(gt=0)] = 5.0
    """How often the key cache reads changes made by other replicas (their bounded staleness)."""


class Logging(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Log level, destination, format and rotation."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Minimum level written."""
    path: str = ""
    """Log file (relative: next to clawbot.json); empty logs to stderr."""
    format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line; `text`: for humans."""
    max_bytes: Annotated[int, Meta(ge=0)] = 50 * 1024 * 1024
    """A log file is rotated at this size (0: never)."""
    backup_count: Annotated[int, Meta(ge=0)] = 5
    """Rotated files kept."""
    access_log: bool = True
    """One line per request (method, path, status, latency, model, key id, request id)."""


class DatabaseSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where keys and the audit log live."""

    url: str = "sqlite+aiosqlite:///clawbot.db"
    """SQLAlchemy URL: `sqlite+aiosqlite:///path.db` (relative to clawbot.json's folder) or
    `postgresql+asyncpg://user@host/db`. The schema is migrated at start-up."""


class LimitSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Request, token and concurrency limits (per key ones live on the keys)."""

    requests_per_minute: PositiveInt | None = None
    """Limit for this model across all keys."""
    tokens_per_minute: PositiveInt | None = None
    """Token limit for this model across all keys."""
    max_parallel: PositiveInt | None = None
    """Concurrent requests to this model across all keys."""


class RateLimiting(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where rate-limit counters live and what happens when that store is down."""

    storage: str = "memory://"
    """A `limits` storage URI: `memory://` (one process) or `redis://host:6379/0` (replicas)."""
    on_storage_error: Literal["open", "closed"] = "open"
    """`open` admits (and counts the failure); `closed` answers 503."""
    timeout_s: Annotated[float, Meta(gt=0)] = 0.25
    """Longest a request waits on the storage before `on_storage_error` applies."""


class AuditSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The audit log: one row per API request, written in batches off the request path."""

    enabled: bool = True
    """Write audit rows."""
    bodies: bool = False
    """Also store request and response bodies (off: never stored)."""
    max_queue: PositiveInt = 10_000
    """Rows waiting for the writer; beyond it rows are dropped, counted and logged."""
    batch_size: PositiveInt = 500
    """Rows per insert."""


class RouterSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Routing state shared by replicas: cooldowns and failed health checks."""

    state: str = "memory://"
    """`memory://` (each process on its own) or `redis://host:6379/0`: a cooldown or failed
    health check seen by one replica takes the deployment out on every replica."""
    sync_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    """How often a replica reads what the others reported (their bounded staleness)."""
    key_prefix: str = "clawbot:router:"
    """Prefix of the Redis keys (separate clusters sharing a Redis use different ones)."""


class IpAllowlist(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Client addresses allowed in; an empty list allows every address."""

    api: tuple[str, ...] = ()
    """Addresses or CIDRs (IPv4 and IPv6) allowed to call the API (everything but /admin)."""
    admin: tuple[str, ...] = ()
    """Addresses or CIDRs allowed to call /admin (and /metrics)."""


class PolicySettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Built-in policies' settings and plugin policies to enable."""

    ip_allowlist: IpAllowlist = IpAllowlist()
    """Checked before authentication."""
    plugins: tuple[str, ...] = ()
    """Names of policies registered under the `clawbot.policies` entry point, run in order
    after the built-in ones."""
    plugin_options: dict[str, dict[str, Any]] = {}
    """Options per plugin name, passed to its factory."""


class MetricsSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Prometheus metrics at `GET /metrics`."""

    enabled: bool = True
    """Serve /metrics."""
    require_key: bool = False
    """Ask for the master key (scrapers usually rely on the admin IP allowlist instead)."""


class ReloadSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Hot reload of clawbot.json (SIGHUP always reloads)."""

    watch: bool = True
    """Reload when the file changes."""
    poll_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    """How often the file's modification time is checked."""


class MemorySettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """RAM for in-process models (per process)."""

    budget_mb: PositiveInt | None = None
    """Estimated RAM the loaded in-process models may use together: models then load on their
    first request and the least recently used idle one is unloaded to make room. Unset: no
    limit, every model loads at start."""


class KnowledgeSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Files, vector stores and their ingestion (the `/v1/files` and `/v1/vector_stores` APIs)."""

    enabled: bool = True
    """Serve the Files and Vector Stores APIs."""
    blobs: str = ""
    """Where file bytes live: `file:///dir` (a directory; relative to clawbot.json's folder) or
    `database:` (rows of the database, which every replica already reaches). Unset: a
    `clawbot-files` directory beside a SQLite database, the database itself otherwise."""
    embedding_model: str = ""
    """Model (id or alias) that embeds chunks and queries of new vector stores; it must serve
    embeddings. Unset: the first configured model that does."""
    max_file_mb: PositiveInt = 64
    """Largest upload; bigger ones are refused with 413."""
    quota_mb_per_key: PositiveInt | None = 1024
    """Bytes of files one API key may keep (the master key has no quota); unset: unlimited."""
    workers: Annotated[int, Meta(ge=1, le=32)] = 2
    """Files ingested at the same time by this process."""
    embed_batch: Annotated[int, Meta(ge=1, le=2048)] = 64
    """Chunks embedded per call to the embedding model."""
    chunk_size_tokens: Annotated[int, Meta(ge=100, le=4096)] = 256
    """Chunk size of the `auto` chunking strategy (cl100k tokens). Smaller than OpenAI's 800:
    the embedded embedding model reads 256 word pieces at most."""
    chunk_overlap_tokens: Annotated[int, Meta(ge=0, le=2048)] = 64
    """Overlap of the `auto` chunking strategy."""
    lease_s: Annotated[float, Meta(gt=0)] = 60.0
    """A file being ingested is claimed for this long (renewed while it runs): a process that
    dies mid-file leaves it to be picked up again once the lease runs out."""
    rerank_model: str = ""
    """Model (id or alias) that reorders each search's best candidates: one serving /v1/rerank
    (a cross-encoder behind llama.cpp's server with `--reranking`, vLLM, Infinity), or any that
    embeds (then by embedding similarity). Unset: no rerank stage; a search's
    `ranking_options.ranker: "none"` skips it."""
    rerank_candidates: Annotated[int, Meta(ge=1, le=200)] = 20
    """How many of the fused candidates the rerank stage scores (more: better recall, and one
    cross-encoder pass per candidate)."""


class SamplingDefaults(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-model defaults applied where a request leaves a parameter unset."""

    temperature: float | None = None
    """Default sampling temperature."""
    top_p: float | None = None
    """Default nucleus sampling mass."""
    max_tokens: PositiveInt | None = None
    """Default completion length cap."""
    presence_penalty: float | None = None
    """Default presence penalty."""
    frequency_penalty: float | None = None
    """Default frequency penalty."""
    seed: int | None = None
    """Default RNG seed."""
    stop: tuple[str, ...] | None = None
    """Default stop sequences."""


Seconds = Annotated[float, Meta(gt=0)]


class Timeouts(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Time limits of one deployment; unset ones fall back to the defaults named."""

    connect_s: Seconds | None = None
    """Establishing a connection to a remote deployment (default 5 s)."""
    first_token_s: Seconds | None = None
    """From sending a streamed request to its first item; past it the next deployment is tried."""
    total_s: Seconds | None = None
    """One whole call, stream included (default `model_server.timeout`)."""


class DeploymentConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One backend in a model's pool."""

    backend: Annotated[str, Meta(min_length=1)]
    """Backend spec, as a model's `backend`."""
    name: str = ""
    """Unique within the model; defaults to the backend spec without credentials."""
    weight: PositiveInt = 1
    """Share of traffic under `weighted_round_robin`."""
    priority: int = 0
    """Lower is tried first under `priority` (the primary); ties keep config order."""
    max_parallel: PositiveInt | None = None
    """Most requests in flight here; a full deployment is skipped."""
    upstream_model: str | None = None
    """Model name sent to a remote deployment (its `options.upstream_model`)."""
    api_key: str | None = None
    """Key for a remote deployment (its `options.api_key`)."""
    api_key_env: str | None = None
    """Environment variable holding that key (its `options.api_key_env`)."""
    timeouts: Timeouts = Timeouts()
    """Time limits."""
    options: dict[str, Any] = {}
    """Backend-specific options, as a model's `options`."""


class RoutingSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a model's deployments share traffic and when one is taken out."""

    strategy: Literal["priority", "weighted_round_robin", "least_busy"] = "priority"
    """`priority`: primary then backups; `weighted_round_robin`: by weight; `least_busy`:
    fewest requests in flight."""
    retries: Annotated[int, Meta(ge=0)] = 2
    """Further deployments tried after a failure before the first byte."""
    deadline_s: Seconds | None = None
    """Total time for all attempts of one request (default `model_server.timeout`)."""
    failures_to_trip: PositiveInt = 3
    """Failures within `failure_window_s` that put a deployment in cooldown."""
    failure_window_s: Seconds = 60.0
    """Window over which failures are counted."""
    cooldown_s: Seconds = 30.0
    """Time out of rotation before one trial request is let through."""
    health_check_interval_s: Annotated[float, Meta(ge=0)] = 10.0
    """Background health checks (`GET /models` upstream, loaded state in-process); 0: off."""
    health_check_timeout_s: Seconds = 5.0
    """A health check slower than this fails."""


class KnowledgeBinding(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A model grounded in vector stores: every chat retrieves for the last user turn."""

    vector_store_ids: Annotated[tuple[str, ...], Meta(min_length=1, max_length=10)]
    """Stores searched (any owner's: the config is the administrator's)."""
    max_results: Annotated[int, Meta(ge=1, le=50)] = 5
    """Passages put into the prompt at most (fewer when the context window is short)."""
    score_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.0
    """Passages scoring below this are left out."""


class ModelConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One public model: its id, aliases and the backend (or pool of them) serving it."""

    id: Annotated[str, Meta(min_length=1)]
    """Public model id, as clients send it in `model`."""
    backend: str = ""
    """Backend spec: `llamacpp:embedded`, `llamacpp:/path.gguf`, `http(s)://host/v1`, `mock:`.
    Exactly one of `backend`, `deployments` and `base` is set."""
    base: str = ""
    """Another model (id or alias) whose deployments serve this one: a second name with its own
    system prompt, knowledge, limits and access rules, and no second copy of the weights."""
    knowledge: KnowledgeBinding | None = None
    """Vector stores every chat with this model is grounded in."""
    system_prompt: str = ""
    """Put before the conversation's own system messages."""
    deployments: tuple[DeploymentConfig, ...] = ()
    """A pool of backends serving this model, routed by `routing`."""
    routing: RoutingSettings = RoutingSettings()
    """Strategy, retries, breaker and health checks of the pool."""
    fallbacks: tuple[str, ...] = ()
    """Models tried, in order, when every deployment of this one fails or none is healthy."""
    context_window_fallbacks: tuple[str, ...] = ()
    """Models tried, in order, when a prompt does not fit this model's context window."""
    think_tags: bool = False
    """Move a reply's leading `<think>…</think>` block into `reasoning_content`."""
    aliases: tuple[str, ...] = ()
    """Other names clients may use for this model."""
    context_length: PositiveInt | None = None
    """Context window in tokens; in-process models default to the GGUF's training context."""
    owned_by: str = "clawbot"
    """The `owned_by` field of the Model object."""
    params: SamplingDefaults = SamplingDefaults()
    """Sampling defaults for requests that leave them unset."""
    options: dict[str, Any] = {}
    """Backend-specific options (validated by the backend)."""
    limits: LimitSettings = LimitSettings()
    """Global limits of this model, over all keys."""


class Config(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole of clawbot.json."""

    model_server: ModelServer = ModelServer()
    """Listener settings."""
    auth: Auth = Auth()
    """Credentials."""
    logging: Logging = Logging()
    """Logging settings."""
    database: DatabaseSettings = DatabaseSettings()
    """Database settings."""
    rate_limits: RateLimiting = RateLimiting()
    """Rate-limit storage."""
    audit: AuditSettings = AuditSettings()
    """Audit log settings."""
    router: RouterSettings = RouterSettings()
    """Where routing state lives."""
    policies: PolicySettings = PolicySettings()
    """IP allowlists and plugin policies."""
    metrics: MetricsSettings = MetricsSettings()
    """Prometheus metrics."""
    reload: ReloadSettings = ReloadSettings()
    """Hot reload."""
    memory: MemorySettings = MemorySettings()
    """RAM budget of in-process models."""
    knowledge: KnowledgeSettings = KnowledgeSettings()
    """Files, vector stores and retrieval."""
    models: tuple[ModelConfig, ...] = ()
    """Served models; at least one."""

    def model_names(self) -> dict[str, ModelConfig]:
        """Every id and alias, mapped to its model."""
        names: dict[str, ModelConfig] = {}
        for model in self.models:
            for name in (model.id, *model.aliases):
                names[name] = model
        return names


_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def _explain(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """Turn msgspec's `... - at `$.a.b`` into `a.b: ...`."""
    text = str(exc)
    match = _PATH_RE.search(text)
    message = text[: match.start()] if match else text
    path = match.group("path") if match else ""
    unknown = re.fullmatch(r"Object contains unknown field `(?P<key>[^`]+)`", message)
    if unknown:
        key = f"{path}.{unknown.group('key')}" if path else unknown.group("key")
        return f"unknown key {key!r}"
    return f"{path}: {message}" if path else message


def parse_config(data: bytes | Mapping[str, Any], *, source: str = "clawbot.json") -> Config:
    """Parse and validate config from JSON bytes or a decoded mapping."""
    try:
        if isinstance(data, bytes | bytearray):
            config = msgspec.json.decode(data, type=Config)
        else:
            config = msgspec.convert(data, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from exc
    _check(config, source)
    return config


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read clawbot.json from `path` and apply environment overrides."""
    environ = os.environ if environ is None else environ
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {file}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
    config = parse_config(raw, source=str(file))
    config = anchor_sqlite_path(config, file.resolve().parent)
    if config.logging.path and not Path(config.logging.path).is_absolute():
        path = str(file.resolve().parent / config.logging.path)
        config = msgspec.structs.replace(
            config, logging=msgspec.structs.replace(config.logging, path=path)
        )
    overrides = {
        field: environ[name]
        for field, name in (
            ("api_key", "CLAWBOT_API_KEY"),
            ("token_secret", "CLAWBOT_TOKEN_SECRET"),
        )
        if environ.get(name)
    }
    if overrides:
        config = msgspec.structs.replace(
            config, auth=msgspec.structs.replace(config.auth, **overrides)
        )
    return config


def anchor_sqlite_path(config: Config, folder: Path) -> Config:
    """A relative SQLite path means next to clawbot.json, not wherever the process started."""
    prefix, sep, path = config.database.url.partition(":///")
    if not sep or not prefix.startswith("sqlite") or not path or path.startswith("/"):
        return config
    if path == ":memory:" or path.startswith("file:"):
        return config
    url = f"{prefix}:///{folder / path}"
    return msgspec.structs.replace(
        config, database=msgspec.structs.replace(config.database, url=url)
    )


def _check(config: Config, source: str) -> None:
    """Cross-field rules that a schema cannot express."""
    if not config.models:
        raise ConfigError(f"{source}: models: at least one model must be configured")
    seen: dict[str, int] = {}
    for index, model in enumerate(config.models):
        for name in (model.id, *model.aliases):
            if name in seen:
                first = seen[name]
                raise ConfigError(
                    f"{source}: models[{index}]: name {name!r} is already used by models[{first}]"
                )
            seen[name] = index
    for index, model in enumerate(config.models):
        _check_model(model, f"{source}: models[{index}]", seen)
        if model.base:
            base = config.models[seen[model.base]] if model.base in seen else None
            if base is None or base is model or base.base:
                raise ConfigError(
                    f"{source}: models[{index}].base: {model.base!r} is not a model with "
                    "backends of its own"
                )
        if model.knowledge is not None and not config.knowledge.enabled:
            raise ConfigError(f"{source}: models[{index}].knowledge needs knowledge.enabled")
    rerank = config.knowledge.rerank_model
    if rerank and rerank not in seen:
        raise ConfigError(f"{source}: knowledge.rerank_model: no model is called {rerank!r}")
    networks = {
        "model_server.trusted_proxies": config.model_server.trusted_proxies,
        "policies.ip_allowlist.api": config.policies.ip_allowlist.api,
        "policies.ip_allowlist.admin": config.policies.ip_allowlist.admin,
    }
    for key, values in networks.items():
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{source}: {key}: {value!r} is not an IP address or CIDR "
                    "(e.g. 10.0.0.0/8, 192.168.1.7, fd00::/8)"
                ) from None
    if not config.router.state.startswith(("memory://", "redis://", "rediss://")):
        raise ConfigError(
            f"{source}: router.state: {config.router.state!r} is neither memory:// nor redis://"
        )
    server = config.model_server
    if server.protocol == "https":
        for key in ("tls_cert", "tls_key"):
            value = getattr(server, key)
            if not value:
                raise ConfigError(
                    f"{source}: model_server.{key} is required when protocol is https"
                )
            if not Path(value).is_file():
                raise ConfigError(f"{source}: model_server.{key}: file not found: {value!r}")


def _check_model(model: ModelConfig, where: str, names: Mapping[str, int]) -> None:
    if sum(map(bool, (model.backend, model.deployments, model.base))) != 1:
        raise ConfigError(
            f"{where} ({model.id}): set exactly one of 'backend', 'deployments' and 'base'"
        )
    deployment_names = [d.name or deployment_label(d.backend) for d in model.deployments]
    for i, name in enumerate(deployment_names):
        if name in deployment_names[:i]:
            raise ConfigError(
                f"{where}.deployments[{i}]: name {name!r} is used twice; give each deployment "
                "a distinct 'name'"
            )
    for key in ("fallbacks", "context_window_fallbacks"):
        for name in getattr(model, key):
            if name not in names:
                raise ConfigError(f"{where}.{key}: no model is called {name!r}")
            if name in (model.id, *model.aliases):
                raise ConfigError(f"{where}.{key}: {name!r} is this model itself")


def deployment_label(spec: str) -> str:
    """A backend spec without the credentials a URL may carry (for names, logs and audit)."""
    parts = urlsplit(spec)
    if parts.password is None and parts.username is None:
        return spec
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def model_deployments(model: ModelConfig) -> tuple[DeploymentConfig, ...]:
    """A model's pool; a model with a single `backend` is a pool of one (a model with a
    `base` has none of its own: it is served by its base's)."""
    if model.base:
        return ()
    if model.deployments:
        return model.deployments
    return (DeploymentConfig(backend=model.backend, name="default"),)
