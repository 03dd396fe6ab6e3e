"""IP allowlists: address matching, the policy, and where the API and admin lists apply."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from app.api.app import create_app
from app.config import Config, DatabaseSettings, IpAllowlist, PolicySettings
from app.core.gateway import Gateway
from app.errors import IpNotAllowed, PermissionDenied
from policies.context import RequestContext
from policies.ip_allowlist import AddressSet, IpAllowlistPolicy, parse_address
from tests.conftest import AUTH, AppClient, Peer, make_config

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("entries", "address", "inside"),
    [
        (["10.0.0.0/8"], "10.200.3.4", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["192.168.1.7"], "192.168.1.7", True),
        (["192.168.1.7"], "192.168.1.8", False),
        (["10.0.0.1/8"], "10.9.9.9", True),  # host bits set: the network still counts
        (["fd00::/8"], "fd12:3456::1", True),
        (["fd00::/8"], "fe80::1", False),
        (["::1"], "::1", True),
        (["2001:db8::/32"], "2001:db8:ffff::7", True),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", True),  # IPv4-mapped peer on a dual-stack socket
        (["10.0.0.0/8"], "::ffff:11.0.0.1", False),
        (["::ffff:10.0.0.0/104"], "10.1.1.1", True),  # a mapped network is an IPv4 one
        (["::ffff:10.0.0.0/104"], "::ffff:10.1.1.1", True),
        (["10.0.0.0/8", "fd00::/8"], "fd00::5", True),
        (["0.0.0.0/0"], "::1", False),  # IPv4 rules never match IPv6 addresses
        (["::/0"], "8.8.8.8", False),
        (["10.0.0.0/8"], "testclient", False),  # not an address: never inside
        (["10.0.0.0/8"], "", False),
        ([], "10.0.0.1", False),
    ],
)
def test_address_set_membership(entries: list[str], address: str, inside: bool) -> None:
    networks = AddressSet(entries)
    assert (address in networks) is inside
    parsed = parse_address(address)
    if parsed is not None:
        assert (parsed in networks) is inside


def test_parse_address_unmaps_ipv4() -> None:
    assert str(parse_address("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(parse_address("2001:db8::1")) == "2001:db8::1"
    assert parse_address("10.0.0.300") is None


def ctx(client_ip: str) -> RequestContext:
    return RequestContext(request_id="r", client_ip=client_ip, route="/v1/models", credential=None)


async def test_policy_admits_inside_and_refuses_outside() -> None:
    policy = IpAllowlistPolicy(["10.0.0.0/8", "fd00::/8"])
    await policy.check(ctx("10.1.2.3"))
    await policy.check(ctx("fd00::9"))
    await policy.check(ctx("::ffff:10.1.2.3"))
    with pytest.raises(IpNotAllowed) as refused:
        await policy.check(ctx("192.0.2.1"))
    error = refused.value
    assert isinstance(error, PermissionDenied)
    assert (error.status, error.code, error.error_type) == (
        403,
        "ip_not_allowed",
        "permission_error",
    )
    assert "192.0.2.1" in error.message
    with pytest.raises(IpNotAllowed, match="this address"):
        await policy.check(ctx("not-an-ip"))


async def test_empty_policy_allows_everyone() -> None:
    policy = IpAllowlistPolicy([])
    for address in ("10.0.0.1", "::1", "testclient", ""):
        assert policy.permits(address)
        await policy.check(ctx(address))


def allowlisted(api: tuple[str, ...] = (), admin: tuple[str, ...] = (), **server: Any) -> Config:
    lists = PolicySettings(ip_allowlist=IpAllowlist(api=api, admin=admin))
    return msgspec.structs.replace(make_config(**server), policies=lists)


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, AppClient]]:
    """A gateway allowing the API from 10/8 and fd00::/8, and /admin from 192.168.5.0/24."""
    config = allowlisted(api=("10.0.0.0/8", "fd00::/8"), admin=("192.168.5.0/24",))
    app = Peer(create_app(Gateway.from_config(config)))
    async with AppClient(app) as client:
        yield app, client


def assert_ip_refused(r: Any) -> None:
    assert r.status_code == 403, r.text
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "permission_error",
            "param": None,
            "code": "ip_not_allowed",
        }
    }
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("host", ["10.1.2.3", "fd00::42", "::ffff:10.1.2.3"])
async def test_api_from_an_allowed_address(peer: tuple[Peer, AppClient], host: str) -> None:
    app, client = peer
    app.host = host
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401  # the key check comes next


@pytest.mark.parametrize("host", ["192.0.2.1", "::1", "::ffff:192.0.2.1", "testclient"])
async def test_api_from_outside_is_403_before_any_key_check(
    peer: tuple[Peer, AppClient], host: str
) -> None:
    app, client = peer
    app.host = host
    assert_ip_refused(await client.get("/v1/models"))  # no key: still 403, not 401
    assert_ip_refused(await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}))
    assert_ip_refused(await client.post("/v1/chat/completions", json=CHAT, headers=AUTH))
    assert_ip_refused(await client.post("/chat/completions", json=CHAT, headers=AUTH))
    assert_ip_refused(await client.post("/v1/auth/token", json={}, headers=AUTH))


async def test_probes_stay_open(peer: tuple[Peer, AppClient]) -> None:
    app, client = peer
    app.host = "192.0.2.1"
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/ready")).status_code == 200


@pytest.mark.parametrize("path", ["/admin/keys", "/admin//keys", "/admin/usage", "/metrics"])
async def test_admin_from_outside_is_403_before_the_master_key_check(
    peer: tuple[Peer, AppClient], path: str
) -> None:
    app, client = peer
    app.host = "10.1.2.3"  # allowed on the API, not on /admin
    assert_ip_refused(await client.get(path))
    assert_ip_refused(await client.get(path, headers=AUTH))


async def test_admin_refusals_are_audited_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = allowlisted(admin=("192.168.5.0/24",))
    database = tmp_path / "audit.db"
    config = msgspec.structs.replace(
        config, database=DatabaseSettings(url=f"sqlite+aiosqlite:///{database}")
    )
    app = Peer(create_app(Gateway.from_config(config)), host="10.9.9.9")
    async with AppClient(app) as client:
        with caplog.at_level(logging.INFO, logger="clawbot.access"):
            r = await client.get("/admin/keys", headers=AUTH)
        assert_ip_refused(r)
    rid = r.headers["x-request-id"]
    access = [rec.getMessage() for rec in caplog.records if rec.name == "clawbot.access"]
    assert [line.split()[:3] for line in access] == [["GET", "/admin/keys", "403"]]
    with sqlite3.connect(database) as db:  # the writer flushed when the app stopped
        rows = db.execute(
            "SELECT status, error_type, client_ip FROM audit_log WHERE request_id = ?", (rid,)
        ).fetchall()
    assert rows == [(403, "ip_not_allowed", "10.9.9.9")]


async def test_admin_from_an_allowed_address(peer: tuple[Peer, AppClient]) -> None:
    app, client = peer
    app.host = "192.168.5.20"  # allowed on /admin, not on the API
    assert (await client.get("/admin/keys")).status_code == 401
    assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200
    app.host = "::ffff:192.168.5.20"
    assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200
    assert_ip_refused(await client.get("/v1/models", headers=AUTH))


async def test_empty_lists_allow_everyone() -> None:
    app = Peer(create_app(Gateway.from_config(allowlisted())), host="203.0.113.9")
    async with AppClient(app) as client:
        assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/admin/keys", headers=AUTH)).status_code == 200


async def test_api_allowlist_without_auth() -> None:
    app = Peer(create_app(Gateway.from_config(allowlisted(api=("10.0.0.0/8",), api_key=""))))
    async with AppClient(app) as client:
        app.host = "10.0.0.7"
        assert (await client.get("/v1/models")).status_code == 200
        app.host = "192.0.2.1"
        assert_ip_refused(await client.get("/v1/models"))


def test_api_allowlist_is_the_first_policy() -> None:
    gateway = Gateway.from_config(allowlisted(api=("10.0.0.0/8",)))
    assert gateway.policies[0].name == "ip_allowlist"
    assert gateway.policies[1].name == "api_key"
    assert "ip_allowlist" not in {p.name for p in Gateway.from_config(allowlisted()).policies}


def test_lookups_are_remembered_within_a_bound() -> None:
    networks = AddressSet(["10.0.0.0/8"])
    hosts = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(AddressSet.MEMO_SIZE + 5)]
    assert all(host in networks for host in hosts)
    assert all(host in networks for host in hosts)  # again, some from the memo
    assert networks.lookup("::ffff:10.0.0.1") == (True, "10.0.0.1")
    assert networks.lookup("11.0.0.1") == (False, "11.0.0.1")
    assert networks.lookup("nonsense") is None
    assert len(networks._memo) <= AddressSet.MEMO_SIZE
