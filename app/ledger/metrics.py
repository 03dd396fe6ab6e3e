"""Prometheus metrics and `GET /metrics`.

Two kinds of numbers, gathered at two different times:

- Per request, `Metrics.observe` (called from `Gateway.finish`) counts the finished exchange:
  requests by route template, model, status and error code; latency, time to first token,
  gateway overhead and completion tokens per second as histograms; tokens in and out; 429s
  the gateway itself answered. Label children are cached, so a request costs a few dict
  lookups and counter increments.
- At scrape time, `GatewayCollector` reads what already exists: each pool's `snapshot()`
  (health, breaker, cooldown, in-flight, failures per model and deployment), the audit
  writer's queue and counters, the requests in flight, and the process's CPU and memory.
  Nothing of this costs anything per request.

Gateway overhead is the request's latency minus the time spent waiting on backends: every
attempt of a non-streamed call, and every item of a stream, from asking the backend to getting
the item (`Exchange.upstream_s`, measured in `app.core.dispatch`). What remains is what the gateway
itself spent: parsing, policies, routing, encoding, and writing to the client (for a stream
read slowly, waiting on that client too). Waits include event-loop scheduling delay, which
under load lands on either side.

Several workers (`PROMETHEUS_MULTIPROC_DIR` set, as `clawbot serve --workers` does): per-request
metrics are prometheus-client's multiprocess values (memory-mapped files in that directory);
each worker copies its scrape-time families into files of its own every `PUBLISH_INTERVAL_S`
(gauges with the mode in `MULTIPROCESS_MODES`, counters as increments); a scrape, answered by
whichever worker, reads every worker's files. The supervisor calls `mark_process_dead(pid)`
when a worker exits, so its live gauges stop counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.config import ModelConfig
from app.ledger.audit import AuditWriter
from backends.base import SelfDescribing

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase

    from app.ledger.exchange import Exchange

log = logging.getLogger("clawbot.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4"
"""The text exposition format every Prometheus version reads (Litestar adds the charset)."""
PUBLISH_INTERVAL_S = 1.0
"""How often each worker writes its scrape-time families to the multiprocess files."""
UNMATCHED_ROUTE = "unmatched"
"""The route label of requests that matched no route (404s on unknown paths, 405s)."""
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "insufficient_quota"})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)

GaugeMode = Literal["livesum", "livemin", "livemax"]

MULTIPROCESS_MODES: dict[str, GaugeMode] = {
    "clawbot_requests_in_flight": "livesum",
    "clawbot_backend_info": "livemax",
    "clawbot_backend_healthy": "livemin",
    "clawbot_backend_eligible": "livemin",
    "clawbot_backend_cooling_down": "livemax",
    "clawbot_backend_cooldown_remaining_seconds": "livemax",
    "clawbot_backend_in_flight": "livesum",
    "clawbot_backend_recent_failures": "livesum",
    "clawbot_audit_queue_depth": "livesum",
    "clawbot_engine_loaded": "livesum",
    "clawbot_engine_slots": "livesum",
    "clawbot_engine_slots_busy": "livesum",
    "clawbot_engine_queue_depth": "livesum",
    "process_resident_memory_bytes": "livesum",
    "process_virtual_memory_bytes": "livesum",
    "process_open_fds": "livesum",
    "process_start_time_seconds": "livemin",
}
"""How each worker's scrape-time gauge combines across workers; gauges not named here are
left out in multiprocess mode (counters always add up)."""


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when this process is one of several workers."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of worker `pid` (its counters keep counting); no-op with one
    process."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _use_multiprocess_values() -> None:
    """Make metrics created from now on write to the multiprocess files.

    prometheus-client picks its value class when it is imported; a worker forked from a
    parent that imported it before setting the variable would otherwise keep plain ones.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class WatchedDeployment(Protocol):
    """A deployment, as a scrape reads it."""

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> object: ...


class WatchedPool(Protocol):
    """A model's pool, as a scrape reads it."""

    @property
    def deployments(self) -> Sequence[WatchedDeployment]: ...

    def snapshot(self) -> list[dict[str, Any]]: ...


class WatchedModel(Protocol):
    """A served model, as a scrape reads it."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def pool(self) -> WatchedPool: ...


class Watched(Protocol):
    """What a scrape reads of the gateway (the core's `Gateway` is one): its models' pools and
    its audit writer. A protocol, so that bookkeeping does not depend on the request path."""

    @property
    def models(self) -> Sequence[WatchedModel]: ...

    @property
    def audit(self) -> AuditWriter | None: ...

    def ingestion_stats(self) -> Mapping[str, float] | None:
        """The knowledge base's ingestion counters (None: no knowledge base)."""
        ...


class GatewayCollector(Collector):
    """Reads the gateway's state when scraped: pools, audit writer, requests in flight."""

    def __init__(self, gateway: Watched, in_flight: Callable[[], int]) -> None:
        self.gateway = gateway
        self.in_flight = in_flight
        self.scrapes = 0
        """Scrapes being answered (each is itself a request in flight, not counted)."""

    def collect(self) -> Iterator[Metric]:
        """Every scrape-time family."""
        yield GaugeMetricFamily(
            "clawbot_requests_in_flight",
            "HTTP requests being served.",
            value=max(0, self.in_flight() - self.scrapes),
        )
        yield from self._backends()
        yield from self._engines()
        yield from self._audit()
        yield from self._ingestion()

    def _ingestion(self) -> Iterator[Metric]:
        stats = self.gateway.ingestion_stats()
        if stats is None:
            return
        files = CounterMetricFamily(
            "clawbot_knowledge_files_ingested",
            "Files this process ingested into vector stores, by outcome.",
            labels=["outcome"],
        )
        files.add_metric(["completed"], stats["files_completed"])
        files.add_metric(["failed"], stats["files_failed"])
        yield files
        yield CounterMetricFamily(
            "clawbot_knowledge_chunks_indexed",
            "Chunks embedded and indexed by this process.",
            value=stats["chunks_indexed"],
        )
        yield CounterMetricFamily(
            "clawbot_knowledge_ingest_seconds",
            "Seconds spent ingesting files (extract, chunk, embed, index).",
            value=stats["seconds"],
        )

    def _backends(self) -> Iterator[Metric]:
        labels = ["model", "deployment"]
        info = GaugeMetricFamily(
            "clawbot_backend_info",
            "Each deployment's backend (URL without credentials); always 1.",
            labels=[*labels, "backend"],
        )
        healthy = GaugeMetricFamily(
            "clawbot_backend_healthy", "1 unless the last health check failed.", labels=labels
        )
        eligible = GaugeMetricFamily(
            "clawbot_backend_eligible",
            "1 if a new request may be sent to the deployment now.",
            labels=labels,
        )
        cooling = GaugeMetricFamily(
            "clawbot_backend_cooling_down",
            "1 while the deployment's breaker is open or half-open.",
            labels=labels,
        )
        cooldown = GaugeMetricFamily(
            "clawbot_backend_cooldown_remaining_seconds",
            "Seconds until a cooling deployment gets a trial request.",
            labels=labels,
        )
        busy = GaugeMetricFamily(
            "clawbot_backend_in_flight", "Requests in flight at the deployment.", labels=labels
        )
        recent = GaugeMetricFamily(
            "clawbot_backend_recent_failures",
            "Failures within the breaker's window.",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "clawbot_backend_failures", "Failed attempts at the deployment.", labels=labels
        )
        successes = CounterMetricFamily(
            "clawbot_backend_successes", "Answered attempts at the deployment.", labels=labels
        )
        for served in self.gateway.models:
            model = served.config.id
            for d in served.pool.snapshot():
                ids = [model, d["name"]]
                info.add_metric([*ids, d["backend"]], 1)
                healthy.add_metric(ids, 1 if d["healthy"] else 0)
                eligible.add_metric(ids, 1 if d["eligible"] else 0)
                cooling.add_metric(ids, 0 if d["state"] == "closed" else 1)
                cooldown.add_metric(ids, d["cooldown_remaining_s"])
                busy.add_metric(ids, d["in_flight"])
                recent.add_metric(ids, d["recent_failures"])
                failures.add_metric(ids, d["total_failures"])
                successes.add_metric(ids, d["total_successes"])
        yield from (info, healthy, eligible, cooling, cooldown, busy, recent, failures, successes)

    def _engines(self) -> Iterator[Metric]:
        """In-process models: loaded, slots, queue (backends with `engine_stats`)."""
        labels = ["model", "deployment"]
        loaded = GaugeMetricFamily(
            "clawbot_engine_loaded",
            "1 while an in-process model's weights are in memory.",
            labels=labels,
        )
        slots = GaugeMetricFamily(
            "clawbot_engine_slots", "Sequences the model decodes together.", labels=labels
        )
        occupied = GaugeMetricFamily(
            "clawbot_engine_slots_busy", "Slots holding a sequence now.", labels=labels
        )
        queued = GaugeMetricFamily(
            "clawbot_engine_queue_depth", "Requests waiting for a slot.", labels=labels
        )
        steps = CounterMetricFamily(
            "clawbot_engine_decode_steps",
            "Batches decoded since the model was loaded.",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "clawbot_engine_batch_tokens",
            "Tokens decoded (prompt tokens read and tokens generated) since the model loaded.",
            labels=labels,
        )
        decode = CounterMetricFamily(
            "clawbot_engine_decode_seconds",
            "Time in llama.cpp's decode since the model loaded.",
            labels=labels,
        )
        busy = CounterMetricFamily(
            "clawbot_engine_busy_seconds",
            "Time the engine thread worked (decode, sampling, bookkeeping) since the model "
            "loaded; the rest it waited for requests.",
            labels=labels,
        )
        for served in self.gateway.models:
            for d in served.pool.deployments:
                backend = d.backend
                s = backend.state().engine if isinstance(backend, SelfDescribing) else None
                if s is None:
                    continue
                ids = [served.config.id, d.name]
                loaded.add_metric(ids, s["loaded"])
                slots.add_metric(ids, s["slots"])
                occupied.add_metric(ids, s["active"])
                queued.add_metric(ids, s["queued"])
                if s["loaded"]:
                    steps.add_metric(ids, s["steps"])
                    tokens.add_metric(ids, s["batch_tokens"])
                    decode.add_metric(ids, s["decode_s"])
                    busy.add_metric(ids, s["busy_s"])
        yield from (loaded, slots, occupied, queued, steps, tokens, decode, busy)

    def _audit(self) -> Iterator[Metric]:
        audit = self.gateway.audit
        if audit is None:
            return
        yield GaugeMetricFamily(
            "clawbot_audit_queue_depth",
            "Audit rows waiting to be written (the batch in hand included).",
            value=audit.queue_depth,
        )
        yield CounterMetricFamily(
            "clawbot_audit_dropped_rows",
            "Audit rows lost (queue full, or unwritable).",
            value=audit.dropped,
        )
        yield CounterMetricFamily(
            "clawbot_audit_written_rows",
            "Audit rows written to the database.",
            value=audit.written,
        )
        yield CounterMetricFamily(
            "clawbot_audit_failed_writes",
            "Audit batch writes that failed and were retried.",
            value=audit.failed_attempts,
        )


class _Publisher:
    """Copies one worker's scrape-time families into its multiprocess files."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self._sources = list(sources)
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def publish(self) -> None:
        """Write the current value of every family."""
        for source in self._sources:
            for family in source.collect():
                if family.type == "counter":
                    self._counter(family)
                elif family.type == "gauge" and family.name in MULTIPROCESS_MODES:
                    self._gauge(family, MULTIPROCESS_MODES[family.name])

    def _gauge(self, family: Metric, mode: GaugeMode) -> None:
        for sample in family.samples:
            gauge = self._gauges.get(family.name)
            if gauge is None:
                gauge = self._gauges[family.name] = Gauge(
                    family.name,
                    family.documentation,
                    list(sample.labels),
                    registry=None,
                    multiprocess_mode=mode,
                )
            target = gauge.labels(*sample.labels.values()) if sample.labels else gauge
            target.set(sample.value)

    def _counter(self, family: Metric) -> None:
        total = family.name + "_total"
        for sample in family.samples:
            if sample.name != total:
                continue
            counter = self._counters.get(family.name)
            if counter is None:
                counter = self._counters[family.name] = Counter(
                    family.name, family.documentation, list(sample.labels), registry=None
                )
            key = (family.name, tuple(sample.labels.values()))
            last = self._last.get(key, 0.0)
            self._last[key] = sample.value
            # A source that started again from zero (a rebuilt gateway) adds all it has.
            delta = sample.value - last if sample.value >= last else sample.value
            if delta > 0:
                target = counter.labels(*sample.labels.values()) if sample.labels else counter
                target.inc(delta)


_LABELS = {"ttft": ("route", "model"), "overhead": ("route",)}
"""Label names of the per-request metrics not labelled by model alone."""


class _Row:
    """The label children of one route and model, so a request looks them up once."""

    __slots__ = ("_children", "_metrics", "latency", "model", "requests", "route")

    def __init__(self, metrics: Metrics, route: str, model: str) -> None:
        self._metrics = metrics
        self.route = route
        self.model = model
        self.requests: dict[tuple[int, str], Any] = {}
        """Children of `clawbot_requests_total` by status and code."""
        self.latency = metrics.latency.labels(route, model)
        self._children: dict[str, Any] = {}

    def child(self, name: str) -> Any:
        """The child of metric `name` (an attribute of `Metrics`), made on first use so that
        routes without backends, streams or tokens get no empty series."""
        child = self._children.get(name)
        if child is None:
            metric: MetricWrapperBase = getattr(self._metrics, name)
            labels = _LABELS.get(name, ("model",))
            child = metric.labels(*(getattr(self, label) for label in labels))
            self._children[name] = child
        return child


class Metrics:
    """One gateway's metrics: a registry of its own, recorders, and the scrape."""

    def __init__(self, gateway: Watched, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.gateway = gateway
        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess:
            _use_multiprocess_values()
        # `*_created` series would double the scrape for a timestamp dashboards never use.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        own = None if self.multiprocess else self.registry
        timing = ["route", "model"]
        self.requests = Counter(
            "clawbot_requests",
            "Requests answered, by route template, model, status and error code.",
            ["route", "model", "status", "code"],
            registry=own,
        )
        self.latency = Histogram(
            "clawbot_request_duration_seconds",
            "From the request's arrival to the last byte of the answer.",
            timing,
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.ttft = Histogram(
            "clawbot_time_to_first_token_seconds",
            "Streams: from the request's arrival to the first event sent.",
            timing,
            buckets=TTFT_BUCKETS,
            registry=own,
        )
        self.overhead = Histogram(
            "clawbot_gateway_overhead_seconds",
            "Requests sent to a backend: latency minus the time spent waiting on backends.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=own,
        )
        self.prompt_tokens = Counter(
            "clawbot_prompt_tokens",
            "Prompt tokens, as backends report them.",
            ["model"],
            registry=own,
        )
        self.completion_tokens = Counter(
            "clawbot_completion_tokens",
            "Completion tokens, as backends report them.",
            ["model"],
            registry=own,
        )
        self.tokens_per_second = Histogram(
            "clawbot_completion_tokens_per_second",
            "Per request: completion tokens over the time spent waiting on the backend.",
            ["model"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=own,
        )
        self.rate_limited = Counter(
            "clawbot_rate_limit_rejections",
            "429s the gateway answered itself (rate limits, budgets), by code, model and key id.",
            ["code", "model", "key"],
            registry=own,
        )
        self.collector = GatewayCollector(gateway, in_flight)
        process = ProcessCollector(registry=None)
        self._publisher: _Publisher | None = None
        self._task: asyncio.Task[None] | None = None
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry, multiprocess_dir())  # type: ignore[no-untyped-call]
            self._publisher = _Publisher([self.collector, process])
        else:
            self.registry.register(self.collector)
            self.registry.register(process)
        self._models = frozenset(served.config.id for served in gateway.models)
        self._rows: dict[tuple[str, str], _Row] = {}

    def bind(self, gateway: Watched) -> None:
        """Read pools and the audit writer from `gateway` from now on (a reloaded config's):
        the counters go on, the scrape-time families follow the new models."""
        self.gateway = self.collector.gateway = gateway
        self._models = frozenset(served.config.id for served in gateway.models)

    def _row(self, route: str, model: str) -> _Row:
        row = self._rows.get((route, model))
        if row is None:
            row = self._rows[(route, model)] = _Row(self, route, model)
        return row

    def observe(self, exchange: Exchange) -> None:
        """Count one finished exchange."""
        ctx = exchange.ctx
        model = ctx.model if ctx is not None and ctx.model in self._models else ""
        row = self._row(exchange.template or UNMATCHED_ROUTE, model)
        status, code = exchange.status, exchange.error_type or ""
        counted = row.requests.get((status, code))
        if counted is None:
            counted = row.requests[(status, code)] = self.requests.labels(
                row.route, model, str(status), code
            )
        counted.inc()
        end = exchange.finished_at if exchange.finished_at is not None else time.perf_counter()
        seconds = end - exchange.started
        row.latency.observe(seconds)
        if exchange.ttft_ms is not None:
            row.child("ttft").observe(exchange.ttft_ms / 1000)
        if exchange.backend is not None:
            row.child("overhead").observe(max(0.0, seconds - exchange.upstream_s))
        elif status == 429 and code in RATE_LIMIT_CODES:
            key_id = (ctx.key_id if ctx is not None else None) or ""
            self.rate_limited.labels(code, model, key_id).inc()
        if exchange.prompt_tokens:
            row.child("prompt_tokens").inc(exchange.prompt_tokens)
        if exchange.completion_tokens:
            row.child("completion_tokens").inc(exchange.completion_tokens)
            if exchange.upstream_s > 0:
                rate = exchange.completion_tokens / exchange.upstream_s
                row.child("tokens_per_second").observe(rate)

    def render(self) -> bytes:
        """The text exposition of every metric (every worker's, in multiprocess mode)."""
        self.collector.scrapes += 1
        try:
            if self._publisher is not None:
                self._publisher.publish()
            return generate_latest(self.registry)
        finally:
            self.collector.scrapes -= 1

    def start(self) -> None:
        """In multiprocess mode, start publishing this worker's scrape-time families."""
        if self._publisher is not None and self._task is None:
            self._task = asyncio.create_task(self._publish_forever(), name="metrics-publisher")

    async def aclose(self) -> None:
        """Stop publishing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _publish_forever(self) -> None:
        assert self._publisher is not None
        while True:
            try:
                self._publisher.publish()
            except Exception:
                log.exception("publishing metrics failed")
            await asyncio.sleep(PUBLISH_INTERVAL_S)
