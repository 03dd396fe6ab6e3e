"""What happens before routing: the client's address behind trusted proxies, path
normalization, the request id, and the admin IP allowlist."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.api import scope as scope_keys
from app.api.errors import translate
from policies.ip_allowlist import AddressSet, IpAllowlistPolicy

REQUEST_ID_HEADER = b"x-request-id"
FORWARDED_FOR_HEADER = b"x-forwarded-for"
_VALID_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_SLASHES = re.compile(r"/{2,}")
# Routes OpenAI clients reach both with and without the /v1 prefix.
_UNVERSIONED = (
    "/chat/",
    "/completions",
    "/embeddings",
    "/models",
    "/rerank",
    "/fim/",
    "/responses",
    "/messages",
)


def normalize_path(path: str) -> str:
    """Collapse repeated slashes and add the `/v1` prefix to OpenAI routes sent without it."""
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if not path.startswith("/v1/") and path.startswith(_UNVERSIONED):
        path = "/v1" + path
    return path


def is_admin_path(path: str) -> bool:
    """Whether `path` (normalized) is guarded by the admin allowlist: /admin/… and /metrics."""
    return path.startswith("/admin/") or path.rstrip("/") in ("/admin", "/metrics")


def _hop(entry: str) -> str:
    """One `X-Forwarded-For` entry without the port some proxies add (`1.2.3.4:5`, `[::1]:5`)."""
    entry = entry.strip()
    if entry.startswith("["):
        return entry[1 : entry.find("]")]
    if entry.count(":") == 1:
        return entry.partition(":")[0]
    return entry


def forwarded_client(peer: str, forwarded_for: Iterable[str], proxies: AddressSet) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    `X-Forwarded-For` hop that is not itself a trusted proxy.

    Each proxy appends the address it received the request from, so hops right of the first
    untrusted one were written by trusted proxies, and anything left of it may be the
    client's own invention. An unparsable hop ends the walk at the last good one.
    """
    found = proxies.lookup(peer)
    if found is None or not found[0]:
        return peer
    client = found[1]
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        found = proxies.lookup(_hop(hop))
        if found is None:
            break
        inside, client = found
        if not inside:
            break
    return client


class Edge:
    """ASGI wrapper in front of everything: resolves the client's address behind trusted
    proxies, normalizes the path and tags every response with `x-request-id`."""

    def __init__(self, app: ASGIApp, *, trusted_proxies: Sequence[str] = ()) -> None:
        self.app = app
        self._proxies = AddressSet(trusted_proxies) if trusted_proxies else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        if self._proxies is not None:
            self._resolve_client(scope, self._proxies)
        scope["path"] = normalize_path(scope["path"])
        client_id = next(
            (
                v
                for k, v in scope["headers"]
                if k == REQUEST_ID_HEADER and _VALID_CLIENT_ID.match(v)
            ),
            None,
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        rid = client_id.decode() if client_id else f"req_{secrets.token_hex(12)}"
        state[scope_keys.REQUEST_ID] = rid
        header = (REQUEST_ID_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == REQUEST_ID_HEADER for k, _ in headers):
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)

    @staticmethod
    def _resolve_client(scope: Scope, proxies: AddressSet) -> None:
        client = scope.get("client")
        if not client:
            return
        forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == FORWARDED_FOR_HEADER]
        if not forwarded:
            return
        host = forwarded_client(client[0], forwarded, proxies)
        if host != client[0]:
            scope["client"] = (host, 0)


class AdminAllowlist:
    """ASGI wrapper that keeps clients outside `policies.ip_allowlist.admin` away from /admin
    and /metrics (403, before any key check). It sits inside `Accounting`, so a refusal is
    audited and access-logged like any other answer."""

    def __init__(self, app: ASGIApp, allowlist: Sequence[str]) -> None:
        self.app = app
        self._admin = IpAllowlistPolicy(allowlist, scope="admin")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(scope["path"]):  # type: ignore[comparison-overlap]
            client = scope.get("client")
            host = client[0] if client else ""
            if not self._admin.permits(host):
                code = await refuse(self._admin.refusal(host), send)
                exchange = scope_keys.exchange_of(scope)
                if exchange is not None:
                    exchange.error_type = code
                return
        await self.app(scope, receive, send)


async def refuse(exc: Exception, send: Send) -> str:
    """Answer before routing, with the JSON the exception handler would have sent; returns
    the error's code (what the audit log calls it)."""
    wire = translate(exc)
    body = msgspec.json.encode(wire.body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in wire.headers.items()),
    ]
    await send({"type": "http.response.start", "status": wire.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return wire.body.error.code or wire.body.error.type
