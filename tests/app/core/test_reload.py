"""Hot reload: edits to clawbot.json, SIGHUP and POST /admin/reload swap in a new gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.app import create_app
from app.config import ConfigError, load_config, parse_config
from app.core.gateway import Gateway
from app.core.reload import Reloader, changed_settings, settle
from backends.base import BackendSpec
from backends.mock import MockBackend
from tests.conftest import AUTH, MASTER_KEY, AppClient
from tests.services import REDIS_URL, require_redis
from tests.serving import Server, serve

POLL_S = 0.2
WAIT_S = 30.0


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the JSON config at `path` in place, replacing the file atomically as editors do."""
    config = json.loads(path.read_text())
    change(config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def records(server: Server) -> list[dict[str, Any]]:
    """The server's JSON log lines."""
    found = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def errors(server: Server) -> list[str]:
    return [r["message"] for r in records(server) if r["level"] == "ERROR"]


def model_ids(client: httpx.Client) -> set[str]:
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def reply(client: httpx.Client, model: str) -> str:
    r = client.post("/v1/chat/completions", json=chat(model), headers=AUTH)
    assert r.status_code == 200, r.text
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


def config_of(*models: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "auth": {"api_key": MASTER_KEY},
        "reload": {"poll_interval_s": POLL_S},
        "models": list(models),
        **sections,
    }


def mock(model_id: str, text: str, **options: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": "mock:", "options": {"reply": text, **options}}


# ---- real processes


@pytest.mark.slow
def test_editing_the_file_adds_changes_and_removes_models(tmp_path: Path) -> None:
    config = config_of(mock("a", "alpha"), mock("b", "bravo"))
    with serve(config, tmp_path) as server, httpx.Client(base_url=server.root, timeout=30) as c:
        path = tmp_path / "clawbot.json"
        assert model_ids(c) == {"a", "b"}

        edit(path, lambda cfg: cfg["models"].append(mock("c", "charlie")))
        wait_for(lambda: "c" in model_ids(c), "the added model to be listed")
        assert reply(c, "c") == "charlie"

        edit(path, lambda cfg: cfg["models"][0]["options"].update(reply="alpha two"))
        wait_for(lambda: reply(c, "a") == "alpha two", "the changed reply")

        edit(path, lambda cfg: cfg["models"].pop(1))
        wait_for(lambda: "b" not in model_ids(c), "the removed model to go")
        r = c.post("/v1/chat/completions", json=chat("b"), headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert reply(c, "c") == "charlie"
        assert errors(server) == []


@pytest.mark.slow
def test_sighup_and_admin_reload(tmp_path: Path) -> None:
    config = config_of(mock("a", "alpha"), reload={"watch": False, "poll_interval_s": POLL_S})
    with serve(config, tmp_path) as server, httpx.Client(base_url=server.root, timeout=30) as c:
        path = tmp_path / "clawbot.json"
        edit(path, lambda cfg: cfg["models"].append(mock("b", "bravo")))
        time.sleep(10 * POLL_S)
        assert model_ids(c) == {"a"}, "reload.watch is off: only SIGHUP or the API reload"

        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "b" in model_ids(c), "SIGHUP to add the model")
        assert reply(c, "b") == "bravo"

        def change(cfg: dict[str, Any]) -> None:
            cfg["models"] = [mock("a", "alpha"), mock("c", "charlie")]
            cfg["model_server"]["max_body_bytes"] = 1024

        edit(path, change)
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["object"] == "config.reload"
        assert (report["added"], report["removed"], report["changed"]) == (["c"], ["b"], [])
        assert report["rebuilt"] == ["c"]
        assert report["restart_required"] == ["model_server.max_body_bytes"]
        assert "restart to apply" in report["warnings"][0]
        warnings = [r["message"] for r in records(server) if r["level"] == "WARNING"]
        assert any("model_server.max_body_bytes" in w and "restart" in w for w in warnings)
        big = chat("a", metadata={"pad": "x" * 4096})
        assert c.post("/v1/chat/completions", json=big, headers=AUTH).status_code == 200

        path.write_text("{")
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 400
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_config"
        assert "the previous one keeps serving" in error["message"]
        assert model_ids(c) == {"a", "c"}
        assert c.post("/admin/reload").status_code == 401


@pytest.mark.slow
def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    require_redis()
    config = config_of(
        mock("a", "alpha"),
        reload={"watch": False},
        model_server={"workers": 2},
        rate_limits={"storage": REDIS_URL},
    )
    with serve(config, tmp_path) as server:
        edit(tmp_path / "clawbot.json", lambda cfg: cfg["models"].append(mock("b", "bravo")))
        server.process.send_signal(signal.SIGHUP)  # the supervisor passes it on to each worker
        applied = "reload (SIGHUP) applied"
        wait_for(lambda: server.log().count(applied) == 2, "both workers to reload")
        for _ in range(6):  # a new connection each time, to land on either worker
            with httpx.Client(base_url=server.root, timeout=30) as c:
                assert model_ids(c) == {"a", "b"}


@pytest.mark.slow
def test_an_invalid_file_keeps_the_old_config_serving(tmp_path: Path) -> None:
    with (
        serve(config_of(mock("a", "alpha")), tmp_path) as server,
        httpx.Client(base_url=server.root, timeout=30) as c,
    ):
        path = tmp_path / "clawbot.json"
        good = path.read_text()
        problems = [
            ('{"models": [', "clawbot.json: "),
            (good.replace('"backend"', '"bogus": 1, "backend"'), "unknown key 'models[0].bogus'"),
            (good.replace('"mock:"', '"nope:"'), "unknown backend 'nope:'"),
            (good.replace('"reply"', '"token_delay_ms": -1, "reply"'), "token_delay_ms"),
        ]
        for count, (text, expected) in enumerate(problems, start=1):
            tmp = path.with_name("next.json")
            tmp.write_text(text)
            os.replace(tmp, path)
            found = wait_for(lambda n=count: len(errors(server)) >= n, f"error {count}")
            assert found
            line = errors(server)[count - 1]
            assert "rejected, the previous config keeps serving" in line, line
            assert expected in line, line
            assert reply(c, "a") == "alpha"
        time.sleep(5 * POLL_S)
        assert len(errors(server)) == len(problems), "each problem is logged once, not per poll"

        edit_text = good.replace("alpha", "alpha again")
        path.write_text(edit_text)
        wait_for(lambda: reply(c, "a") == "alpha again", "a valid edit to apply")


@pytest.mark.slow
def test_a_stream_in_flight_finishes_on_the_old_config(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(50)]
    slow = mock("slow", " ".join(words), token_delay_ms=120)  # 6 s
    config = config_of(slow, reload={"watch": False})
    with serve(config, tmp_path) as server, httpx.Client(base_url=server.root, timeout=60) as c:
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = chat("slow", stream=True)
            with httpx.stream(
                "POST", f"{server.root}/v1/chat/completions", json=body, headers=AUTH, timeout=60
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(WAIT_S)

        def change(cfg: dict[str, Any]) -> None:
            cfg["models"] = [mock("slow", "new")]

        edit(tmp_path / "clawbot.json", change)
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["changed"] == ["slow"]
        assert reply(c, "slow") == "new"
        received, retired = len(events), "previous config retired" in server.log()
        assert received < len(words) - 10, "the stream should still be running"
        assert not retired, "the old backends must stay open while the stream uses them"

        reader.join(WAIT_S)
        assert not reader.is_alive()
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(
            ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]
        )
        assert text == " ".join(words)
        assert not any("error" in ch for ch in chunks)
        wait_for(lambda: "previous config retired: 1 backend" in server.log(), "the old backend")
        assert errors(server) == []


# ---- in process


class Recording(MockBackend):
    """A mock backend that notes its start and close; option `reply: "explode"` fails start."""

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.starts = 0
        self.closed = False

    async def start(self) -> None:
        if self.options.reply == "explode":
            raise RuntimeError("the weights are corrupt")
        self.starts += 1
        await super().start()

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(json.dumps({"database": {"url": "sqlite+aiosqlite://"}, **config}))


BASE = config_of(
    mock("kept", "k"),
    {**mock("aliased", "a"), "aliases": ["first"]},
    {
        "id": "pooled",
        "routing": {"strategy": "weighted_round_robin"},
        "deployments": [
            {"name": "one", "backend": "mock:", "weight": 1},
            {"name": "two", "backend": "mock:", "weight": 1},
        ],
    },
    mock("changed", "before"),
    mock("gone", "g"),
    reload={"watch": False},  # these tests reload explicitly
)


@pytest.fixture
def built() -> list[Recording]:
    """Every backend the reloader fixture's factories built."""
    return []


@pytest.fixture
async def reloader(tmp_path: Path, built: list[Recording]) -> AsyncIterator[Reloader]:
    def factory(spec: BackendSpec) -> Recording:
        built.append(Recording(spec))
        return built[-1]

    factories: dict[str, Any] = {"mock": factory}
    path = tmp_path / "clawbot.json"
    write(path, BASE)
    gateway = Gateway.from_config(load_config(path), factories=factories)
    running = Reloader(gateway, path, factories=factories)
    await running.start()
    try:
        yield running
    finally:
        await running.aclose()


def backend(gateway: Gateway, model: str, index: int = 0) -> Recording:
    found = gateway.names[model].backends[index]
    assert isinstance(found, Recording)
    return found


async def settled(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_unchanged_models_keep_their_backends(reloader: Reloader, tmp_path: Path) -> None:
    old = reloader.current
    kept, aliased = backend(old, "kept"), backend(old, "aliased")
    pooled = [backend(old, "pooled", i) for i in (0, 1)]
    changed, gone = backend(old, "changed"), backend(old, "gone")
    models = BASE["models"]
    new_models = [
        models[0],
        {**models[1], "aliases": ["second"], "limits": {"requests_per_minute": 5}},
        {**models[2], "deployments": [{**d, "weight": 3} for d in models[2]["deployments"]]},
        mock("changed", "after"),
        mock("added", "new"),
    ]
    write(tmp_path / "clawbot.json", {**BASE, "models": new_models})

    report = await reloader.reload("test")

    new = reloader.current
    assert new is not old
    assert (report.added, report.removed) == (["added"], ["gone"])
    assert report.changed == ["aliased", "pooled", "changed"]
    assert report.rebuilt == ["changed", "added"]
    assert new.names["kept"] is old.names["kept"], "an unchanged model is kept whole"
    assert backend(new, "kept") is kept
    assert kept.starts == 1
    assert backend(new, "aliased") is aliased
    assert aliased.starts == 1
    assert new.names["aliased"].pool is old.names["aliased"].pool, "same routing: same pool"
    assert "second" in new.names
    assert "first" not in new.names
    assert [backend(new, "pooled", i) for i in (0, 1)] == pooled
    assert new.names["pooled"].pool is not old.names["pooled"].pool, "weights changed"
    assert [d.weight for d in new.names["pooled"].pool.deployments] == [3, 3]
    assert backend(new, "changed") is not changed
    assert backend(new, "changed").starts == 1
    assert (new.db, new.keys, new.key_cache, new.limiter) == (
        old.db,
        old.keys,
        old.key_cache,
        old.limiter,
    )
    assert new.audit is old.audit
    await settled(lambda: changed.closed and gone.closed)
    assert not any(b.closed for b in (kept, aliased, *pooled))
    assert all(served.ready for served in new.models)


async def test_old_backends_close_only_after_requests_in_flight(
    reloader: Reloader, tmp_path: Path
) -> None:
    old = reloader.current
    changed = backend(old, "changed")
    old.in_flight += 1  # a request still being served by the old gateway
    write(tmp_path / "clawbot.json", {**BASE, "models": BASE["models"][:3]})
    await reloader.reload("test")
    await asyncio.sleep(0.3)
    assert not changed.closed
    old.in_flight -= 1
    await settled(lambda: changed.closed)


async def test_reloads_chain_their_draining(reloader: Reloader, tmp_path: Path) -> None:
    first = reloader.current
    kept = backend(first, "kept")
    first.in_flight += 1
    write(tmp_path / "clawbot.json", {**BASE, "models": BASE["models"][1:]})  # drops 'kept'
    await reloader.reload("one")
    write(tmp_path / "clawbot.json", {**BASE, "models": BASE["models"][2:]})
    await reloader.reload("two")
    await asyncio.sleep(0.3)
    assert not kept.closed, "the first gateway still serves a request on it"
    first.in_flight -= 1
    await settled(lambda: kept.closed)


async def test_a_backend_that_fails_to_start_rejects_the_reload(
    reloader: Reloader, tmp_path: Path, built: list[Recording], caplog: pytest.LogCaptureFixture
) -> None:
    old = reloader.current
    models = [*BASE["models"], mock("fresh", "fine"), mock("bad", "explode")]
    write(tmp_path / "clawbot.json", {**BASE, "models": models})
    with pytest.raises(ConfigError, match="the weights are corrupt"):
        await reloader.reload("test")
    assert reloader.current is old
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.levelname == "ERROR"
    assert "rejected, the previous config keeps serving" in line.getMessage()
    fresh = [b for b in built if b.name in ("fresh", "bad")]
    assert len(fresh) == 2
    assert all(b.closed for b in fresh), "the new backends are closed"
    assert not any(b.closed for served in old.models for b in served.backends)
    assert all(served.ready for served in old.models)


async def test_a_bad_file_changes_nothing(
    reloader: Reloader, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = reloader.current
    write(tmp_path / "clawbot.json", {**BASE, "rate_limits": {"on_storage_error": "sideways"}})
    with pytest.raises(ConfigError, match=r"rate_limits\.on_storage_error"):
        await reloader.reload("test")
    assert reloader.current is old
    logged = [r for r in caplog.records if r.name == "clawbot.reload"]
    assert [r.levelname for r in logged if r.levelno >= logging.WARNING] == ["ERROR"]


async def test_nothing_changed_is_not_a_swap(reloader: Reloader) -> None:
    old = reloader.current
    report = await reloader.reload("test")
    assert reloader.current is old
    assert (report.added, report.changed, report.settings) == ([], [], [])


async def test_live_settings_reach_the_shared_parts(reloader: Reloader, tmp_path: Path) -> None:
    old = reloader.current
    write(
        tmp_path / "clawbot.json",
        {
            **BASE,
            "auth": {"api_key": "sk-new-master", "key_cache_poll_s": 0.5},
            "rate_limits": {"on_storage_error": "closed", "timeout_s": 0.1},
            "audit": {"batch_size": 7},
        },
    )
    report = await reloader.reload("test")
    new = reloader.current
    assert report.settings == [
        "auth.api_key",
        "auth.key_cache_poll_s",
        "rate_limits.on_storage_error",
        "rate_limits.timeout_s",
        "audit.batch_size",
    ]
    assert new.key_cache is old.key_cache
    assert new.key_cache.poll_interval_s == 0.5
    assert new.limiter.on_storage_error == "closed"
    assert new.limiter.timeout == 0.1
    assert new.audit is not None
    assert new.audit is not old.audit, "a new batch size: a new writer"
    assert new.config.auth.api_key == "sk-new-master"


def test_settle_keeps_what_only_a_restart_applies(tmp_path: Path) -> None:
    path = tmp_path / "clawbot.json"
    write(path, BASE)
    running = load_config(path)
    write(
        path,
        {
            **BASE,
            "model_server": {"port": 9999, "workers": 2},
            "database": {"url": "sqlite+aiosqlite:///other.db"},
            "policies": {"ip_allowlist": {"admin": ["10.0.0.0/8"], "api": ["10.0.0.0/8"]}},
            "logging": {"level": "DEBUG"},
        },
    )
    edited = load_config(path)
    config, kept = settle(running, edited)
    assert kept == [
        "model_server.port",
        "model_server.workers",
        "database.url",
        "policies.ip_allowlist.admin",
    ]
    assert config.model_server == running.model_server
    assert config.database == running.database
    assert config.policies.ip_allowlist.admin == ()
    assert config.policies.ip_allowlist.api == ("10.0.0.0/8",)
    assert changed_settings(running, config) == ["logging.level", "policies.ip_allowlist"]


def test_turning_auth_off_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "clawbot.json"
    write(path, BASE)
    running = load_config(path)
    write(path, {**BASE, "auth": {"api_key": ""}})
    config, kept = settle(running, load_config(path))
    assert kept == ["auth.api_key"]
    assert config.auth.api_key == MASTER_KEY


async def test_admin_reload_in_process(tmp_path: Path) -> None:
    path = tmp_path / "clawbot.json"
    unwatched = {"watch": False}
    write(path, config_of(mock("a", "alpha"), reload=unwatched))
    app = create_app(Gateway.from_config(load_config(path)), config_path=path)
    async with AppClient(app) as client:
        write(path, config_of(mock("a", "alpha"), mock("b", "bravo"), reload=unwatched))
        r = await client.post("/admin/reload", headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401
        r = await client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["added"] == ["b"]
        r = await client.post("/v1/chat/completions", json=chat("b"), headers=AUTH)
        assert r.json()["choices"][0]["message"]["content"] == "bravo"
        r = await client.get("/admin/backends", headers=AUTH)
        assert [m["model"] for m in r.json()["data"]] == ["a", "b"]
        r = await client.get("/metrics", headers=AUTH)
        assert 'clawbot_backend_info{backend="mock:",deployment="default",model="b"}' in r.text


async def test_admin_reload_without_a_config_file() -> None:
    config = parse_config({"database": {"url": "sqlite+aiosqlite://"}, **config_of(mock("a", "x"))})
    async with AppClient(create_app(Gateway.from_config(config))) as client:
        r = await client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 400
        assert "no config file" in r.json()["error"]["message"]
