"""What happens before routing: path normalization and the request id."""

from __future__ import annotations

import re
import secrets
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
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


def request_id_of(scope: Scope) -> str:
    """The id `Edge` gave this request (a fresh one for scopes that never passed it)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        rid = state["request_id"] = f"req_{secrets.token_hex(12)}"
    return str(rid)


class Edge:
    """ASGI wrapper: normalizes the path and tags every response with `x-request-id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
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
        state["request_id"] = rid
        header = (REQUEST_ID_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == REQUEST_ID_HEADER for k, _ in headers):
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
