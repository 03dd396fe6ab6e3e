"""What is learned about one request while it is served (`Exchange`), and where it is kept.

The `Accounting` middleware opens one per HTTP request; handlers and policies fill it as they
learn things, and the gateway's `finish` turns it into the rate-limit correction, the metrics and
the audit row. A plain record: nothing here knows the web framework or the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.logs import access_log_enabled, write_access

log = logging.getLogger("clawbot.gateway")


class Caller(Protocol):
    """Who a request turned out to be, as the record keeps it (the policies' `RequestContext`
    is one)."""

    @property
    def key_id(self) -> str | None: ...

    @property
    def model(self) -> str | None: ...


AUDITED_PREFIXES = ("/v1/", "/admin/")
"""Routes that get an audit row; probes (/health, /ready) would only drown it."""
UNAUDITED_PREFIXES = ("/admin/ui",)
"""The dashboard's static files: the API calls it makes are audited, its assets are not."""


@dataclass(slots=True)
class Exchange:
    """What is learned about one request while it is served."""

    started: float
    route: str
    request_id: str = ""
    method: str = ""
    client_ip: str | None = None
    ctx: Caller | None = None
    backend: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int = 0
    error_type: str | None = None
    first_token_at: float | None = None
    """When a stream's first generated token (text, reasoning, a tool call) passed through:
    what TTFT measures, rather than the first byte (a Responses stream sends
    `response.created` long before the model has produced anything)."""
    finished_at: float | None = None
    template: str | None = None
    """The matched route's path template (`/admin/keys/{key_id}`); None if none matched."""
    upstream_s: float = 0.0
    """Time spent waiting on backends (every attempt, every stream item), for metrics."""
    request_body: bytes | None = None
    response_body: bytearray | None = None
    """Collected only when body logging is enabled."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Added to the response when it starts (rate-limit headers)."""
    on_finish: list[Callable[[Exchange], Awaitable[None]]] = field(default_factory=list)
    """Run once, just before the answer's last byte leaves (or when the exchange ends without
    one): release parallel slots, correct token counts. Before, not after: a client that sends
    its next request as soon as it has read the answer must find its slot free."""

    @property
    def audited(self) -> bool:
        """Whether this route gets an audit row."""
        return self.route.startswith(AUDITED_PREFIXES) and not self.route.startswith(
            UNAUDITED_PREFIXES
        )

    @property
    def latency_ms(self) -> float:
        """From the request's arrival to the last byte of the answer."""
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return (end - self.started) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """For streams: from arrival to the first generated token; None if none came."""
        if not self.stream or self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def record_usage(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Token usage, once known."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    async def settle(self) -> None:
        """Run the `on_finish` callbacks, once; a failing one is logged, the rest still run."""
        callbacks, self.on_finish = self.on_finish, []
        for callback in callbacks:
            try:
                await callback(self)
            except Exception:
                log.exception("finishing request %s failed", self.request_id)


def log_access(exchange: Exchange) -> None:
    """Write the access line of a finished request (`app.logs.write_access`)."""
    if not access_log_enabled():
        return
    ctx = exchange.ctx
    latency = round(exchange.latency_ms, 2)
    ttft = exchange.ttft_ms
    fields = {
        "method": exchange.method,
        "path": exchange.route,
        "status": exchange.status,
        "latency_ms": latency,
        "ttft_ms": None if ttft is None else round(ttft, 2),
        "model": ctx.model if ctx else None,
        "backend": exchange.backend,
        "key_id": ctx.key_id if ctx else None,
        "client_ip": exchange.client_ip,
        "stream": exchange.stream,
        "prompt_tokens": exchange.prompt_tokens,
        "completion_tokens": exchange.completion_tokens,
        "error": exchange.error_type,
    }
    message = f"{exchange.method} {exchange.route} {exchange.status} {latency}ms"
    write_access(message, exchange.request_id, fields)
