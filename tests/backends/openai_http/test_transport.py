"""The pooled HTTP/1.1 transport against real asyncio servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from backends.openai_http.transport import PooledTransport

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Request:
    """One request as the server read it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int
    """Which connection (1-based) it came on."""


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]
"""Answers a request; returns whether to keep the connection open for another."""


@dataclass
class Upstream:
    """A raw HTTP/1.1 server: each connection reads requests until the handler says stop."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        try:
            while request := await read_request(reader, number):
                self.requests.append(request)
                if not await self.handler(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def read_request(reader: asyncio.StreamReader, connection: int) -> Request | None:
    """The next request on the connection, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    method, path, _ = line.split(" ")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    return Request(method, path, headers, body, connection)


ServerFactory = Callable[..., Awaitable[Upstream]]
ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    """Start upstreams for the test; all are closed after it."""
    started: list[Upstream] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Upstream:
        upstream = Upstream(handler, tls)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """httpx clients over a PooledTransport built with the given options; closed after."""
    clients: list[httpx.AsyncClient] = []

    def build(timeout: float = 5.0, **options: float) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=PooledTransport(**options),  # type: ignore[arg-type]
            timeout=timeout,
        )
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.aclose()


async def ok(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    return True


async def echo(request: Request, writer: asyncio.StreamWriter) -> bool:
    body = f"{request.method} {request.path} {request.body.decode()}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return True


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# ---- keep-alive and the pool


async def test_sequential_requests_share_one_connection(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    upstream = await serve(echo)
    client = make_client()
    for i in range(5):
        response = await client.post(f"{upstream.url}/v1/x?i={i}", content=b"hello")
        assert response.text == f"POST /v1/x?i={i} hello"
        assert response.http_version == "HTTP/1.1"
    assert upstream.connections == 1
    assert upstream.requests[0].headers["host"] == f"127.0.0.1:{upstream.port}"
    assert upstream.requests[0].headers["content-length"] == "5"


async def test_concurrency_opens_up_to_max_connections_and_the_next_waits(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    release = asyncio.Event()
    arrived = 0

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        nonlocal arrived
        arrived += 1
        await release.wait()
        writer.write(OK)
        return True

    upstream = await serve(held)
    client = make_client(max_connections=2)
    tasks = [asyncio.create_task(client.get(upstream.url)) for _ in range(3)]
    for _ in range(50):
        await asyncio.sleep(0.01)
        if arrived == 2:
            break
    await asyncio.sleep(0.05)
    assert (upstream.connections, arrived) == (2, 2)
    release.set()
    responses = await asyncio.gather(*tasks)
    assert [r.text for r in responses] == ["ok"] * 3
    assert upstream.connections == 2
    assert len(upstream.requests) == 3


async def test_pool_timeout(serve: ServerFactory, make_client: ClientFactory) -> None:
    upstream = await serve(ok)
    client = make_client(max_connections=1)
    async with client.stream("GET", upstream.url) as held:
        assert held.status_code == 200
        with pytest.raises(httpx.PoolTimeout):
            await client.get(upstream.url, timeout=httpx.Timeout(5.0, pool=0.05))
    assert (await client.get(upstream.url)).text == "ok"
    assert upstream.connections == 1


async def test_idle_connections_past_keepalive_expiry_are_not_reused(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    upstream = await serve(ok)
    client = make_client(keepalive_expiry=0.05)
    await client.get(upstream.url)
    await asyncio.sleep(0.1)
    await client.get(upstream.url)
    assert upstream.connections == 2


async def test_a_full_pool_closes_an_idle_connection_of_another_origin(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    first, second = await serve(ok), await serve(ok)
    client = make_client(max_connections=1)
    assert (await client.get(first.url)).text == "ok"
    assert (await client.get(second.url)).text == "ok"
    assert (await client.get(first.url)).text == "ok"
    assert (first.connections, second.connections) == (2, 1)


async def test_aclose_closes_idle_connections(serve: ServerFactory) -> None:
    upstream = await serve(ok)
    transport = PooledTransport()
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(upstream.url)
        assert upstream._writers
    for _ in range(50):
        if not upstream._writers:
            break
        await asyncio.sleep(0.01)
    assert not upstream._writers


# ---- response framing


async def test_chunked_body(serve: ServerFactory, make_client: ClientFactory) -> None:
    async def chunked(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            writer.write(chunk(part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    upstream = await serve(chunked)
    client = make_client()
    assert (await client.get(upstream.url)).text == "hello chunked world"
    assert (await client.get(upstream.url)).text == "hello chunked world"
    assert upstream.connections == 1


async def test_close_delimited_body(serve: ServerFactory, make_client: ClientFactory) -> None:
    async def until_close(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")
        return False

    upstream = await serve(until_close)
    client = make_client()
    assert (await client.get(upstream.url)).text == "part one, part two"
    assert (await client.get(upstream.url)).text == "part one, part two"
    assert upstream.connections == 2


async def test_large_body_is_complete(serve: ServerFactory, make_client: ClientFactory) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: past the read high-water mark

    async def large(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()
        return True

    upstream = await serve(large)
    client = make_client()
    async with client.stream("POST", upstream.url, content=payload) as response:
        await asyncio.sleep(0.05)  # let the unread body back up
        assert await response.aread() == payload
    assert upstream.requests[0].body == payload
    assert (await client.get(upstream.url)).content == payload
    assert upstream.connections == 1


async def test_no_body_statuses_and_head(serve: ServerFactory, make_client: ClientFactory) -> None:
    async def no_body(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    upstream = await serve(no_body)
    client = make_client()
    assert (await client.delete(upstream.url)).status_code == 204
    assert (await client.delete(upstream.url)).status_code == 204
    head = await client.head(upstream.url)
    assert (head.status_code, head.content) == (200, b"")
    assert (await client.delete(upstream.url)).status_code == 204


async def test_informational_response_is_skipped(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def early_hints(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + OK)
        return True

    upstream = await serve(early_hints)
    client = make_client()
    response = await client.get(upstream.url)
    assert (response.status_code, response.text) == (200, "ok")
    assert "link" not in response.headers


async def test_connection_close_from_the_server_is_honored(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def close_header(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await asyncio.sleep(0.05)  # the socket stays open a while: only the header says close
        return False

    upstream = await serve(close_header)
    client = make_client()
    assert (await client.get(upstream.url)).text == "ok"
    assert (await client.get(upstream.url)).text == "ok"
    assert upstream.connections == 2


async def test_connection_close_from_the_client_is_honored(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    upstream = await serve(ok)
    client = make_client()
    await client.get(upstream.url, headers={"connection": "close"})
    await client.get(upstream.url)
    assert upstream.connections == 2


# ---- request bodies


async def test_streamed_request_body_is_chunked(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two ", b"three"):
            yield part

    upstream = await serve(echo)
    client = make_client()
    response = await client.post(upstream.url + "/s", content=parts())
    assert response.text == "POST /s one two three"
    assert upstream.requests[0].headers["transfer-encoding"] == "chunked"


# ---- streaming


async def test_body_is_streamed_incrementally(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    first_seen = asyncio.Event()

    async def sse(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await writer.drain()
        await first_seen.wait()
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        return True

    upstream = await serve(sse)
    client = make_client()
    async with client.stream("GET", upstream.url) as response:
        received = []
        async for data in response.aiter_raw():
            received.append(data)
            first_seen.set()
    assert received == [b"data: 1\n\n", b"data: 2\n\n"]
    assert (await client.get(upstream.url)).text == "data: 1\n\ndata: 2\n\n"
    assert upstream.connections == 1


async def test_early_close_of_a_stream_drops_its_connection(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    stop = asyncio.Event()

    async def endless(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.path == "/ok":
            writer.write(OK)
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while not stop.is_set():
            writer.write(chunk(b"data: tick\n\n"))
            await writer.drain()
            await asyncio.sleep(0.005)
        return False

    upstream = await serve(endless)
    client = make_client(max_connections=1)
    async with client.stream("GET", upstream.url + "/sse") as response:
        async for _ in response.aiter_raw():
            break
    assert (await client.get(upstream.url + "/ok")).text == "ok"
    assert upstream.connections == 2
    stop.set()


# ---- failures


async def test_stale_idle_connection_is_replaced(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def one_per_connection(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK)  # says keep-alive, then closes
        return False

    upstream = await serve(one_per_connection)
    client = make_client()
    for _ in range(3):
        assert (await client.get(upstream.url)).text == "ok"
        await asyncio.sleep(0.02)
    assert upstream.connections == 3


async def test_keepalive_closed_as_the_request_is_sent_is_retried(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def drop_second(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1 and len(upstream.requests) == 2:
            return False  # the race: the server timed the connection out as our request came
        writer.write(OK)
        return True

    upstream = await serve(drop_second)
    client = make_client()
    assert (await client.post(upstream.url, content=b"a")).text == "ok"
    assert (await client.post(upstream.url, content=b"b")).text == "ok"
    assert [(r.connection, r.body) for r in upstream.requests] == [(1, b"a"), (1, b"b"), (2, b"b")]


async def test_a_fresh_connection_closed_without_answer_is_not_retried(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def hang_up(request: Request, writer: asyncio.StreamWriter) -> bool:
        return False

    upstream = await serve(hang_up)
    client = make_client()
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(upstream.url)
    assert upstream.connections == 1


@pytest.mark.parametrize(
    "partial",
    [
        b"content-length: 100\r\n\r\nonly a few bytes",
        b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_server_closing_mid_body(
    serve: ServerFactory, make_client: ClientFactory, partial: bytes
) -> None:
    async def cut(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n" + partial)
        return False

    upstream = await serve(cut)
    client = make_client()
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(upstream.url)
    assert upstream.connections == 2


async def test_malformed_response(serve: ServerFactory, make_client: ClientFactory) -> None:
    async def garbage(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 abc\r\n\r\n")
        return True

    upstream = await serve(garbage)
    with pytest.raises(httpx.RemoteProtocolError):
        await make_client().get(upstream.url)


async def test_connect_refused(make_client: ClientFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await make_client().get(f"http://127.0.0.1:{port}/")


async def test_read_timeout_waiting_for_the_head(
    serve: ServerFactory, make_client: ClientFactory
) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1)
        return False

    upstream = await serve(silent)
    with pytest.raises(httpx.ReadTimeout):
        await make_client(timeout=0.05).get(upstream.url)


async def test_read_timeout_is_per_read(serve: ServerFactory, make_client: ClientFactory) -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(4):  # 0.16 s in all, but never 0.1 s without a byte
            await asyncio.sleep(0.04)
            writer.write(chunk(b"."))
        await asyncio.sleep(0.3)
        writer.write(b"0\r\n\r\n")
        return True

    upstream = await serve(slow)
    client = make_client(timeout=0.1)
    received: list[bytes] = []

    async def read_all(response: httpx.Response) -> None:
        async for data in response.aiter_raw():
            received.append(data)

    async with client.stream("GET", upstream.url) as response:
        with pytest.raises(httpx.ReadTimeout):
            await read_all(response)
    assert b"".join(received) == b"...."


# ---- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1, its key in the same PEM file."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    path = tmp_path_factory.mktemp("tls") / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(path), "-out", str(path)),
        ],
        check=True,
        capture_output=True,
    )
    return path


async def test_https_with_a_trusted_certificate(serve: ServerFactory, certificate: Path) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificate)
    upstream = await serve(echo, server_tls)
    client_tls = ssl.create_default_context(cafile=str(certificate))
    async with httpx.AsyncClient(transport=PooledTransport(ssl_context=client_tls)) as client:
        for _ in range(2):
            assert (await client.post(upstream.url + "/t", content=b"x")).text == "POST /t x"
    assert upstream.connections == 1


async def test_https_with_an_untrusted_certificate(
    serve: ServerFactory, make_client: ClientFactory, certificate: Path
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificate)
    upstream = await serve(ok, server_tls)
    with pytest.raises(httpx.ConnectError):
        await make_client().get(upstream.url)
