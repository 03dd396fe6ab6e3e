"""An httpx transport for HTTP/1.1 keep-alive whose pool costs nothing per idle connection.

Why it exists: under `bench/gateway_overhead.py`, py-spy put ~75-80 % of the gateway's CPU in
httpcore's connection pool. On every request start and finish httpcore walks every pooled
connection and asks each whether it has expired, which polls its socket (`is_readable`: a
syscall plus Python), so the cost grows with concurrency: 1.2 ms CPU per request at c=1, 2 ms
at c=16, and the gateway topped out near 800 req/s on two cores.

Here each connection is an `asyncio.Protocol`, so the event loop itself reports a server closing
an idle connection, and nothing ever looks at one: the pool is a LIFO list per origin, an idle
connection's age is checked once when it is taken, and a reused connection that the server
closed as we sent (a stale keep-alive: EOF or reset before any response byte) is dropped and the
request sent once more on a new connection. Responses are parsed by httptools (llhttp, in C) and
bodies are yielded as they arrive, so SSE streams pass through incrementally.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, cast

import httptools
import httpx

Origin = tuple[bytes, str, int]
"""Scheme, host and port: the connections that may serve a request."""

_HIGH_WATER = 256 * 1024
"""Unread response bytes above which the connection stops reading from its socket."""
_LOW_WATER = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: nothing was processed."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes a request, parses its response with httptools."""

    def __init__(
        self,
        origin: Origin,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[_Connection], None],
    ) -> None:
        self.origin = origin
        self._loop = loop
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.closing = False
        self.lost = False
        self._lost_exc: Exception | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        self.idle = False
        self.idle_since = 0.0
        self.served = 0
        self.broken = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._active = False
        self._head_only = False
        self._informational = False
        self._received = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._protocol_error: str | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self._active:
            self.broken = True
            self.close()
            return
        self._received = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._protocol_error = f"malformed HTTP response: {exc}"
            self.broken = True
            self.close()
            self._wake()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._lost_exc = exc
        if (
            self._active
            and self.headers_done
            and not self.complete
            and exc is None
            and self._delimited_by_close()
        ):
            self.complete = True
            self.keep_alive = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._wake()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.broken = True  # bytes after the response: the connection is out of step

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:
            self._informational = True
            return
        self.headers_done = True
        if self._head_only:
            self.complete = True
            self.broken = True  # llhttp would still expect the body a HEAD answer describes
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self.headers = []
            self.reason = b""
            return
        if self.complete:
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._active = False
        self._wake()

    # used by the pool

    def begin(self, method: bytes) -> None:
        """Reset the per-response state before a request is written."""
        self._active = True
        self._head_only = method == b"HEAD"
        self._received = False
        self.status = 0
        self.reason = b""
        self.headers = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        if self._chunks:  # the last body was complete but not all read by its consumer
            self._chunks = []
            self._buffered = 0
            if self._read_paused and self._transport is not None:
                self._read_paused = False
                self._transport.resume_reading()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closing:
            self.closing = True
            if self._transport is not None:
                self._transport.close()

    async def wait_closed(self) -> None:
        """Until the event loop reports the socket gone."""
        if not self.lost:
            self._lost_waiter = self._loop.create_future()
            await self._lost_waiter

    def reusable(self) -> bool:
        """Whether the connection can serve another request."""
        return self.complete and self.keep_alive and not self.broken and not self.closing

    async def send(
        self, request: httpx.Request, head: bytes, body: bytes | None, write_timeout: float | None
    ) -> None:
        """Write the request: head and bytes body in one write, or a streamed body."""
        reused = self.served > 0
        self.served += 1
        if self.closing or self._transport is None:
            if reused:
                raise _Stale
            raise httpx.WriteError("connection closed before the request was sent", request=request)
        transport = self._transport
        if body is not None:
            if len(body) < 65536:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
            await self._drain(request, write_timeout, reused)
            return
        transport.write(head)
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        stream = request.stream
        assert isinstance(stream, AsyncIterable)
        async for part in stream:
            if self.closing:
                raise httpx.WriteError("connection closed while sending", request=request)
            if part:
                transport.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                await self._drain(request, write_timeout, reused=False)
        if chunked:
            transport.write(b"0\r\n\r\n")
        await self._drain(request, write_timeout, reused=False)

    async def _drain(
        self, request: httpx.Request, write_timeout: float | None, reused: bool
    ) -> None:
        if self._write_paused and not self.lost:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(write_timeout):
                    await self._drain_waiter
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out sending the request", request=request) from exc
            finally:
                self._drain_waiter = None
        if self.lost and not self._received:
            if reused:
                raise _Stale
            raise httpx.WriteError(
                f"connection lost while sending: {self._lost_exc}", request=request
            )

    async def read_head(self, request: httpx.Request, read_timeout: float | None) -> None:
        """Until the response's status and headers are in; `_Stale` if a reused one closed."""
        reused = self.served > 1
        while not self.headers_done:
            if self._protocol_error is not None:
                raise httpx.RemoteProtocolError(self._protocol_error, request=request)
            if self.lost:
                if reused and not self._received:
                    raise _Stale
                if isinstance(self._lost_exc, OSError):
                    raise httpx.ReadError(f"connection lost: {self._lost_exc}", request=request)
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a complete response", request=request
                )
            await self._wait(request, read_timeout)

    async def read_body(self, request: httpx.Request, read_timeout: float | None) -> bytes:
        """The next body bytes that arrived, or b"" once the body is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._protocol_error is not None:
                raise httpx.RemoteProtocolError(self._protocol_error, request=request)
            if self.lost:
                if isinstance(self._lost_exc, OSError):
                    raise httpx.ReadError(f"connection lost: {self._lost_exc}", request=request)
                raise httpx.RemoteProtocolError(
                    "server closed the connection before the response body was complete",
                    request=request,
                )
            await self._wait(request, read_timeout)
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._read_paused and self._transport is not None and not self.closing:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    async def _wait(self, request: httpx.Request, seconds: float | None) -> None:
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        if seconds is not None:
            self._last_read = self._loop.time()
            self._timer = self._loop.call_later(seconds, self._on_timer, waiter, seconds)
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if timed_out:
            raise httpx.ReadTimeout("timed out waiting for the response", request=request)

    def _on_timer(self, waiter: asyncio.Future[bool], timeout: float) -> None:
        if waiter.done():
            return
        quiet = self._loop.time() - self._last_read
        if quiet < timeout:
            self._timer = self._loop.call_later(timeout - quiet, self._on_timer, waiter, timeout)
        else:
            waiter.set_result(True)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)

    def _delimited_by_close(self) -> bool:
        if self._head_only or self.status in _NO_BODY_STATUS:
            return False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                return False
            if lower == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return True


class _ResponseBody(httpx.AsyncByteStream):
    """A response body read off its connection as it arrives."""

    def __init__(
        self,
        pool: PooledTransport,
        conn: _Connection,
        request: httpx.Request,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._request = request
        self._timeout = timeout
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, request, timeout = self._conn, self._request, self._timeout
        while data := await conn.read_body(request, timeout):
            yield data

    async def aclose(self) -> None:
        """Give the connection back if the response was read to its end, else close it."""
        if not self._closed:
            self._closed = True
            self._pool._release(self._conn)


def _encode_head(request: httpx.Request) -> tuple[bytes, bytes | None]:
    """The request line and headers, and the body when it is known bytes (else None)."""
    headers = request.headers
    extra = b""
    if "host" not in headers:
        extra = b"Host: " + request.url.netloc + b"\r\n"
    try:
        body: bytes | None = request.content
    except httpx.RequestNotRead:
        body = None
        if "content-length" not in headers and "transfer-encoding" not in headers:
            request.headers["Transfer-Encoding"] = "chunked"
    lines = b"".join([b"%s: %s\r\n" % pair for pair in headers.raw])
    start = b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)
    return start + extra + lines + b"\r\n", body


class PooledTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive over asyncio with a pool that never polls idle connections."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._slots = 0
        """Connections open or being opened: at most max_connections."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on a pooled connection; the body streams from it."""
        url = request.url
        scheme = url.raw_scheme
        if scheme == b"http":
            default_port = 80
        elif scheme == b"https":
            default_port = 443
        else:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {url.scheme!r}", request=request
            )
        if self._closed:
            raise RuntimeError("the transport is closed")
        origin: Origin = (scheme, url.raw_host.decode("ascii"), url.port or default_port)
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        head, body = _encode_head(request)
        method = request.method.encode("ascii")
        close_after = request.headers.get("connection", "").lower() == "close"
        conn = await self._acquire(origin, timeouts, request)
        try:
            await self._exchange(conn, request, method, head, body, timeouts)
        except _Stale:
            conn.close()
            self._conns.discard(conn)
            if body is None:  # a streamed body was consumed: it cannot be sent again
                self._free_slot()
                raise httpx.RemoteProtocolError(
                    "keep-alive connection closed before the response", request=request
                ) from None
            conn = await self._open_in_slot(origin, timeouts, request)
            try:
                await self._exchange(conn, request, method, head, body, timeouts)
            except BaseException:
                self._drop(conn)
                raise
        except BaseException:
            self._drop(conn)
            raise
        if close_after:
            conn.broken = True
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1", "reason_phrase": conn.reason}
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_ResponseBody(self, conn, request, timeouts.get("read")),
            extensions=extensions,
        )

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        conns = list(self._conns)
        self._idle.clear()
        self._conns.clear()
        for conn in conns:
            conn.idle = False
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.gather(*(conn.wait_closed() for conn in conns))

    @staticmethod
    async def _exchange(
        conn: _Connection,
        request: httpx.Request,
        method: bytes,
        head: bytes,
        body: bytes | None,
        timeouts: dict[str, float | None],
    ) -> None:
        conn.begin(method)
        await conn.send(request, head, body, timeouts.get("write"))
        await conn.read_head(request, timeouts.get("read"))

    async def _acquire(
        self, origin: Origin, timeouts: dict[str, float | None], request: httpx.Request
    ) -> _Connection:
        loop: asyncio.AbstractEventLoop | None = None
        deadline: float | None = None
        while True:
            idle = self._idle.get(origin)
            if idle:
                loop = asyncio.get_running_loop()
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    conn.idle = False
                    if not conn.closing and now - conn.idle_since <= self._expiry:
                        return conn
                    conn.close()
                    self._conns.discard(conn)
                    self._slots -= 1
            if self._slots < self._max or self._evict_idle():
                self._slots += 1
                return await self._open_in_slot(origin, timeouts, request)
            if self._closed:
                raise RuntimeError("the transport is closed")
            loop = loop or asyncio.get_running_loop()
            if deadline is None:
                pool_timeout = timeouts.get("pool")
                deadline = float("inf") if pool_timeout is None else loop.time() + pool_timeout
            await self._wait_for_slot(loop, deadline, request)

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any origin to free its slot."""
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].remove(oldest)
        oldest.idle = False
        oldest.close()
        self._conns.discard(oldest)
        self._slots -= 1
        return True

    async def _wait_for_slot(
        self, loop: asyncio.AbstractEventLoop, deadline: float, request: httpx.Request
    ) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken but not going to use the turn: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(
                    "no connection free within the pool timeout", request=request
                ) from exc
            raise

    async def _open_in_slot(
        self, origin: Origin, timeouts: dict[str, float | None], request: httpx.Request
    ) -> _Connection:
        """Connect, in a slot already counted; the slot is freed if connecting fails."""
        scheme, host, port = origin
        context = None
        if scheme == b"https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin, loop, self._lost_while_idle),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(
                    f"timed out connecting to {host}:{port}", request=request
                ) from exc
            if isinstance(exc, OSError):
                raise httpx.ConnectError(
                    f"cannot connect to {host}:{port}: {exc}", request=request
                ) from exc
            raise
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable() and not self._closed:
            conn.idle = True
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._wake_one()
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        if conn in self._conns:
            self._conns.discard(conn)
            self._free_slot()

    def _lost_while_idle(self, conn: _Connection) -> None:
        if conn.idle:
            conn.idle = False
            self._idle[conn.origin].remove(conn)
            self._conns.discard(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        self._slots -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
