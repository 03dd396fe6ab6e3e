"""Routing through the app: pools of mock deployments, failover, fallbacks across models."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

from app.api.app import create_app
from app.core.gateway import Gateway
from tests.conftest import AUTH, AppClient, make_config


def client_for(models: list[dict[str, Any]], gateway: Gateway | None = None) -> AppClient:
    gateway = gateway or Gateway.from_config(make_config(models))
    return AppClient(create_app(gateway))


def failing(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "mock:", "options": {"fail_with": kind}, **extra}


def ok(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "mock:", "options": {"reply": f"from {name}"}, **extra}


def chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def events(text: str) -> list[Any]:
    out = []
    for block in text.strip().split("\n\n"):
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def streamed_text(text: str) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events(text)
        if isinstance(e, dict) and e.get("choices")
    )


async def backends(client: AppClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/admin/backends", headers=AUTH)
    assert r.status_code == 200
    return {
        f"{pool['model']}/{d['name']}": d for pool in r.json()["data"] for d in pool["deployments"]
    }


async def test_a_failing_primary_fails_over_to_the_backup() -> None:
    pool = {
        "id": "m",
        "deployments": [failing("unavailable", "primary"), ok("backup", priority=1)],
    }
    async with client_for([pool]) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "from backup"
        assert r.headers["x-clawbot-backend"] == "m/backup"
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
        assert r.status_code == 200
        assert streamed_text(r.text) == "from backup"
        assert r.headers["x-clawbot-backend"] == "m/backup"
        state = await backends(client)
        assert state["m/primary"]["total_failures"] == 2
        assert state["m/backup"]["total_successes"] == 2


async def test_the_breaker_takes_a_failing_primary_out() -> None:
    pool = {
        "id": "m",
        "routing": {"failures_to_trip": 2, "cooldown_s": 60},
        "deployments": [failing("server_error", "primary"), ok("backup", priority=1)],
    }
    async with client_for([pool]) as client:
        for _ in range(4):
            r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
            assert r.status_code == 200
        state = await backends(client)
        assert state["m/primary"]["state"] == "open"
        assert state["m/primary"]["total_failures"] == 2, "no traffic while cooling down"
        assert state["m/primary"]["cooldown_remaining_s"] > 50
        assert state["m/backup"]["total_successes"] == 4


async def test_a_pool_with_nothing_healthy_answers_503_with_retry_after() -> None:
    pool = {
        "id": "m",
        "routing": {"failures_to_trip": 1, "cooldown_s": 20},
        "deployments": [failing("unavailable", "a"), failing("timeout", "b")],
    }
    async with client_for([pool]) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 504, "the last attempt's error is the answer"
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "no_healthy_backend"
        assert set(error) == {"message", "type", "param", "code"}
        assert r.headers["retry-after"] == "20"


async def test_client_errors_are_not_failed_over() -> None:
    pool = {
        "id": "m",
        "deployments": [failing("context_length", "primary"), ok("backup", priority=1)],
    }
    async with client_for([pool]) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert (await backends(client))["m/primary"]["total_failures"] == 0


async def test_fallback_model_serves_when_the_pool_fails() -> None:
    models = [
        {
            "id": "m",
            "backend": "mock:",
            "options": {"fail_with": "unavailable"},
            "fallbacks": ["b"],
        },
        {"id": "b", "backend": "mock:", "options": {"reply": "from b"}},
    ]
    async with client_for(models) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 200
        assert r.json()["model"] == "b", "the model that answered is named"
        assert r.headers["x-clawbot-backend"] == "b/default"
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
        assert r.status_code == 200
        assert streamed_text(r.text) == "from b"
        assert r.headers["x-clawbot-backend"] == "b/default"


async def test_fallbacks_are_tried_once_each_and_the_last_error_answers() -> None:
    models = [
        {
            "id": "m",
            "backend": "mock:",
            "options": {"fail_with": "unavailable"},
            "fallbacks": ["b"],
        },
        {"id": "b", "backend": "mock:", "options": {"fail_with": "timeout"}, "fallbacks": ["m"]},
    ]
    async with client_for(models) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 504
        state = await backends(client)
        assert state["m/default"]["total_failures"] == 1
        assert state["b/default"]["total_failures"] == 1


async def test_context_window_fallback_when_the_backend_refuses_the_prompt() -> None:
    models = [
        {
            "id": "m",
            "backend": "mock:",
            "options": {"fail_with": "context_length"},
            "context_window_fallbacks": ["big"],
        },
        {"id": "big", "backend": "mock:", "options": {"reply": "from big"}},
    ]
    async with client_for(models) as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "from big"


async def test_context_window_fallback_by_estimate_before_sending() -> None:
    models = [
        {
            "id": "m",
            "backend": "mock:",
            "options": {"reply": "from small"},
            "context_length": 64,
            "context_window_fallbacks": ["big"],
        },
        {"id": "big", "backend": "mock:", "options": {"reply": "from big"}, "context_length": 8192},
    ]
    async with client_for(models) as client:
        short = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert short.json()["choices"][0]["message"]["content"] == "from small"
        long_prompt = chat(messages=[{"role": "user", "content": "word " * 200}])
        r = await client.post("/v1/chat/completions", json=long_prompt, headers=AUTH)
        assert r.json()["choices"][0]["message"]["content"] == "from big"
        assert r.headers["x-clawbot-backend"] == "big/default"
        capped = chat(max_tokens=100)
        r = await client.post("/v1/chat/completions", json=capped, headers=AUTH)
        assert r.headers["x-clawbot-backend"] == "big/default", "max_tokens counts too"
        assert (await backends(client))["m/default"]["total_successes"] == 1


async def test_a_request_the_pool_cannot_serve_everywhere_is_refused_up_front() -> None:
    pool = {
        "id": "m",
        "deployments": [
            {"name": "remote", "backend": "http://127.0.0.1:9/v1"},
            ok("local", priority=1),
        ],
    }
    async with client_for([pool]) as client:
        r = await client.post("/v1/chat/completions", json=chat(n=2), headers=AUTH)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "n"
        state = await backends(client)
        assert state["m/remote"]["total_failures"] == 0


async def test_completions_and_embeddings_fail_over_too() -> None:
    pool = {"id": "m", "deployments": [failing("rate_limited", "a"), ok("b", priority=1)]}
    async with client_for([pool]) as client:
        r = await client.post(
            "/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}, headers=AUTH
        )
        assert r.status_code == 200
        assert r.headers["x-clawbot-backend"] == "m/b"
        r = await client.post("/v1/embeddings", json={"model": "m", "input": "hi"}, headers=AUTH)
        assert r.status_code == 200
        assert r.headers["x-clawbot-backend"] == "m/b"


async def test_health_checks_take_a_deployment_out_and_back() -> None:
    pool = {
        "id": "m",
        "deployments": [
            {"name": "sick", "backend": "mock:", "options": {"healthy": False}},
            ok("well", priority=1),
        ],
    }
    gateway = Gateway.from_config(make_config([pool]))
    async with client_for([], gateway) as client:
        await gateway.monitor.check_all()
        state = await backends(client)
        assert state["m/sick"]["healthy"] is False
        assert state["m/sick"]["check_error"] == "the backend reports it cannot serve"
        assert state["m/well"]["healthy"] is True
        assert state["m/well"]["checked_at"] > 0
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.headers["x-clawbot-backend"] == "m/well"
        sick = gateway.models[0].pool.deployment("sick").backend
        sick.options = msgspec.structs.replace(sick.options, healthy=True)  # type: ignore[attr-defined]
        await gateway.monitor.check_all()
        assert (await backends(client))["m/sick"]["check_error"] is None
        r = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.headers["x-clawbot-backend"] == "m/sick", "the primary is back"


async def test_a_health_check_that_hangs_fails() -> None:
    pool = {
        "id": "m",
        "routing": {"health_check_timeout_s": 0.05},
        "deployments": [ok("a"), ok("b", priority=1)],
    }
    gateway = Gateway.from_config(make_config([pool]))
    backend = gateway.models[0].pool.deployment("a").backend

    async def hang() -> bool:
        await asyncio.sleep(10)
        return True

    backend.health = hang  # type: ignore[method-assign]
    async with client_for([], gateway) as client:
        await gateway.monitor.check_all()
        state = await backends(client)
        assert state["m/a"]["healthy"] is False
        assert state["m/a"]["check_error"] == "no answer within 0.05s"


async def test_admin_backends_needs_the_master_key(client: AppClient) -> None:
    r = await client.get("/admin/backends")
    assert r.status_code == 401
    r = await client.get("/admin/backends", headers=AUTH)
    body = r.json()
    assert body["object"] == "list"
    assert [m["model"] for m in body["data"]] == ["mock", "fixed", "broken"]
    assert body["data"][0]["strategy"] == "priority"
    assert body["data"][0]["deployments"][0]["name"] == "default"
    assert body["data"][0]["deployments"][0]["backend"] == "mock:"
