"""A cheap HTTP/1.1 load generator: raw keep-alive sockets, one connection per worker.

Closed loop by default (each of `--concurrency` workers sends its next request as soon as
the last one is answered); with `--rate`, open loop: requests are due at a fixed rate, sent
on the next free connection (a server that cannot keep up shows as req/s below the rate).
It warms up, then measures for `--duration` seconds and prints one JSON summary.
Only loopback targets are allowed.

    python bench/loadgen.py --port 8080 --concurrency 16 --duration 5 \\
        --body '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}' --stream
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import msgspec

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class Summary(msgspec.Struct, kw_only=True):
    """What one load run measured; latencies in milliseconds."""

    concurrency: int
    stream: bool
    rate: float | None
    duration_s: float
    warmup_requests: int
    """Requests sent during the warm-up, not measured."""
    sent: int
    """Requests sent while measuring."""
    ok: int
    errors: int
    rps: float
    p50_ms: float | None
    """Time to the full response, or to the first SSE data chunk when streaming."""
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    full_p50_ms: float | None
    """Time to the full response, streams included."""
    full_p99_ms: float | None
    first_error: str | None = None


@dataclass(slots=True)
class Response:
    """One parsed response and when its parts arrived (perf_counter seconds)."""

    status: int
    first_data_at: float
    done_at: float
    saw_done: bool


@dataclass(slots=True)
class Samples:
    """Latencies of one phase."""

    first: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    last_done: float = 0.0

    def error(self, message: str) -> None:
        """Count a failed request, keeping the first message."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = message


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight.

    Parses just enough HTTP/1.1: the status, Content-Length or chunked framing, and, for
    chunked bodies, when the first chunk carrying an SSE `data:` line arrived.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.body_start = -1
        self.length = -1
        self.chunked = False
        self.pos = 0
        self.first_data_at = 0.0
        self.saw_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, payload: bytes) -> asyncio.Future[Response]:
        """Write one request; the future resolves with its parsed response."""
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionError("connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self._reset()
        self.buffer.clear()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        try:
            done = self._parse(now)
        except ValueError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            assert self.transport is not None
            self.transport.close()
            return
        if done and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Response(self.status, self.first_data_at, now, self.saw_done))

    def _parse(self, now: float) -> bool:
        buf = self.buffer
        if self.body_start < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self.body_start = self.pos = end + 4
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                self.length = int(head[marker + 17 : line_end if line_end >= 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                raise ValueError("response has neither content-length nor chunked framing")
        if not self.chunked:
            if len(buf) - self.body_start < self.length:
                return False
            self.first_data_at = now
            return True
        while True:
            line_end = buf.find(b"\r\n", self.pos)
            if line_end < 0:
                return False
            size = int(bytes(buf[self.pos : line_end]).split(b";")[0], 16)
            chunk_end = line_end + 2 + size
            if len(buf) < chunk_end + 2:
                return False
            if size == 0:
                return True  # no trailers are expected
            if not self.first_data_at and buf.find(b"data:", line_end + 2, chunk_end) >= 0:
                self.first_data_at = now
            if buf.find(b"[DONE]", line_end + 2, chunk_end) >= 0:
                self.saw_done = True
            self.pos = chunk_end + 2


def build_request(host: str, port: int, path: str, body: bytes, headers: list[str]) -> bytes:
    """A keep-alive POST (GET when `body` is empty) as raw bytes."""
    method = "POST" if body else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class Load:
    """How to load one target."""

    host: str
    port: int
    payload: bytes
    concurrency: int
    stream: bool
    timeout_s: float = 10.0
    max_requests: int = 2_000_000
    rate: float | None = None


class Run:
    """Workers sharing one phase's deadline, request budget and (open loop) schedule."""

    def __init__(self, load: Load, duration_s: float) -> None:
        self.load = load
        self.samples = Samples()
        self.start = time.perf_counter()
        self.deadline = self.start + duration_s
        self.issued = 0

    def next_due(self) -> float | None:
        """When the next request is due, or None when the phase is over."""
        if self.issued >= self.load.max_requests:
            return None
        due = self.start + self.issued / self.load.rate if self.load.rate else time.perf_counter()
        if due >= self.deadline:
            return None
        self.issued += 1
        return due

    async def worker(self, conns: list[ClientProtocol], slot: int) -> None:
        """Send requests on connection `slot` until the phase ends, reconnecting on failure."""
        load, samples = self.load, self.samples
        while (due := self.next_due()) is not None:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(load.timeout_s):
                    response = await conns[slot].send(load.payload)
            except (TimeoutError, ConnectionError, ValueError) as exc:
                samples.error(f"{type(exc).__name__}: {exc}")
                conns[slot] = await self.reconnect(conns[slot])
                continue
            samples.last_done = response.done_at
            if response.status != 200:
                samples.error(f"HTTP {response.status}")
            elif load.stream and not (response.saw_done and response.first_data_at):
                samples.error("stream ended without data or [DONE]")
            else:
                first = response.first_data_at if load.stream else response.done_at
                samples.first.append(first - started)
                samples.full.append(response.done_at - started)

    async def reconnect(self, old: ClientProtocol) -> ClientProtocol:
        """Replace a failed connection, retrying until the phase's deadline."""
        if old.transport is not None:
            old.transport.close()
        while True:
            try:
                return await connect(self.load.host, self.load.port)
            except OSError as exc:
                self.samples.error(f"reconnect: {exc}")
                if time.perf_counter() >= self.deadline:
                    raise
                await asyncio.sleep(0.05)


async def connect(host: str, port: int) -> ClientProtocol:
    """Open one keep-alive connection."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(ClientProtocol, host, port)
    return protocol


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values, in milliseconds (None if empty)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank] * 1000


async def run_load(load: Load, duration_s: float, warmup_s: float) -> Summary:
    """Warm up, then measure `load` for `duration_s` seconds."""
    if load.host not in LOOPBACK:
        raise ValueError(f"refusing to load {load.host}: only loopback targets are allowed")
    conns = [await connect(load.host, load.port) for _ in range(load.concurrency)]
    warmed = 0
    try:
        if warmup_s > 0:
            warmup = Run(load, warmup_s)
            await asyncio.gather(*(warmup.worker(conns, i) for i in range(load.concurrency)))
            warmed = warmup.issued
        run = Run(load, duration_s)
        await asyncio.gather(*(run.worker(conns, i) for i in range(load.concurrency)))
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    samples = run.samples
    elapsed = max(samples.last_done, run.deadline if load.rate else 0.0) - run.start
    first, full = sorted(samples.first), sorted(samples.full)
    return Summary(
        concurrency=load.concurrency,
        stream=load.stream,
        rate=load.rate,
        duration_s=round(elapsed, 3),
        warmup_requests=warmed,
        sent=run.issued,
        ok=len(full),
        errors=samples.errors,
        rps=len(full) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(first, 50),
        p90_ms=percentile(first, 90),
        p99_ms=percentile(first, 99),
        max_ms=percentile(first, 100),
        full_p50_ms=percentile(full, 50),
        full_p99_ms=percentile(full, 99),
        first_error=samples.first_error,
    )


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one load and print its Summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body", default="", help="JSON request body; empty sends a GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--stream", action="store_true", help="expect an SSE stream")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    load = Load(
        host=args.host,
        port=args.port,
        payload=build_request(args.host, args.port, args.path, args.body.encode(), args.header),
        concurrency=args.concurrency,
        stream=args.stream,
        timeout_s=args.timeout,
        max_requests=args.max_requests,
        rate=args.rate,
    )
    install_uvloop()
    summary = asyncio.run(run_load(load, args.duration, args.warmup))
    sys.stdout.buffer.write(msgspec.json.encode(summary) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
