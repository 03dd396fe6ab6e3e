"""GET /metrics: per-request counters and histograms, scrape-time collectors, multiprocess mode,
and the Grafana dashboard's metric names."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.config import load_config, parse_config
from app.core.gateway import Gateway
from app.ledger.audit import AuditEntry
from app.ledger.metrics import MULTIPROCESS_ENV
from tests.conftest import (
    AUTH,
    AppClient,
    away_from_minute_boundary,
    make_config,
    post_scope,
    receive_body,
)
from tests.services import REDIS_URL, require_redis
from tests.serving import serve

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "clawbot.json"
CHAT_ROUTE = "/v1/chat/completions"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def chat(model: str = "mock", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample called `name` with exactly `labels`, if present."""
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(client: AppClient | httpx.AsyncClient, **kw: Any) -> Samples:
    r = await client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


@pytest.fixture
async def gateway_client() -> AsyncIterator[tuple[Gateway, AppClient]]:
    gateway = Gateway.from_config(make_config())
    async with AppClient(create_app(gateway)) as client:
        yield gateway, client


def client_for(**config: Any) -> AppClient:
    base = make_config(config.pop("models", None))
    merged = {**msgspec.to_builtins(base), **config}
    return AppClient(create_app(Gateway.from_config(parse_config(merged))))


async def test_counts_requests_by_route_model_status_and_code(gateway_client: Any) -> None:
    _, client = gateway_client
    assert (await client.post(CHAT_ROUTE, json=chat(), headers=AUTH)).status_code == 200
    r = await client.post(CHAT_ROUTE, json=chat("gpt-4o-mini"), headers=AUTH)
    assert r.status_code == 200
    r = await client.post(CHAT_ROUTE, json=chat(stream=True), headers=AUTH)
    assert r.status_code == 200
    assert (await client.post(CHAT_ROUTE, json=chat("nope"), headers=AUTH)).status_code == 404
    assert (await client.get("/v1/no/such/route", headers=AUTH)).status_code == 404
    assert (await client.post(CHAT_ROUTE, json=chat())).status_code == 401
    r = await client.get("/v1/models/mock", headers=AUTH)
    assert r.status_code == 200

    samples = await scrape(client)
    ok = {"route": CHAT_ROUTE, "model": "mock", "status": "200", "code": ""}
    assert value(samples, "clawbot_requests_total", **ok) == 3, "an alias counts as its model"
    missing = {"route": CHAT_ROUTE, "model": "", "status": "404", "code": "model_not_found"}
    assert value(samples, "clawbot_requests_total", **missing) == 1
    unmatched = {"route": "unmatched", "model": "", "status": "404", "code": "not_found"}
    assert value(samples, "clawbot_requests_total", **unmatched) == 1
    refused = {"route": CHAT_ROUTE, "model": "mock", "status": "401", "code": "invalid_api_key"}
    assert value(samples, "clawbot_requests_total", **refused) == 1
    templated = {"route": "/v1/models/{model_id}", "model": "mock", "status": "200", "code": ""}
    assert value(samples, "clawbot_requests_total", **templated) == 1
    assert not any("nope" in str(labels) for _, labels in samples), "no unbounded label values"

    timing = {"route": CHAT_ROUTE, "model": "mock"}
    assert value(samples, "clawbot_request_duration_seconds_count", **timing) == 4, "and the 401"
    assert value(samples, "clawbot_time_to_first_token_seconds_count", **timing) == 1, (
        "only the stream has a time to first token"
    )
    assert value(samples, "clawbot_gateway_overhead_seconds_count", route=CHAT_ROUTE) == 3, (
        "only requests that reached a backend"
    )
    assert value(samples, "clawbot_requests_in_flight") == 0, "the scrape itself is left out"


async def test_tokens_in_and_out_and_tokens_per_second() -> None:
    async with client_for() as client:
        r = await client.post(CHAT_ROUTE, json=chat("fixed"), headers=AUTH)
        usage = r.json()["usage"]
        r = await client.post(CHAT_ROUTE, json=chat("fixed", stream=True), headers=AUTH)
        assert r.status_code == 200
        samples = await scrape(client)
    prompt = value(samples, "clawbot_prompt_tokens_total", model="fixed")
    completion = value(samples, "clawbot_completion_tokens_total", model="fixed")
    assert prompt == 2 * usage["prompt_tokens"]
    assert completion == 2 * usage["completion_tokens"]
    assert value(samples, "clawbot_completion_tokens_per_second_count", model="fixed") == 2
    assert (value(samples, "clawbot_completion_tokens_per_second_sum", model="fixed") or 0) > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_overhead_leaves_out_the_time_spent_waiting_on_the_backend(stream: bool) -> None:
    slow = {"id": "slow", "backend": "mock:", "options": {"reply": "a b c d", "token_delay_ms": 60}}
    async with client_for(models=[slow]) as client:
        r = await client.post(CHAT_ROUTE, json=chat("slow", stream=stream), headers=AUTH)
        assert r.status_code == 200
        samples = await scrape(client)
    latency = value(samples, "clawbot_request_duration_seconds_sum", route=CHAT_ROUTE, model="slow")
    overhead = value(samples, "clawbot_gateway_overhead_seconds_sum", route=CHAT_ROUTE)
    rate = value(samples, "clawbot_completion_tokens_per_second_sum", model="slow")
    assert latency is not None
    assert overhead is not None
    assert rate is not None
    assert latency >= 0.2, "four tokens 60 ms apart"
    assert overhead < latency - 0.2, "the backend's 240 ms are not the gateway's"
    assert rate < 4 / 0.2, "tokens over the backend's time"


async def new_key(client: AppClient, **fields: Any) -> tuple[str, dict[str, str]]:
    """A key's id and the headers that use it."""
    r = await client.post("/admin/keys", json={"name": "k", **fields}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['key']}"}


async def test_rate_limit_rejections_by_code_model_and_key(gateway_client: Any) -> None:
    gateway, client = gateway_client
    await away_from_minute_boundary()
    limited, headers = await new_key(client, requests_per_minute=1)
    r = await client.post(CHAT_ROUTE, json=chat(), headers=headers)
    assert r.status_code == 200
    for _ in range(2):
        r = await client.post(CHAT_ROUTE, json=chat(), headers=headers)
        assert r.json()["error"]["code"] == "rate_limit_exceeded"

    budget, headers = await new_key(client, budget_total_tokens=5)
    for _ in range(100):  # until the audit writer has charged the key's spent tokens
        r = await client.post(CHAT_ROUTE, json=chat(), headers=headers)
        if r.status_code == 429:
            break
        await asyncio.sleep(0.05)
        await gateway.key_cache.refresh()
    assert r.json()["error"]["code"] == "insufficient_quota"

    samples = await scrape(client)
    name = "clawbot_rate_limit_rejections_total"
    assert value(samples, name, code="rate_limit_exceeded", model="mock", key=limited) == 2
    assert value(samples, name, code="insufficient_quota", model="mock", key=budget) == 1
    assert total(samples, name) == 3
    assert value(samples, "clawbot_audit_written_rows_total") == gateway.audit.written > 0


async def test_an_upstream_429_is_not_a_gateway_rejection() -> None:
    limited = {"id": "up", "backend": "mock:", "options": {"fail_with": "rate_limited"}}
    async with client_for(models=[limited]) as client:
        r = await client.post(CHAT_ROUTE, json=chat("up"), headers=AUTH)
        assert r.status_code == 429
        samples = await scrape(client)
    assert total(samples, "clawbot_rate_limit_rejections_total") == 0
    assert total(samples, "clawbot_requests_total", model="up", status="429") == 1
    assert value(samples, "clawbot_backend_failures_total", model="up", deployment="default") == 1


async def test_backend_collector_reflects_a_tripped_deployment() -> None:
    pool = {
        "id": "m",
        "routing": {"failures_to_trip": 1, "cooldown_s": 60},
        "deployments": [
            {"name": "primary", "backend": "mock:", "options": {"fail_with": "server_error"}},
            {"name": "backup", "backend": "mock:", "priority": 1},
        ],
    }
    async with client_for(models=[pool]) as client:
        before = await scrape(client)
        assert value(before, "clawbot_backend_cooling_down", model="m", deployment="primary") == 0
        r = await client.post(CHAT_ROUTE, json=chat("m"), headers=AUTH)
        assert r.status_code == 200
        samples = await scrape(client)
    primary = {"model": "m", "deployment": "primary"}
    backup = {"model": "m", "deployment": "backup"}
    assert value(samples, "clawbot_backend_cooling_down", **primary) == 1
    assert value(samples, "clawbot_backend_eligible", **primary) == 0
    assert (value(samples, "clawbot_backend_cooldown_remaining_seconds", **primary) or 0) > 50
    assert value(samples, "clawbot_backend_failures_total", **primary) == 1
    assert value(samples, "clawbot_backend_healthy", **primary) == 1, "breaker, not health check"
    assert value(samples, "clawbot_backend_cooling_down", **backup) == 0
    assert value(samples, "clawbot_backend_successes_total", **backup) == 1
    assert value(samples, "clawbot_backend_info", **backup, backend="mock:") == 1


async def test_in_flight_gauges_while_a_stream_runs() -> None:
    slow = {"id": "slow", "backend": "mock:", "options": {"reply": "a b c", "token_delay_ms": 200}}
    async with client_for(models=[slow]) as client:
        # The test client reads whole responses: drive the app itself for the held stream.
        body = json.dumps(chat("slow", stream=True)).encode()
        scope = post_scope(CHAT_ROUTE, AUTH["Authorization"])
        first_event, gone = asyncio.Event(), asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                if message.get("body"):
                    first_event.set()
                if not message.get("more_body"):
                    gone.set()

        held = asyncio.create_task(client.app(scope, receive_body(body, gone), send))
        await asyncio.wait_for(first_event.wait(), timeout=30)
        during = await scrape(client)
        await asyncio.wait_for(held, timeout=30)
        after = await scrape(client)
    deployment = {"model": "slow", "deployment": "default"}
    assert value(during, "clawbot_requests_in_flight") == 1, "the stream, not the scrape"
    assert value(during, "clawbot_backend_in_flight", **deployment) == 1
    assert value(after, "clawbot_requests_in_flight") == 0
    assert value(after, "clawbot_backend_in_flight", **deployment) == 0


async def test_audit_queue_and_dropped_rows() -> None:
    config = {**msgspec.to_builtins(make_config()), "audit": {"max_queue": 2}}
    gateway = Gateway.from_config(parse_config(config))
    async with AppClient(create_app(gateway)) as client:
        await scrape(client)
        writer, metrics = gateway.audit, gateway.metrics
        assert writer is not None
        assert metrics is not None
        row = AuditEntry(
            request_id="r", ts=datetime.now(UTC), route="/v1/x", status=200, latency_ms=1
        )
        for _ in range(5):  # the writer cannot run in between: two fit, three are dropped
            writer.submit(row)
        samples = parse(metrics.render().decode())
    assert value(samples, "clawbot_audit_queue_depth") == 2
    assert value(samples, "clawbot_audit_dropped_rows_total") == 3


async def test_process_cpu_and_memory(gateway_client: Any) -> None:
    _, client = gateway_client
    samples = await scrape(client)
    assert (value(samples, "process_cpu_seconds_total") or 0) > 0
    assert (value(samples, "process_resident_memory_bytes") or 0) > 10_000_000


async def test_require_key_asks_for_the_master_key() -> None:
    async with client_for(metrics={"require_key": True}) as client:
        r = await client.get("/metrics")
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        created = await client.post("/admin/keys", json={"name": "k"}, headers=AUTH)
        key = {"Authorization": f"Bearer {created.json()['key']}"}
        r = await client.get("/metrics", headers=key)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "permission_denied"
        await scrape(client, headers=AUTH)


async def test_disabled_metrics_are_a_404_and_record_nothing() -> None:
    config = {**msgspec.to_builtins(make_config()), "metrics": {"enabled": False}}
    gateway = Gateway.from_config(parse_config(config))
    async with AppClient(create_app(gateway)) as client:
        assert gateway.metrics is None
        assert (await client.post(CHAT_ROUTE, json=chat(), headers=AUTH)).status_code == 200
        r = await client.get("/metrics", headers=AUTH)
        assert r.status_code == 404
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "metrics.enabled" in error["message"]


async def test_counting_goes_on_across_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "clawbot.json"
    config: dict[str, Any] = {
        "auth": {"api_key": AUTH["Authorization"].removeprefix("Bearer ")},
        "database": {"url": "sqlite+aiosqlite://"},
        "reload": {"watch": False},
        "models": [{"id": "a", "backend": "mock:"}],
    }
    path.write_text(json.dumps(config))
    app = create_app(Gateway.from_config(load_config(path)), config_path=path)
    async with AppClient(app) as client:
        assert (await client.post(CHAT_ROUTE, json=chat("a"), headers=AUTH)).status_code == 200
        config["models"].append({"id": "b", "backend": "mock:"})
        path.write_text(json.dumps(config))
        assert (await client.post("/admin/reload", headers=AUTH)).status_code == 200
        for model in ("a", "b"):
            r = await client.post(CHAT_ROUTE, json=chat(model), headers=AUTH)
            assert r.status_code == 200
        samples = await scrape(client)
    for model, count in (("a", 2), ("b", 1)):
        ok = {"route": CHAT_ROUTE, "model": model, "status": "200", "code": ""}
        assert value(samples, "clawbot_requests_total", **ok) == count, model
    assert value(samples, "clawbot_backend_healthy", model="b", deployment="default") == 1


def _dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\b(?:clawbot|process)_\w+", expr)}


def _exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


async def test_the_dashboard_uses_only_exposed_metrics(gateway_client: Any) -> None:
    _, client = gateway_client
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), expr
    r = await client.get("/metrics")
    exposed = _exposed_names(r.text)
    used = _dashboard_metrics(dashboard)
    assert used - exposed == set()
    wanted = {
        "clawbot_requests_total",
        "clawbot_request_duration_seconds_bucket",
        "clawbot_time_to_first_token_seconds_bucket",
        "clawbot_gateway_overhead_seconds_bucket",
        "clawbot_completion_tokens_total",
        "clawbot_requests_in_flight",
        "clawbot_rate_limit_rejections_total",
        "clawbot_backend_healthy",
        "clawbot_audit_queue_depth",
    }
    assert wanted <= used


# Multiprocess mode: each script below is its own process, as a worker would be.

_WORKER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from app.ledger.exchange import Exchange
    from policies.context import RequestContext
    from app.core.gateway import Gateway
    from app.ledger.metrics import Metrics
    from tests.conftest import make_config

    gateway = Gateway.from_config(make_config())
    metrics = Metrics(gateway, in_flight=lambda: int(sys.argv[1]))
    started = time.perf_counter()
    exchange = Exchange(started=started, route="/v1/chat/completions", status=200)
    exchange.template = "/v1/chat/completions"
    exchange.ctx = RequestContext("req_1", "127.0.0.1", exchange.route, None, model="mock")
    exchange.backend = "mock:"
    exchange.prompt_tokens, exchange.completion_tokens = 3, 5
    exchange.upstream_s = 0.5
    exchange.finished_at = started + 1.0
    gateway.models[0].pool.deployments[0].total_failures = int(sys.argv[1])
    metrics.observe(exchange)

    async def publish_once():
        metrics.start()  # publishes this worker's scrape-time families right away
        await asyncio.sleep(0.2)
        await metrics.aclose()

    asyncio.run(publish_once())
    print(os.getpid(), flush=True)
    """
)
_SCRAPER = textwrap.dedent(
    """
    import sys
    from app.core.gateway import Gateway
    from app.ledger.metrics import Metrics
    from tests.conftest import make_config

    metrics = Metrics(Gateway.from_config(make_config()))
    sys.stdout.write(metrics.render().decode())
    """
)


def _python(script: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def multiprocess_dir(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "metrics"
    folder.mkdir()
    return {MULTIPROCESS_ENV: str(folder), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_workers_metrics_add_up_through_the_multiprocess_directory(
    multiprocess_dir: dict[str, str],
) -> None:
    first = int(_python(_WORKER, "2", env=multiprocess_dir))
    _python(_WORKER, "3", env=multiprocess_dir)
    samples = parse(_python(_SCRAPER, env=multiprocess_dir))
    ok = {"route": CHAT_ROUTE, "model": "mock", "status": "200", "code": ""}
    assert value(samples, "clawbot_requests_total", **ok) == 2
    assert value(samples, "clawbot_completion_tokens_total", model="mock") == 10
    timing = {"route": CHAT_ROUTE, "model": "mock"}
    assert value(samples, "clawbot_request_duration_seconds_count", **timing) == 2
    overhead = value(samples, "clawbot_gateway_overhead_seconds_sum", route=CHAT_ROUTE)
    assert overhead == pytest.approx(1.0), "(1 s - 0.5 s upstream) twice"
    deployment = {"model": "mock", "deployment": "default"}
    assert value(samples, "clawbot_backend_failures_total", **deployment) == 5, "2 + 3"
    assert value(samples, "clawbot_requests_in_flight") == 5, "live gauges add up (2 + 3 + 0)"
    assert value(samples, "clawbot_backend_healthy", **deployment) == 1
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0

    from app.ledger import metrics

    os.environ[MULTIPROCESS_ENV] = multiprocess_dir[MULTIPROCESS_ENV]
    try:
        metrics.mark_process_dead(first)
    finally:
        del os.environ[MULTIPROCESS_ENV]
    samples = parse(_python(_SCRAPER, env=multiprocess_dir))
    assert value(samples, "clawbot_requests_in_flight") == 3, "a dead worker's gauges go"
    assert value(samples, "clawbot_requests_total", **ok) == 2, "its counters stay"


def test_mark_process_dead_is_a_no_op_with_one_process() -> None:
    from app.ledger import metrics

    assert MULTIPROCESS_ENV not in os.environ
    metrics.mark_process_dead(os.getpid())


# Real processes.

MOCK_CONFIG: dict[str, Any] = {
    "auth": {"api_key": "sk-metrics"},
    "audit": {"enabled": False},
    "models": [{"id": "mock", "backend": "mock:"}],
}
KEY = {"Authorization": "Bearer sk-metrics"}


async def scrape_until(
    client: httpx.AsyncClient, name: str, expected: float, **labels: str
) -> Samples:
    """Scrape until a sample reaches `expected`: a request is counted just after its last byte,
    and other workers publish their scrape-time families every second."""
    for _ in range(100):
        samples = await scrape(client)
        if value(samples, name, **labels) == expected:
            break
        await asyncio.sleep(0.1)
    return samples


@pytest.mark.slow
async def test_a_served_process_is_scraped(tmp_path: Path) -> None:
    ok = {"route": CHAT_ROUTE, "model": "mock", "status": "200", "code": ""}
    with serve(MOCK_CONFIG, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
            r = await client.post(CHAT_ROUTE, json=chat(), headers=KEY)
            assert r.status_code == 200
            r = await client.post(CHAT_ROUTE, json=chat(stream=True), headers=KEY)
            assert r.status_code == 200
            samples = await scrape_until(client, "clawbot_requests_total", 2, **ok)
    assert value(samples, "clawbot_requests_total", **ok) == 2
    timing = {"route": CHAT_ROUTE, "model": "mock"}
    assert value(samples, "clawbot_time_to_first_token_seconds_count", **timing) == 1
    assert value(samples, "clawbot_backend_healthy", model="mock", deployment="default") == 1
    assert (value(samples, "process_cpu_seconds_total") or 0) > 0


@pytest.mark.slow
async def test_two_processes_sharing_a_directory_are_scraped_as_one(
    tmp_path: Path, multiprocess_dir: dict[str, str]
) -> None:
    env = {MULTIPROCESS_ENV: multiprocess_dir[MULTIPROCESS_ENV]}
    ok = {"route": CHAT_ROUTE, "model": "mock", "status": "200", "code": ""}
    timing = {"route": CHAT_ROUTE, "model": "mock"}
    deployment = {"model": "mock", "deployment": "default"}
    with (
        serve(MOCK_CONFIG, tmp_path / "a", env=env) as a,
        serve(MOCK_CONFIG, tmp_path / "b", env=env) as b,
    ):
        async with (
            httpx.AsyncClient(base_url=a.root, timeout=30) as first,
            httpx.AsyncClient(base_url=b.root, timeout=30) as second,
        ):
            assert (await first.post(CHAT_ROUTE, json=chat(), headers=KEY)).status_code == 200
            for _ in range(2):
                r = await second.post(CHAT_ROUTE, json=chat(stream=True), headers=KEY)
                assert r.status_code == 200
            samples = await scrape_until(first, "clawbot_requests_total", 3, **ok)
            samples = await scrape_until(first, "clawbot_backend_successes_total", 3, **deployment)
    assert value(samples, "clawbot_requests_total", **ok) == 3, "both processes' requests"
    assert value(samples, "clawbot_time_to_first_token_seconds_count", **timing) == 2
    assert value(samples, "clawbot_backend_successes_total", **deployment) == 3


@pytest.mark.slow
async def test_serve_with_two_workers_answers_for_both(tmp_path: Path) -> None:
    require_redis()
    config = {
        **MOCK_CONFIG,
        "model_server": {"workers": 2},
        "rate_limits": {"storage": REDIS_URL},
    }
    ok = {"route": CHAT_ROUTE, "model": "mock", "status": "200", "code": ""}
    sent = 12
    with serve(config, tmp_path) as server:
        for _ in range(sent):  # a connection each, so the kernel spreads them over the workers
            async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
                r = await client.post(CHAT_ROUTE, json=chat(), headers=KEY)
                assert r.status_code == 200
        for _ in range(4):  # whichever worker answers the scrape counts every worker's requests
            async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
                samples = await scrape_until(client, "clawbot_requests_total", sent, **ok)
            assert value(samples, "clawbot_requests_total", **ok) == sent
            assert (value(samples, "process_resident_memory_bytes") or 0) > 0
            assert value(samples, "process_max_fds") is None, "multiprocess mode leaves it out"


@pytest.mark.slow
async def test_in_process_engine_gauges() -> None:
    smol = {
        "id": "smol",
        "backend": "llamacpp:embedded",
        "context_length": 512,
        "options": {"slots": 3},
    }
    async with client_for(models=[smol]) as client:
        before = await scrape(client, headers=AUTH)
        body = chat("smol", max_tokens=4, temperature=0)
        assert (await client.post(CHAT_ROUTE, json=body, headers=AUTH)).status_code == 200
        after = await scrape(client, headers=AUTH)
    ids = {"model": "smol", "deployment": "default"}
    assert value(after, "clawbot_engine_loaded", **ids) == 1
    assert value(after, "clawbot_engine_slots", **ids) == 3
    assert value(after, "clawbot_engine_slots_busy", **ids) == 0
    assert value(after, "clawbot_engine_queue_depth", **ids) == 0
    steps = value(after, "clawbot_engine_decode_steps_total", **ids) or 0
    assert steps >= 4 + (value(before, "clawbot_engine_decode_steps_total", **ids) or 0)
    tokens = value(after, "clawbot_engine_batch_tokens_total", **ids) or 0
    assert tokens >= steps, "every step decodes at least one token"
    decode = value(after, "clawbot_engine_decode_seconds_total", **ids) or 0
    busy = value(after, "clawbot_engine_busy_seconds_total", **ids) or 0
    assert 0 < decode <= busy
