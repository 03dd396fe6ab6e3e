"""The client's address behind trusted reverse proxies (`model_server.trusted_proxies`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.types import ASGIApp, Receive, Scope, Send

from app.api.app import create_app
from app.api.middleware.accounting import Accounting
from app.api.middleware.edge import Edge, forwarded_client
from app.config import IpAllowlist, PolicySettings
from app.core.gateway import Gateway
from app.ledger.exchange import Exchange
from policies.ip_allowlist import AddressSet
from tests.conftest import AUTH, MASTER_KEY, AppClient, Peer, make_config
from tests.serving import serve

PROXIES = AddressSet(["10.0.0.0/8", "fd00::/8"])


def assert_ip_refused(r: Any) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "ip_not_allowed"


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # Not from a trusted proxy: the header is the client's own claim and is ignored.
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),
        ("::1", ["198.51.100.1"], "::1"),
        # From a trusted proxy: the right-most hop that is not a trusted proxy.
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # a spoofed left hop
        ("10.0.0.1", ["6.6.6.6, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),  # proxy chain
        ("10.0.0.1", ["6.6.6.6", "198.51.100.1, 10.0.0.2"], "198.51.100.1"),  # two headers
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # every hop trusted: the left-most
        ("10.0.0.1", ["2001:db8::7"], "2001:db8::7"),
        ("fd00::1", ["198.51.100.1"], "198.51.100.1"),
        ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),  # mapped peer address
        ("10.0.0.1", ["198.51.100.1:5123"], "198.51.100.1"),  # a port some proxies add
        ("10.0.0.1", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("10.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        # A hop that is not an address ends the walk at the last good one.
        ("10.0.0.1", ["198.51.100.1, unknown"], "10.0.0.1"),
        ("10.0.0.1", ["unknown, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", ["garbage, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [""], "10.0.0.1"),
    ],
)
def test_forwarded_client(peer: str, forwarded: list[str], client: str) -> None:
    assert forwarded_client(peer, forwarded, PROXIES) == client


async def no_content(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def request(app: ASGIApp, client: tuple[str, int] | None, headers: dict[str, str]) -> None:
    """Send GET /v1/models from `client` through `app`, as a server would."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": client,
    }

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await app(scope, receive, send)  # type: ignore[arg-type]


async def edge_scope(edge: Edge, client: tuple[str, int] | None, headers: dict[str, str]) -> Scope:
    """Send one request through `edge`; the scope the app below it saw."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await no_content(scope, receive, send)

    edge.app = app
    await request(edge, client, headers)
    return seen[0]


async def test_edge_rewrites_the_client_only_behind_a_trusted_proxy() -> None:
    edge = Edge(None, trusted_proxies=["10.0.0.0/8"])  # type: ignore[arg-type]
    xff = {"x-forwarded-for": "198.51.100.1"}
    assert (await edge_scope(edge, ("10.0.0.1", 5000), xff))["client"] == ("198.51.100.1", 0)
    assert (await edge_scope(edge, ("10.0.0.1", 5000), {}))["client"] == ("10.0.0.1", 5000)
    assert (await edge_scope(edge, ("192.0.2.1", 5000), xff))["client"] == ("192.0.2.1", 5000)
    assert (await edge_scope(edge, None, xff))["client"] is None


async def test_without_trusted_proxies_the_header_is_never_read() -> None:
    edge = Edge(None)  # type: ignore[arg-type]
    scope = await edge_scope(edge, ("10.0.0.1", 5000), {"x-forwarded-for": "198.51.100.1"})
    assert scope["client"] == ("10.0.0.1", 5000)


async def test_accounting_records_the_resolved_address() -> None:
    finished: list[Exchange] = []

    async def finish(exchange: Exchange) -> None:
        finished.append(exchange)

    edge = Edge(Accounting(no_content, finish), trusted_proxies=["10.0.0.0/8"])
    await request(edge, ("10.0.0.1", 5000), {"x-forwarded-for": "6.6.6.6, 198.51.100.1"})
    await request(edge, ("192.0.2.1", 5000), {"x-forwarded-for": "198.51.100.1"})
    assert [e.client_ip for e in finished] == ["198.51.100.1", "192.0.2.1"]


async def test_allowlists_see_the_address_behind_the_proxy() -> None:
    config = msgspec.structs.replace(
        make_config(trusted_proxies=("10.0.0.0/8",)),
        policies=PolicySettings(
            ip_allowlist=IpAllowlist(api=("198.51.100.0/24",), admin=("203.0.113.0/24",))
        ),
    )
    app = Peer(create_app(Gateway.from_config(config)), host="10.0.0.1")
    async with AppClient(app) as client:
        inside = {**AUTH, "x-forwarded-for": "198.51.100.9"}
        assert (await client.get("/v1/models", headers=inside)).status_code == 200
        outside = {**AUTH, "x-forwarded-for": "198.51.100.9, 192.0.2.1"}  # spoofed left hop
        assert_ip_refused(await client.get("/v1/models", headers=outside))
        assert_ip_refused(await client.get("/v1/models", headers=AUTH))  # the proxy itself
        admin = {**AUTH, "x-forwarded-for": "203.0.113.4"}
        assert (await client.get("/admin/keys", headers=admin)).status_code == 200
        assert_ip_refused(await client.get("/admin/keys", headers=inside))
        # A client reaching the gateway directly cannot claim an allowed address.
        app.host = "192.0.2.1"
        assert_ip_refused(await client.get("/v1/models", headers=inside))
        assert_ip_refused(await client.get("/admin/keys", headers=admin))


def audited_addresses(workdir: Path) -> list[str]:
    with sqlite3.connect(workdir / "clawbot.db") as db:
        return [row[0] for row in db.execute("SELECT client_ip FROM audit_log ORDER BY id")]


BASE = {
    "auth": {"api_key": MASTER_KEY},
    "models": [{"id": "mock", "backend": "mock:"}],
}


@pytest.mark.slow
def test_real_server_ignores_forwarded_for_without_trusted_proxies(tmp_path: Path) -> None:
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; the gateway turns that off,
    so a local client cannot pose as another address."""
    config = {**BASE, "policies": {"ip_allowlist": {"api": ["127.0.0.0/8", "::1"]}}}
    with serve(config, tmp_path) as server:
        spoofed = {**AUTH, "x-forwarded-for": "203.0.113.9"}
        r = httpx.get(f"{server.base_url}/models", headers=spoofed, timeout=30)
        assert r.status_code == 200, r.text
    assert audited_addresses(tmp_path) == ["127.0.0.1"]


@pytest.mark.slow
def test_real_server_behind_a_trusted_proxy(tmp_path: Path) -> None:
    config = {
        **BASE,
        "model_server": {"trusted_proxies": ["127.0.0.1"]},
        "policies": {"ip_allowlist": {"api": ["203.0.113.0/24"], "admin": ["198.51.100.7"]}},
    }
    with serve(config, tmp_path) as server, httpx.Client(timeout=30) as client:
        ok = client.get(
            f"{server.base_url}/models",
            headers={**AUTH, "x-forwarded-for": "6.6.6.6, 203.0.113.9"},
        )
        assert ok.status_code == 200, ok.text
        refused = client.get(f"{server.base_url}/models", headers=AUTH)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "ip_not_allowed"
        admin = client.get(f"{server.root}/admin/keys", headers={"x-forwarded-for": "198.51.100.7"})
        assert admin.status_code == 401  # past the allowlist: now the master key
        assert client.get(f"{server.root}/admin/keys").status_code == 403
        assert client.get(f"{server.root}/health").status_code == 200
    # Every answer is audited, the admin allowlist's refusal included (/health is not).
    assert audited_addresses(tmp_path) == ["203.0.113.9", "127.0.0.1", "198.51.100.7", "127.0.0.1"]
