"""A fake OpenAI-compatible upstream process for chaos tests, and a harness to drive it.

Run on its own (stdlib only; prints `fake upstream NAME listening on http://127.0.0.1:PORT/v1`):

    python tests/fake_upstream.py --port 8001 --name primary --mode ok --chunk-delay 0.05

Modes: `ok` answers normally; `hang` reads requests and never answers (not even /v1/models);
`500` and `429` fail every POST with an OpenAI error body (429 with `retry-after: 1`) while
/v1/models stays 200; `down-health` answers POSTs but fails /v1/models with 503.
`GET /stats` answers in every mode with `{"requests", "disconnects", "connections", "active"}`:
POSTs received, responses the peer walked away from, connections open, responses in progress.

From a test, `Upstream` spawns it, kills it with SIGKILL, and restarts it on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

MODES = ("ok", "hang", "500", "429", "down-health")
MODEL = "fake"

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_READY = re.compile(r"listening on (?P<url>http://\S+/v1)")


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _fixed(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _error(message: str, type_: str, code: str) -> bytes:
    return _json({"error": {"message": message, "type": type_, "param": None, "code": code}})


@dataclass
class Stats:
    """What the server saw, answered by `GET /stats`."""

    requests: int = 0
    """POSTs received."""
    disconnects: int = 0
    """Connections the peer closed while their response was still in progress."""
    connections: int = 0
    """Connections open now."""
    active: int = 0
    """Responses in progress now."""


@dataclass(frozen=True)
class Settings:
    """The command-line options of one fake upstream."""

    name: str
    mode: str
    chunk_delay_s: float
    chunks: int


class Request:
    """One parsed HTTP request."""

    def __init__(self, head: bytes, body: bytes) -> None:
        line = head.partition(b"\r\n")[0]
        method, _, rest = line.partition(b" ")
        self.method = method.decode()
        self.path = rest.partition(b" ")[0].partition(b"?")[0].decode()
        self.body = body


class Connection(asyncio.Protocol):
    """One keep-alive connection: requests are answered in order by one worker task."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.buffer = b""
        self.pending: deque[Request] = deque()
        self.transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None
        self.busy = False
        self.wake = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.connections += 1
        self.worker = asyncio.get_running_loop().create_task(self.work())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self.buffer) < total:
                break
            self.pending.append(Request(head, self.buffer[end + 4 : total]))
            self.buffer = self.buffer[total:]
        if self.pending:
            self.wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.connections -= 1
        if self.busy:
            self.stats.disconnects += 1
            self.busy = False
            self.stats.active -= 1
        if self.worker is not None:
            self.worker.cancel()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    async def work(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                request = self.pending.popleft()
                if request.method == "GET" and request.path == "/stats":
                    self.write(_fixed("200 OK", _json(vars(self.stats))))
                    continue
                self.busy = True
                self.stats.active += 1
                await self.answer(request)
                self.busy = False
                self.stats.active -= 1

    async def answer(self, request: Request) -> None:
        mode = self.settings.mode
        if mode == "hang":
            if request.method == "POST":
                self.stats.requests += 1
            await asyncio.Future()  # until the peer goes away and the worker is cancelled
        if request.method == "GET" and request.path in ("/v1/models", "/models"):
            if mode == "down-health":
                self.write(
                    _fixed("503 Service Unavailable", _error("down", "server_error", "down"))
                )
            else:
                models = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]
                self.write(_fixed("200 OK", _json({"object": "list", "data": models})))
            return
        if request.method != "POST" or request.path not in (
            "/v1/chat/completions",
            "/chat/completions",
        ):
            self.write(_fixed("404 Not Found", _error("not found", "invalid_request_error", "404")))
            return
        self.stats.requests += 1
        if mode == "500":
            body = _error("the fake upstream fails on purpose", "server_error", "fake_500")
            self.write(_fixed("500 Internal Server Error", body))
            return
        if mode == "429":
            body = _error("the fake upstream is rate limited", "requests", "rate_limit_exceeded")
            self.write(_fixed("429 Too Many Requests", body, b"retry-after: 1\r\n"))
            return
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            body = _error("body is not a JSON object", "invalid_request_error", "bad_json")
            self.write(_fixed("400 Bad Request", body))
            return
        if payload.get("stream") is True:
            await self.stream(payload)
        else:
            self.write(_fixed("200 OK", _json(self.completion())))

    def completion(self) -> dict[str, Any]:
        """A valid chat.completion saying hello."""
        text = f"hello from {self.settings.name}"
        return {
            "id": f"chatcmpl-{self.settings.name}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }

    def stream_chunk(
        self, delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None
    ) -> bytes:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.settings.name}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if usage is None
            else [],
        }
        if usage is not None:
            chunk["usage"] = usage
        return _chunk(b"data: " + _json(chunk) + b"\n\n")

    async def stream(self, payload: dict[str, Any]) -> None:
        """Chunked SSE: role, N content chunks `--chunk-delay` apart, stop, usage, [DONE]."""
        settings = self.settings
        self.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        self.write(self.stream_chunk({"role": "assistant", "content": ""}, None))
        for _ in range(settings.chunks):
            if settings.chunk_delay_s:
                await asyncio.sleep(settings.chunk_delay_s)
            self.write(self.stream_chunk({"content": f"{settings.name} "}, None))
        self.write(self.stream_chunk({}, "stop"))
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {
                "prompt_tokens": 5,
                "completion_tokens": settings.chunks,
                "total_tokens": 5 + settings.chunks,
            }
            self.write(self.stream_chunk({}, None, usage))
        self.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(host: str, port: int, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, announcing the bound address on stdout."""
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(settings, stats), host, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream {settings.name} listening on http://{host}:{bound}/v1", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--name", default="fake")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--chunks", type=int, default=3, help="content chunks per stream")
    args = parser.parse_args(argv)
    settings = Settings(args.name, args.mode, args.chunk_delay, args.chunks)
    asyncio.run(serve(args.host, args.port, settings))
    return 0


# ---- the harness, for tests


class UpstreamDidNotStart(RuntimeError):
    """The process exited or printed no banner in time; the message quotes its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Upstream:
    """A fake upstream subprocess on a fixed port: start, SIGKILL, restart on the same port."""

    def __init__(
        self,
        name: str,
        *,
        mode: str = "ok",
        port: int | None = None,
        chunk_delay_s: float = 0.0,
        chunks: int = 3,
        log_dir: Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.name = name
        self.mode = mode
        self.port = port if port is not None else free_port()
        self.chunk_delay_s = chunk_delay_s
        self.chunks = chunks
        self.log_dir = log_dir
        self.process: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL a gateway uses: `http://127.0.0.1:PORT/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        """Everything the processes printed so far."""
        return "".join(self._log)

    def start(self, timeout_s: float = 10.0) -> Upstream:
        """Spawn the process and wait for its banner; raise `UpstreamDidNotStart` with its log."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"fake upstream {self.name} is already running")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--port",
                str(self.port),
                "--name",
                self.name,
                "--mode",
                self.mode,
                "--chunk-delay",
                str(self.chunk_delay_s),
                "--chunks",
                str(self.chunks),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = threading.Event()
        self._drainer = threading.Thread(
            target=self._drain, args=(self.process.stdout, ready), daemon=True
        )
        self._drainer.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.02):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise UpstreamDidNotStart(
                    f"fake upstream {self.name} did not start on port {self.port}; "
                    f"its log:\n{self.log()[-4000:]}"
                )
        return self

    def _drain(self, stream: IO[str], ready: threading.Event) -> None:
        sink = (self.log_dir / f"{self.name}.log").open("a") if self.log_dir else None
        try:
            for line in stream:
                self._log.append(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if _READY.search(line):
                    ready.set()
        finally:
            if sink is not None:
                sink.close()

    def _reap(self) -> None:
        if self.process is None:
            return
        self.process.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the process (its connections drop at once) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._reap()

    def stop(self) -> None:
        """SIGTERM the process, SIGKILL if it lingers, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap()

    def restart(self, *, mode: str | None = None) -> Upstream:
        """Kill it if it runs, then start it again on the same port (in `mode` if given)."""
        self.kill()
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
            self.mode = mode
        return self.start()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stats(self) -> dict[str, int]:
        """`GET /stats`: requests, disconnects, connections, active."""
        import httpx  # only the harness needs it; the server runs on the stdlib alone

        response = httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5)
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats

    def requests(self) -> int:
        """POSTs this process has received since it started."""
        return self.stats()["requests"]

    def __enter__(self) -> Upstream:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


if __name__ == "__main__":
    sys.exit(main())
