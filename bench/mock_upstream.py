"""A fast mock OpenAI upstream: raw asyncio HTTP/1.1 keep-alive, canned answers.

Answers `POST /v1/chat/completions` with a fixed chat.completion (Content-Length framing),
or, when the body asks for `"stream": true`, with a chunked SSE stream of a few chunks and
`data: [DONE]`; answers `GET /v1/models` too. Every answer is pre-encoded, so the server
costs a few microseconds per request and is never the bottleneck of a benchmark.
With `--delay-ms`, every answer is held back that long before its first byte (a slow
upstream, for failover benchmarks); the listening socket is bound with SO_REUSEADDR, so a
killed mock can be restarted on its port at once.

Run it on its own (it prints `mock upstream listening on http://127.0.0.1:PORT/v1`):

    python bench/mock_upstream.py --port 0
    python bench/mock_upstream.py --port 8001 --delay-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
from typing import cast

MODEL = "bench"
STREAM_CHUNKS = 5

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _fixed(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def completion_body() -> bytes:
    """A small valid chat.completion."""
    return _json(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there!"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        }
    )


def stream_events() -> list[bytes]:
    """The SSE events of a streamed answer: a role chunk, content chunks, a stop, [DONE]."""
    deltas: list[dict[str, object]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": f"tok{i} "} for i in range(STREAM_CHUNKS - 2)]
    deltas.append({})
    events = []
    for i, delta in enumerate(deltas):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == len(deltas) - 1 else None,
                }
            ],
        }
        events.append(b"data: " + _json(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def stream_response() -> bytes:
    """The whole chunked SSE response, headers included."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(_chunk(e) for e in stream_events()) + b"0\r\n\r\n"


class Answers:
    """The pre-encoded responses."""

    def __init__(self) -> None:
        self.completion = _fixed("200 OK", completion_body())
        self.stream = stream_response()
        self.models = _fixed(
            "200 OK",
            _json(
                {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
                }
            ),
        )
        self.not_found = _fixed("404 Not Found", _json({"error": {"message": "not found"}}))
        self.bad_request = _fixed("400 Bad Request", _json({"error": {"message": "bad request"}}))


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection; handles pipelined requests in order."""

    def __init__(self, answers: Answers, delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            total = end + 4 + length
            if len(buffer) < total:
                break
            body = buffer[end + 4 : total]
            buffer = buffer[total:]
            out.append(self.answer(head, body))
        self.buffer = buffer
        if out and self.transport is not None:
            if self.delay_s > 0:
                loop = asyncio.get_running_loop()
                loop.call_later(self.delay_s, self._write_late, b"".join(out))
            else:
                self.transport.write(b"".join(out))

    def _write_late(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def answer(self, head: bytes, body: bytes) -> bytes:
        """The response to one request."""
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        method, _, rest = line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            return self.answers.stream if _STREAM_TRUE.search(body) else self.answers.completion
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            return self.answers.models
        if method not in (b"GET", b"POST"):
            return self.answers.bad_request
        return self.answers.not_found


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(host: str, port: int, delay_s: float = 0.0) -> None:
    """Serve until SIGTERM or SIGINT, announcing the bound port on stdout."""
    answers = Answers()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(answers, delay_s), host, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"mock upstream listening on http://{host}:{bound}/v1", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="hold every answer back this long (0: none)"
    )
    args = parser.parse_args(argv)
    install_uvloop()
    asyncio.run(serve(args.host, args.port, max(0.0, args.delay_ms) / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
