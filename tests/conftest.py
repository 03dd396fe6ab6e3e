"""Shared fixtures: a gateway on mock backends, served on the test's own event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg
import httpx
import pytest
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy.engine import make_url

from app.api.app import create_app
from app.config import Config, parse_config
from app.core.gateway import Gateway
from app.ledger.storage.database import Database
from tests.services import POSTGRES_URL, require_postgres

MASTER_KEY = "sk-test-master"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


class AppClient(httpx.AsyncClient):
    """An HTTP client for an ASGI app served on the test's own event loop, lifespan included.

    Litestar's AsyncTestClient serves the app on a second event loop in a portal thread. A test
    that also awaits the gateway's objects (audit writer, database, key cache) then drives one
    loop's futures from another, and asyncio wakes no loop across threads: such a test waited
    out its timeouts, and on a busy machine hung for good. Here the test and the app share one
    loop, so a test may await anything the app owns.
    """

    def __init__(self, app: ASGIApp, *, peer: str = "testclient") -> None:
        super().__init__(
            transport=httpx.ASGITransport(app=app, client=(peer, 50000)),  # type: ignore[arg-type]
            base_url="http://testserver.local",
        )
        self.app = app
        self._lifespan = _Lifespan(app)

    async def __aenter__(self) -> Self:
        await self._lifespan.startup()
        try:
            await super().__aenter__()
        except BaseException:
            await self._lifespan.shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, traceback)
        finally:
            await self._lifespan.shutdown()


def post_scope(path: str, authorization: str) -> dict[str, Any]:
    """The ASGI scope of a JSON POST, for a test that drives the app itself (AppClient reads
    whole responses; a test that must act mid-answer calls `client.app` with this)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"authorization", authorization.encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }


def receive_body(body: bytes, ended: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI receive: the request body, then a disconnect once `ended` is set (as a server
    reports it after the answer has ended)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await ended.wait()
        return {"type": "http.disconnect"}

    return receive


class _Lifespan:
    """The ASGI lifespan protocol, spoken to `app` as a server does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(
            self.app(scope, self._inbox.get, self._outbox.put)  # type: ignore[arg-type]
        )
        await self._exchange("startup")

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            await self._exchange("shutdown")
        if self._task is not None:
            await self._task

    async def _exchange(self, phase: str) -> None:
        await self._inbox.put({"type": f"lifespan.{phase}"})
        answer = asyncio.ensure_future(self._outbox.get())
        assert self._task is not None
        await asyncio.wait({answer, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            self._task.result()  # the app's own error, if it raised one
            raise RuntimeError(f"the app ended during lifespan {phase}")
        message = answer.result()
        if message["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"lifespan {phase} failed: {message.get('message', '')}")


class Peer:
    """Puts the connection's address into each request's scope, as a server would."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # type: ignore[comparison-overlap]
            scope["client"] = (self.host, 40000)
        await self.app(scope, receive, send)


async def until(predicate: Callable[[], Any], timeout_s: float = 3.0) -> None:
    """Wait until `predicate()` holds, polling every 20 ms; AssertionError after the timeout."""
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def make_config(
    models: list[dict[str, Any]] | None = None, api_key: str = MASTER_KEY, **server: Any
) -> Config:
    """A config with mock models unless others are given."""
    if models is None:
        models = [
            {"id": "mock", "aliases": ["gpt-4o-mini"], "backend": "mock:", "context_length": 4096},
            {"id": "fixed", "backend": "mock:", "options": {"reply": "one two three four five"}},
            {"id": "broken", "backend": "mock:", "options": {"fail_after_tokens": 2}},
        ]
    return parse_config(
        {
            "model_server": server,
            "auth": {"api_key": api_key},
            "database": {"url": "sqlite+aiosqlite://"},  # in memory
            "models": models,
        }
    )


ClientFactory = Callable[..., Any]


async def away_from_minute_boundary(margin_s: float = 5.0) -> None:
    """Wait past the next minute if it is near: memory:// rate windows follow clock minutes,
    and a test that counts requests must not have its window roll over halfway."""
    into = time.time() % 60
    if into > 60 - margin_s:
        await asyncio.sleep(60 - into + 0.05)


@pytest.fixture(autouse=True)
def _isolated_process_state() -> Iterator[None]:
    """Tests that run the CLI in-process set up logging (and may set multiprocess metrics);
    what they leave behind must not reach the next test: a handler on a closed capture
    stream, or aggregation over another test's metric files."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if metrics_dir is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    require_postgres()
    base = make_url(POSTGRES_URL)
    name = f"clawbot_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(
        host=base.host, port=base.port, user=base.username, database=base.database
    )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database the gateway supports: a SQLite file, and the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'clawbot.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database of each kind."""
    database = Database(database_url)
    try:
        await database.upgrade()
        yield database
    finally:
        await database.aclose()


@pytest.fixture
async def client() -> AsyncIterator[AppClient]:
    """A started gateway with the default mock models and the master key."""
    async with AppClient(create_app(Gateway.from_config(make_config()))) as c:
        yield c


@pytest.fixture
def make_client() -> Callable[[Config], AppClient]:
    """Build a test client for a custom config (use it as an async context manager)."""

    def build(config: Config) -> AppClient:
        return AppClient(create_app(Gateway.from_config(config)))

    return build
