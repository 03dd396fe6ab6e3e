"""The dashboard's page and files, and the admin API it reads: usage series and recent errors."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from app.api.admin.ui import ASSETS, PAGE
from app.api.app import create_app
from app.config import parse_config
from app.core.gateway import Gateway
from app.ledger.audit import usage_series
from app.ledger.storage.database import Database
from app.ledger.storage.schema import AuditRecord
from tests.conftest import AUTH, MASTER_KEY, AppClient

ROOT = Path(__file__).resolve().parents[4]
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}]}
MODELS = [
    {"id": "mock", "backend": "mock:"},
    {"id": "fixed", "backend": "mock:", "options": {"reply": "one two three"}},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(f"2024-05-01T{text}+00:00")


async def gateway_on(url: str) -> tuple[Gateway, AppClient]:
    config = parse_config(
        {"auth": {"api_key": MASTER_KEY}, "database": {"url": url}, "models": MODELS}
    )
    gateway = Gateway.from_config(config)
    return gateway, AppClient(create_app(gateway))


@pytest.fixture
async def memory_client() -> AsyncIterator[tuple[Gateway, AppClient]]:
    gateway, client = await gateway_on("sqlite+aiosqlite://")
    async with client:
        yield gateway, client


# Rows the series and errors tests share: (time, key, model, route, status, prompt, completion).
ROWS = [
    ("09:59:59", "key_a", "mock", "/v1/chat/completions", 200, 1, 1),  # before since's bucket
    ("10:00:00", "key_a", "mock", "/v1/chat/completions", 200, 10, 5),
    ("10:59:59.900", "key_a", "mock", "/v1/chat/completions", 500, None, None),
    ("10:30:00", "key_b", "mock", "/v1/embeddings", 200, 3, 4),
    ("11:00:00", "key_a", "fixed", "/v1/chat/completions", 200, 2, 2),
    ("11:15:00", None, None, "/admin/keys", 401, None, None),  # the admin API's own traffic
    ("13:10:00", "key_b", "fixed", "/v1/chat/completions", 429, None, None),
    ("14:00:00", "key_a", "mock", "/v1/chat/completions", 200, 7, 7),  # at until: left out
]


@pytest.fixture
async def seeded(database_url: str) -> AsyncIterator[AppClient]:
    """A gateway on each database, its audit log holding `ROWS`."""
    _, client = await gateway_on(database_url)
    async with client:  # started: the schema is there
        # Its own engine: the app's pooled connections belong to the client's event loop.
        db = Database(database_url)
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(AuditRecord),
                [
                    {
                        "request_id": f"req_{n}",
                        "ts": at(ts),
                        "key_id": key,
                        "route": route,
                        "model": model,
                        "backend": "mock:" if model else None,
                        "status": status,
                        "error_type": {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(
                            status, "internal_error" if status >= 400 else None
                        ),
                        "latency_ms": 1.5,
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "stream": False,
                    }
                    for n, (ts, key, model, route, status, prompt, completion) in enumerate(ROWS)
                ],
            )
        await db.aclose()
        yield client


# ---- the page


async def test_page_is_served_without_auth_and_with_strict_headers(
    memory_client: tuple[Gateway, AppClient],
) -> None:
    _, client = memory_client
    for path in ("/admin/ui", "/admin/ui/"):
        r = await client.get(path)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        for directive in (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ):
            assert directive in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    html = r.text
    assert '<script src="/admin/ui/admin.js" defer></script>' in html
    assert '<link rel="stylesheet" href="/admin/ui/admin.css">' in html
    # The CSP allows neither inline scripts, nor inline styles, nor anything from elsewhere.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/admin/ui/admin.js" defer>']
    assert "<style" not in html
    assert " style=" not in html
    assert not re.search(r"https?://", html)


async def test_the_pages_files_are_served_with_the_same_headers(
    memory_client: tuple[Gateway, AppClient],
) -> None:
    _, client = memory_client
    for name, media_type in ASSETS.items():
        r = await client.get(f"/admin/ui/{name}")
        assert r.status_code == 200
        assert r.headers["content-type"] == f"{media_type}; charset=utf-8"
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    script = (await client.get("/admin/ui/admin.js")).text
    # Only the SVG namespace: no CDN, no other host. Data is inserted as text, never as HTML.
    assert set(re.findall(r"https?://[^\s\"'`]+", script)) == {"http://www.w3.org/2000/svg"}
    assert "innerHTML" not in script
    assert "insertAdjacentHTML" not in script
    assert "document.write" not in script
    r = await client.get("/admin/ui/secrets.txt")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "no dashboard file 'secrets.txt'",
        "type": "invalid_request_error",
        "param": "name",
        "code": "not_found",
    }
    assert (await client.get("/admin/ui/..%2Fadmin.py")).status_code == 404


def test_the_pages_files_ship_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app"]
    static = ROOT / "app" / "api" / "admin" / "static"
    shipped = sorted(p.name for p in static.iterdir())
    assert sorted([PAGE, *ASSETS]) == shipped
    for name in shipped:
        packaged = f"api/admin/static/{name}"
        assert any(fnmatch.fnmatch(packaged, pattern) for pattern in patterns), name
        assert (files("app.api.admin") / "static" / name).is_file()


# ---- the admin API the page reads


@pytest.mark.parametrize("path", ["/admin/usage/series", "/admin/errors"])
async def test_the_dashboards_data_needs_the_master_key(
    memory_client: tuple[Gateway, AppClient], path: str
) -> None:
    _, client = memory_client
    r = await client.post("/admin/keys", json={"name": "app"}, headers=AUTH)
    api_key = r.json()["key"]
    assert (await client.get(path)).status_code == 401
    r = await client.get(path, headers=bearer("sk-wrong"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = await client.get(path, headers=bearer(api_key))
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"
    assert (await client.get(path, headers=AUTH)).status_code == 200


def point(bucket: str, key: str | None, model: str | None, **n: int) -> dict[str, Any]:
    p, c = n.get("prompt", 0), n.get("completion", 0)
    return {
        "bucket": f"2024-05-01T{bucket}:00Z",
        "key_id": key,
        "model": model,
        "requests": n.get("requests", 1),
        "errors": n.get("errors", 0),
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
    }


SPAN = "since=2024-05-01T10:20:00Z&until=2024-05-01T14:00:00Z"


async def test_series_buckets_api_requests_per_key_and_model(
    seeded: AppClient,
) -> None:
    r = await seeded.get(f"/admin/usage/series?{SPAN}&bucket=1h", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    # since moves back to the start of its bucket, so the first bucket is whole.
    assert body["since"] == "2024-05-01T10:00:00+00:00"
    assert body["until"] == "2024-05-01T14:00:00+00:00"
    assert body["bucket_s"] == 3600
    assert body["data"] == [
        point("10:00", "key_a", "mock", requests=2, errors=1, prompt=10, completion=5),
        point("10:00", "key_b", "mock", prompt=3, completion=4),
        point("11:00", "key_a", "fixed", prompt=2, completion=2),
        point("13:00", "key_b", "fixed", errors=1),
    ]


async def test_series_by_model_in_half_hours(seeded: AppClient) -> None:
    r = await seeded.get(f"/admin/usage/series?{SPAN}&bucket=30m&group_by=model", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["since"] == "2024-05-01T10:00:00+00:00"
    assert body["bucket_s"] == 1800
    # 10:59:59.900 belongs to the 10:30 bucket, not the next one.
    assert body["data"] == [
        point("10:00", None, "mock", prompt=10, completion=5),
        point("10:30", None, "mock", requests=2, errors=1, prompt=3, completion=4),
        point("11:00", None, "fixed", prompt=2, completion=2),
        point("13:00", None, "fixed", errors=1),
    ]
    r = await seeded.get(f"/admin/usage/series?{SPAN}&bucket=1d&group_by=key_id", headers=AUTH)
    assert r.json()["since"] == "2024-05-01T00:00:00+00:00"
    assert [(p["bucket"], p["key_id"], p["requests"]) for p in r.json()["data"]] == [
        ("2024-05-01T00:00:00Z", "key_a", 4),
        ("2024-05-01T00:00:00Z", "key_b", 2),
    ]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("bucket=0s", "bucket"),
        ("bucket=1.5s", "bucket"),
        ("bucket=hourly", "bucket"),
        ("since=30d&bucket=1m", "bucket"),
        ("since=1h&until=2h", "since"),
        ("since=yesterday", "since"),
        ("group_by=route", "group_by"),
    ],
)
async def test_bad_series_queries_are_400s_naming_the_parameter(
    memory_client: tuple[Gateway, AppClient], query: str, param: str
) -> None:
    _, client = memory_client
    r = await client.get(f"/admin/usage/series?{query}", headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_usage_series_refuses_a_fractional_bucket(db: Database) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="whole number of seconds"):
        await usage_series(db, since=now, until=now, bucket=timedelta(seconds=1.5))
    with pytest.raises(ValueError, match="cannot group usage by 'route'"):
        await usage_series(db, since=now, until=now, bucket=timedelta(hours=1), group_by=["route"])  # type: ignore[list-item]


async def test_errors_lists_failed_requests_newest_first(seeded: AppClient) -> None:
    r = await seeded.get("/admin/errors", headers=AUTH)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert [(e["request_id"], e["status"]) for e in rows] == [
        ("req_6", 429),
        ("req_5", 401),
        ("req_2", 500),
    ]
    assert rows[0] == {
        "ts": "2024-05-01T13:10:00Z",
        "request_id": "req_6",
        "route": "/v1/chat/completions",
        "status": 429,
        "error_type": "rate_limit_exceeded",
        "model": "fixed",
        "key_id": "key_b",
        "backend": "mock:",
        "latency_ms": 1.5,
    }
    assert rows[1]["route"] == "/admin/keys"
    assert rows[1]["key_id"] is None
    assert rows[2]["ts"] == "2024-05-01T10:59:59.900000Z"
    r = await seeded.get("/admin/errors?limit=2", headers=AUTH)
    assert [e["request_id"] for e in r.json()["data"]] == ["req_6", "req_5"]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "ten", "2.5", "\u00b2"])
async def test_bad_error_limits_are_400s(
    memory_client: tuple[Gateway, AppClient], limit: str
) -> None:
    _, client = memory_client
    r = await client.get(f"/admin/errors?limit={limit}", headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "limit"


async def test_live_requests_reach_the_series_and_the_errors(
    memory_client: tuple[Gateway, AppClient],
) -> None:
    gateway, client = memory_client
    created = (await client.post("/admin/keys", json={"name": "live"}, headers=AUTH)).json()
    key = bearer(created["key"])
    for _ in range(3):
        assert (
            await client.post("/v1/chat/completions", json=CHAT, headers=key)
        ).status_code == 200
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "nope"},
        headers={**key, "x-request-id": "req-dashboard-test"},
    )
    assert r.status_code == 404
    for _ in range(100):  # the audit writer batches every 0.2 s
        if gateway.audit is not None and gateway.audit.written >= 5:
            break
        await asyncio.sleep(0.1)
    r = await client.get("/admin/usage/series?since=2h&bucket=1h", headers=AUTH)
    mine = [p for p in r.json()["data"] if p["key_id"] == created["id"]]
    assert sum(p["requests"] for p in mine) == 4
    assert sum(p["errors"] for p in mine) == 1
    assert sum(p["total_tokens"] for p in mine) == 18  # 2 prompt + 4 completion, three times
    errors = (await client.get("/admin/errors", headers=AUTH)).json()["data"]
    assert [(e["request_id"], e["status"], e["error_type"], e["key_id"]) for e in errors] == [
        ("req-dashboard-test", 404, "model_not_found", created["id"])
    ]
