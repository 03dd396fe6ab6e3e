"""The gateway's log: JSON and text lines, request ids, rotation, redaction, the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.api.app import create_app
from app.config import Config, ConfigError, parse_config
from app.core.gateway import Gateway
from app.ledger.exchange import Exchange, log_access
from app.ledger.storage.schema import AuditRecord
from app.logs import (
    ACCESS_LOGGER,
    REDACTED,
    REQUEST_ID,
    SharedRotatingFileHandler,
    setup_logging,
)
from policies.context import RequestContext
from tests.conftest import AUTH, MASTER_KEY, AppClient
from tests.services import REDIS_URL, require_redis
from tests.serving import serve

PROMPT = "the-secret-prompt-purple-elephant-7731"
CHAT_MODEL = {"id": "mock", "backend": "mock:"}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": PROMPT}]}
POOL = {
    "id": "flaky",
    "deployments": [
        {"name": "bad", "backend": "mock:", "options": {"fail_with": "server_error"}},
        {"name": "good", "backend": "mock:"},
    ],
}
log = logging.getLogger("clawbot.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`setup_logging` rewires process-wide loggers: put them back after each test."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.asgi", ACCESS_LOGGER, "httpx", "aiosqlite"]
    saved = {
        name: (lg.handlers[:], lg.level, lg.propagate)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def config_with(tmp_path: Path, **settings: Any) -> Config:
    """The test config (mock models, master key) logging with `settings`."""
    return parse_config(
        {
            "auth": {"api_key": MASTER_KEY},
            "database": {"url": "sqlite+aiosqlite://"},  # in memory
            "logging": {"path": str(tmp_path / "clawbot.log"), **settings},
            "models": [CHAT_MODEL, POOL],
        }
    )


def install(tmp_path: Path, **settings: Any) -> tuple[Config, Path]:
    config = config_with(tmp_path, **settings)
    setup_logging(config)
    return config, Path(config.logging.path)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def log_files(path: Path) -> list[Path]:
    """The log file and its rotated copies."""
    return list(path.parent.glob(f"{path.name}*"))


def access(path: Path) -> list[dict[str, Any]]:
    return [r for r in records(path) if r["logger"] == ACCESS_LOGGER]


ClientFactory = Callable[[Config], AppClient]


# ---- JSON lines and the request id


async def test_json_lines_carry_the_request_id(tmp_path: Path, make_client: ClientFactory) -> None:
    config, path = install(tmp_path)
    async with make_client(config) as client:
        traced = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "flaky"},
            headers={**AUTH, "x-request-id": "trace-flaky-1"},
        )
        assert traced.status_code == 200
        plain = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        missing = await client.get("/v1/models/nope", headers=AUTH)
    assert missing.status_code == 404
    got = records(path)
    for r in got:
        assert set(r) >= {"ts", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]), r["ts"]
    startup = next(r for r in got if "ready" in r["message"])
    assert "request_id" not in startup  # logged outside any request
    failover = next(r for r in got if "deployment bad failed" in r["message"])
    assert failover["level"] == "WARNING"
    assert failover["request_id"] == "trace-flaky-1"

    by_id = {r["request_id"]: r for r in access(path)}
    assert len(by_id) == 3
    flaky = by_id["trace-flaky-1"]
    assert flaky["message"].startswith("POST /v1/chat/completions 200 ")
    assert flaky["model"] == "flaky"
    assert flaky["backend"] == "mock:"
    assert flaky["key_id"] == "master"
    assert flaky["client_ip"]
    assert flaky["stream"] is False
    assert flaky["error"] is None
    assert flaky["latency_ms"] > 0
    assert flaky["prompt_tokens"] > 0
    assert flaky["completion_tokens"] > 0
    ok = by_id[plain.headers["x-request-id"]]
    assert (ok["method"], ok["path"], ok["status"], ok["model"]) == (
        "POST",
        "/v1/chat/completions",
        200,
        "mock",
    )
    nope = by_id[missing.headers["x-request-id"]]
    assert (nope["method"], nope["status"], nope["error"]) == ("GET", 404, "model_not_found")
    assert REQUEST_ID.get() is None  # the request's id does not outlive it


async def test_access_line_of_a_stream_has_ttft(tmp_path: Path, make_client: ClientFactory) -> None:
    config, path = install(tmp_path)
    async with make_client(config) as client:
        r = await client.post("/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        assert r.status_code == 200
    (line,) = access(path)
    assert line["path"] == "/v1/chat/completions"  # normalized
    assert line["stream"] is True
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


TOKEN_DELAY_MS = 150
SLOW_MODEL = {
    "id": "slow",
    "backend": "mock:",
    "options": {"reply": "one two", "token_delay_ms": TOKEN_DELAY_MS},
}
USER = [{"role": "user", "content": "hi"}]
STREAMS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "slow", "messages": USER},
    "/v1/completions": {"model": "slow", "prompt": "hi"},
    "/v1/responses": {"model": "slow", "input": "hi"},
    "/v1/messages": {"model": "slow", "messages": USER, "max_tokens": 16},
}


async def test_ttft_is_the_first_token_on_every_streaming_api(tmp_path: Path) -> None:
    """The mock sends its role chunk at once and each token after a delay: TTFT is the first
    token's time (a Responses stream's `response.created` and the role chunk come earlier),
    the same in the access line, the audit row and the histogram."""
    config = parse_config(
        {
            **msgspec.to_builtins(config_with(tmp_path)),
            "models": [CHAT_MODEL, SLOW_MODEL],
        }
    )
    path = Path(config.logging.path)
    setup_logging(config)
    gateway = Gateway.from_config(config)
    async with AppClient(create_app(gateway)) as client:
        for route, payload in STREAMS.items():
            r = await client.post(route, json={**payload, "stream": True}, headers=AUTH)
            assert r.status_code == 200, r.text
        scraped = (await client.get("/metrics", headers=AUTH)).text
        await gateway.audit.aclose(timeout_s=5)
        async with gateway.db.session() as session:
            rows = (await session.execute(select(AuditRecord))).scalars().all()
    lines = {line["path"]: line for line in access(path)}
    audited = {row.route: row for row in rows}
    histogram = {
        (s.name, s.labels.get("route")): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
        if s.name.startswith("clawbot_time_to_first_token_seconds_")
    }
    for route in STREAMS:
        line = lines[route]
        assert TOKEN_DELAY_MS <= line["ttft_ms"] < line["latency_ms"], route
        assert audited[route].ttft_ms == pytest.approx(line["ttft_ms"], abs=0.01), route
        count = histogram[("clawbot_time_to_first_token_seconds_count", route)]
        seconds = histogram[("clawbot_time_to_first_token_seconds_sum", route)]
        assert count == 1, route
        assert seconds == pytest.approx(line["ttft_ms"] / 1000, abs=1e-4), route


def finished_exchange(path: str = "/v1/chat/completions") -> Exchange:
    exchange = Exchange(
        started=time.perf_counter() - 0.05,
        route=path,
        request_id="req_same",
        method="POST",
        client_ip="10.0.0.9",
        backend="mock:",
        stream=True,
        prompt_tokens=3,
        completion_tokens=5,
        status=200,
    )
    exchange.first_token_at = exchange.started + 0.01
    exchange.finished_at = exchange.started + 0.05
    exchange.ctx = RequestContext(
        request_id="req_same", client_ip="10.0.0.9", route=path, credential=None, model="mock"
    )
    return exchange


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_access_line_is_the_same_whoever_else_listens(tmp_path: Path, fmt: str) -> None:
    _, path = install(tmp_path, format=fmt)
    exchange = finished_exchange("/v1/models/sk-clawbot-leaked")
    log_access(exchange)  # written straight through clawbot's handler
    heard: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = heard.append  # type: ignore[method-assign]
    logging.getLogger(ACCESS_LOGGER).addHandler(listener)
    log_access(exchange)  # a record: it reaches the listener, and the file
    direct, through_logging = lines(path)
    assert len(heard) == 1
    assert heard[0].getMessage() == f"POST /v1/models/{REDACTED} 200 50.0ms"
    stamp = r"^\S+ \S+ " if fmt == "text" else r'^\{"ts":"[^"]+",'
    assert re.sub(stamp, "", direct) == re.sub(stamp, "", through_logging)
    assert "sk-clawbot-leaked" not in direct
    assert REDACTED in direct


def test_access_lines_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(config_with(tmp_path, path=""))
    log_access(finished_exchange())
    record = json.loads(capsys.readouterr().err)
    assert (record["logger"], record["request_id"], record["status"]) == (
        ACCESS_LOGGER,
        "req_same",
        200,
    )
    assert (record["ttft_ms"], record["latency_ms"]) == (10.0, 50.0)


async def test_access_log_off(tmp_path: Path, make_client: ClientFactory) -> None:
    config, path = install(tmp_path, access_log=False)
    async with make_client(config) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)).is_success
    assert records(path)  # start-up lines
    assert access(path) == []


def test_exception_text(tmp_path: Path) -> None:
    _, path = install(tmp_path)
    token = REQUEST_ID.set("req_in_flight")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("dividing failed")
    finally:
        REQUEST_ID.reset(token)
    (line,) = lines(path)  # the traceback stays on the one line
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["message"] == "dividing failed"
    assert record["request_id"] == "req_in_flight"
    assert record["exception"].startswith("Traceback")
    assert "ZeroDivisionError: division by zero" in record["exception"]


def test_uvicorn_logs_through_the_same_handler(tmp_path: Path) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(logging.NullHandler())
    uvicorn_error.propagate = False
    _, path = install(tmp_path)
    uvicorn_error.info("Started server process [%d]", 42)
    (record,) = records(path)
    assert record["logger"] == "uvicorn.error"
    assert record["message"] == "Started server process [42]"


# ---- text format and levels


def test_text_format(tmp_path: Path) -> None:
    _, path = install(tmp_path, format="text")
    log.warning("disk %s is %d%% full", "/var", 93)
    token = REQUEST_ID.set("req_abc")
    log.info("within a request")
    REQUEST_ID.reset(token)
    first, second = lines(path)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"{stamp} WARNING clawbot\.test: disk /var is 93% full", first), first
    assert re.fullmatch(rf"{stamp} INFO clawbot\.test: within a request request_id=req_abc", second)


async def test_text_access_line(tmp_path: Path, make_client: ClientFactory) -> None:
    config, path = install(tmp_path, format="text")
    async with make_client(config) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    (line,) = [x for x in lines(path) if f" {ACCESS_LOGGER}: " in x]
    rid = r.headers["x-request-id"]
    assert "INFO clawbot.access: POST /v1/chat/completions 200 " in line
    for part in (f"request_id={rid}", "status=200", "model=mock", "key_id=master"):
        assert part in line.split(), (part, line)
    for part in ("stream=false", "ttft_ms=-", "error=-"):
        assert part in line.split(), (part, line)


@pytest.mark.parametrize(
    ("level", "expected"),
    [("WARNING", ["warning", "error"]), ("DEBUG", ["debug", "info", "warning", "error"])],
)
def test_level_filtering(tmp_path: Path, level: str, expected: list[str]) -> None:
    _, path = install(tmp_path, level=level)
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    log.error("error")
    assert [r["message"] for r in records(path)] == expected


async def test_a_level_above_info_drops_access_lines(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    config, path = install(tmp_path, level="WARNING")
    async with make_client(config) as client:
        await client.post("/v1/chat/completions", json={**CHAT, "model": "flaky"}, headers=AUTH)
    assert [r["logger"] for r in records(path)] == ["clawbot.routing"]  # the failover warning


def test_chatty_libraries_are_quieted(tmp_path: Path) -> None:
    _, path = install(tmp_path, level="DEBUG")
    logging.getLogger("httpx").info('HTTP Request: POST http://up/v1/chat "HTTP/1.1 200 OK"')
    logging.getLogger("aiosqlite").debug("executing INSERT ...")
    logging.getLogger("httpx").warning("kept")
    assert [r["message"] for r in records(path)] == ["kept"]


def test_stderr_when_no_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(config_with(tmp_path, path=""))
    log.warning("to stderr")
    captured = capsys.readouterr()
    assert json.loads(captured.err)["message"] == "to stderr"
    assert captured.out == ""
    assert not (tmp_path / "clawbot.log").exists()


def test_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"logging\.path: cannot open .*No such file"):
        setup_logging(config_with(tmp_path, path=str(tmp_path / "missing" / "x.log")))


def test_relative_path_is_next_to_the_config(tmp_path: Path) -> None:
    from app.config import load_config

    (tmp_path / "clawbot.json").write_text(
        json.dumps({"logging": {"path": "gw.log"}, "models": [CHAT_MODEL]})
    )
    setup_logging(load_config(tmp_path / "clawbot.json", environ={}))
    log.warning("here")
    assert json.loads((tmp_path / "gw.log").read_text())["message"] == "here"


def test_setting_up_again_replaces_the_handler(tmp_path: Path) -> None:
    _, first = install(tmp_path)
    second = tmp_path / "other.log"
    setup_logging(config_with(tmp_path, path=str(second)))
    log.warning("once")
    assert lines(first) == []
    assert len(lines(second)) == 1


# ---- rotation


def numbered(count: int, width: int = 80) -> list[str]:
    return [f"line {i:05d} " + "x" * width for i in range(count)]


def test_rotation_at_max_bytes(tmp_path: Path) -> None:
    _, path = install(tmp_path, format="text", max_bytes=2000, backup_count=2)
    for text in numbered(100):
        log.warning(text)
    files = [path, *(path.with_name(f"{path.name}.{i}") for i in (1, 2))]
    assert all(f.exists() for f in files)
    assert not path.with_name(f"{path.name}.3").exists()
    assert all(0 < f.stat().st_size <= 2000 for f in files)
    kept = [int(line.split()[5]) for f in reversed(files) for line in lines(f)]
    assert kept == list(range(kept[0], 100))  # oldest dropped, nothing reordered
    assert len(kept) >= 20


def test_no_backups_starts_over(tmp_path: Path) -> None:
    _, path = install(tmp_path, max_bytes=1500, backup_count=0)
    for text in numbered(50):
        log.warning(text)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("clawbot.log")] == [
        "clawbot.log"
    ]
    assert 0 < path.stat().st_size <= 1500
    assert records(path)[-1]["message"] == numbered(50)[-1]


def test_max_bytes_zero_never_rotates(tmp_path: Path) -> None:
    _, path = install(tmp_path, max_bytes=0, backup_count=3)
    for text in numbered(200):
        log.warning(text)
    assert len(lines(path)) == 200
    assert not path.with_name("clawbot.log.1").exists()


def test_file_moved_away_is_reopened(tmp_path: Path) -> None:
    config = config_with(tmp_path, max_bytes=0)
    handler = setup_logging(config)
    assert isinstance(handler, SharedRotatingFileHandler)
    handler.path_check_s = 0.2
    path = Path(config.logging.path)
    log.warning("before")
    path.rename(tmp_path / "clawbot.log.old")  # what logrotate does
    time.sleep(0.3)
    log.warning("after")
    assert [r["message"] for r in records(tmp_path / "clawbot.log.old")] == ["before"]
    assert [r["message"] for r in records(path)] == ["after"]


_WRITER = """
import logging, sys
from app.config import parse_config
from app.logs import setup_logging
path, name = sys.argv[1], sys.argv[2]
config = parse_config({"logging": {"path": path, "format": "text", "max_bytes": 6000,
                       "backup_count": 200}, "models": [{"id": "m", "backend": "mock:"}]})
setup_logging(config)
for i in range(1000):
    logging.getLogger("w").warning("%s %05d %s", name, i, "y" * 60)
"""


def test_worker_processes_share_rotation(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), str(path), f"w{n}"],
            cwd=Path(__file__).parents[2],
        )
        for n in range(3)
    ]
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    files = list(tmp_path.glob("shared.log*"))
    assert len(files) > 5
    seen = sorted(line.split(": ", 1)[1].rsplit(" ", 1)[0] for f in files for line in lines(f))
    assert seen == sorted(f"w{n} {i:05d}" for n in range(3) for i in range(1000))  # all, once
    line_bytes = len(lines(path)[0]) + 1
    assert all(f.stat().st_size <= 6000 + 2 * line_bytes for f in files)


# ---- redaction


def test_keys_tokens_and_secrets_are_redacted(tmp_path: Path) -> None:
    config = parse_config(
        {
            "auth": {"api_key": "master-Key-5f4dcc3b", "token_secret": "hmac-secret-0a1b2c"},
            "logging": {"path": str(tmp_path / "clawbot.log")},
            "models": [
                {"id": "m", "backend": "http://up:8000/v1", "options": {"api_key": "up-key-1"}},
                {
                    "id": "p",
                    "deployments": [{"backend": "mock:", "api_key": "dep-key-2"}],
                },
            ],
        }
    )
    setup_logging(config)
    key = "sk-clawbot-" + "Ab3_-" * 8 + "xyz"
    token = "tok-clawbot-eyJrIjoia2V5XzEifQ.c2lnbmF0dXJl"
    log.warning("key %s, token %s", key, token)
    log.warning("master-Key-5f4dcc3b hmac-secret-0a1b2c up-key-1 dep-key-2")
    try:
        raise RuntimeError(f"upstream refused {key}")
    except RuntimeError:
        log.exception("call failed")
    log.info("access", extra={"fields": {"path": f"/v1/models/{key}", "status": 404}})
    text = (tmp_path / "clawbot.log").read_text()
    for secret in (key, token, "master-Key", "hmac-secret", "up-key-1", "dep-key-2", "Ab3_-"):
        assert secret not in text, secret
    got = records(tmp_path / "clawbot.log")
    assert got[0]["message"] == f"key {REDACTED}, token {REDACTED}"
    assert got[1]["message"] == " ".join([REDACTED] * 4)
    assert f"RuntimeError: upstream refused {REDACTED}" in got[2]["exception"]
    assert got[3]["path"] == f"/v1/models/{REDACTED}"
    assert got[3]["status"] == 404


def test_upstream_key_from_the_environment_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGS_TEST_UPSTREAM_KEY", "env-upstream-key-77")
    config = parse_config(
        {
            "logging": {"path": str(tmp_path / "clawbot.log")},
            "models": [
                {
                    "id": "m",
                    "deployments": [{"backend": "mock:", "api_key_env": "LOGS_TEST_UPSTREAM_KEY"}],
                }
            ],
        }
    )
    setup_logging(config)
    log.warning("sent env-upstream-key-77")
    assert records(tmp_path / "clawbot.log")[0]["message"] == f"sent {REDACTED}"


# ---- a real server


def _wait_for(path: Path, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = access(path)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return access(path)


@pytest.mark.slow
async def test_real_server_logs_one_access_line_per_request(tmp_path: Path) -> None:
    master = "master-key-for-the-logs-test-8d7c"
    config = {
        "auth": {"api_key": master},
        "logging": {"path": "gateway.log", "level": "DEBUG"},
        "models": [
            CHAT_MODEL,
            POOL,
            {"id": "down", "backend": "mock:", "options": {"fail_with": "unavailable"}},
            {"id": "broken", "backend": "mock:", "options": {"fail_after_tokens": 2}},
        ],
    }
    master_auth = {"Authorization": f"Bearer {master}"}
    seen: list[str] = []
    bogus = "sk-clawbot-" + "Q" * 43
    with serve(config, tmp_path) as server:
        path = tmp_path / "gateway.log"
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:

            async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
                r = await client.request(method, url, **kwargs)
                seen.append(r.headers["x-request-id"])
                return r

            r = await call("POST", "/admin/keys", json={"name": "logs"}, headers=master_auth)
            key = r.json()["key"]
            keyed = {"Authorization": f"Bearer {key}"}
            r = await call("POST", "/v1/auth/token", headers=keyed)
            token = r.json()["token"]
            tokened = {"Authorization": f"Bearer {token}"}
            r = await call("POST", "/v1/chat/completions", json=CHAT, headers=keyed)
            assert PROMPT in r.text  # the mock echoes it: it went through, and back
            r = await call(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=tokened
            )
            assert r.status_code == 200
            r = await call(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "model": "flaky"},
                headers={**keyed, "x-request-id": "client-trace-7"},
            )
            assert r.status_code == 200
            r = await call(
                "POST", "/v1/chat/completions", json={**CHAT, "model": "down"}, headers=keyed
            )
            assert r.status_code == 503
            r = await call(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "model": "broken", "stream": True},
                headers=keyed,
            )
            assert "error" in r.text
            r = await call("POST", "/v1/chat/completions", json=CHAT, headers={"x-api-key": bogus})
            assert r.status_code == 401
            r = await call("GET", "/health")
            assert r.status_code == 200
        assert len(_wait_for(path, len(seen))) >= len(seen)
    assert "client-trace-7" in seen
    lines_seen = access(path)  # after shutdown: nothing more to come
    assert sorted(r["request_id"] for r in lines_seen) == sorted(seen)
    statuses = {r["request_id"]: r["status"] for r in lines_seen}
    assert statuses["client-trace-7"] == 200
    assert sorted(statuses.values()) == [200, 200, 200, 200, 200, 200, 201, 401, 503]
    everything = records(path)  # every line is JSON
    assert any(r["logger"] == "uvicorn.error" for r in everything)
    failover = [r for r in everything if "deployment bad failed" in r["message"]]
    assert [r["request_id"] for r in failover] == ["client-trace-7"]
    text = path.read_text() + server.log()
    for secret in (key, token, master, bogus, PROMPT):
        assert secret not in text
    assert "serving on http://" in server.log()
    assert '"logger"' not in server.log()  # logs went to the file, not stdout/stderr


@pytest.mark.slow
async def test_workers_share_the_log_file_and_its_rotation(tmp_path: Path) -> None:
    require_redis()  # several workers need shared rate-limit storage
    config = {
        "model_server": {"workers": 2},
        "auth": {"api_key": MASTER_KEY},
        "rate_limits": {"storage": REDIS_URL},
        "logging": {"path": "gateway.log", "max_bytes": 3000, "backup_count": 500},
        "models": [CHAT_MODEL],
    }
    with serve(config, tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:

            async def one() -> str:
                r = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
                assert r.status_code == 200
                return r.headers["x-request-id"]

            seen = []
            for _ in range(10):
                seen += await asyncio.gather(*(one() for _ in range(8)))
    files = log_files(tmp_path / "gateway.log")
    assert len(files) > 5  # rotated, by both workers
    got = [r["request_id"] for f in files for r in access(f)]
    assert sorted(got) == sorted(seen)  # each request once: none lost, none doubled
    longest = max(len(line) for f in files for line in lines(f)) + 1
    assert all(f.stat().st_size <= 3000 + 2 * longest for f in files)
