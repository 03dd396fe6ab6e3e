"""Real gateway processes on free ports, and official `openai` SDK clients pointed at them.

Two processes per session: an unauthenticated `upstream` serving mock models, and the `main`
gateway under test, which serves the embedded model, mock models, and the upstream's models
through its OpenAI-compatible HTTP backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from compat_tests.support import (
    API_KEY,
    EMBEDDED,
    EMBEDDED_ALIAS,
    FLAKY,
    FLAKY_UPSTREAM,
    MAX_BODY_BYTES,
    PASSTHROUGH,
    UPSTREAM,
    Server,
)
from tests.serving import ServerDidNotStart, serve

START_TIMEOUT_S = 60.0

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under compat_tests/ is slow: it talks to real server processes."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


def _serve(name: str, config: dict[str, Any], workdir: Path) -> Iterator[Server]:
    """Run `python -m app serve` on config until the generator is closed."""
    try:
        with serve(config, workdir / name, timeout_s=START_TIMEOUT_S) as running:
            yield Server(
                name=name, base_url=running.base_url, origin=running.root, log=running.log_path
            )
    except ServerDidNotStart as exc:
        pytest.fail(f"{name} server: {exc}")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configs and logs of this session's servers."""
    return tmp_path_factory.mktemp("compat")


@pytest.fixture(scope="session")
def upstream(workdir: Path) -> Iterator[Server]:
    """An unauthenticated gateway serving mock models: the upstream of `main`."""
    config = {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60_000},
        "logging": {"level": "WARNING"},
        "models": [
            {"id": "echo", "backend": "mock:"},
            {"id": "echo-fail", "backend": "mock:", "options": {"fail_after_tokens": 3}},
        ],
    }
    yield from _serve("upstream", config, workdir)


@pytest.fixture(scope="session")
def server(upstream: Server, workdir: Path) -> Iterator[Server]:
    """The gateway under test."""
    config = {
        "model_server": {
            "host": "127.0.0.1",
            "port": 0,
            "timeout": 60_000,
            "max_body_bytes": MAX_BODY_BYTES,
        },
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "models": [
            {
                "id": EMBEDDED,
                "aliases": [EMBEDDED_ALIAS],
                "backend": "llamacpp:embedded",
                "context_length": 2048,
                # One thread: on a busy two-core runner, llama.cpp's default thread count made
                # prompt evaluation take seconds instead of ~0.2 s; one thread keeps it steady.
                "options": {"n_threads": 1},
            },
            {
                "id": UPSTREAM,
                "backend": upstream.base_url,
                "options": {"upstream_model": "echo"},
            },
            # Same name as upstream: chunks pass through without re-encoding.
            {"id": PASSTHROUGH, "backend": upstream.base_url},
            {"id": FLAKY, "backend": "mock:", "options": {"fail_after_tokens": 3}},
            {
                "id": FLAKY_UPSTREAM,
                "backend": upstream.base_url,
                "options": {"upstream_model": "echo-fail"},
            },
        ],
    }
    yield from _serve("main", config, workdir)


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[OpenAI]:
    """A sync SDK client with the master key."""
    with OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as sdk:
        yield sdk


@pytest.fixture
async def aclient(server: Server) -> AsyncIterator[AsyncOpenAI]:
    """An async SDK client with the master key, one per test (each test has its own loop)."""
    async with AsyncOpenAI(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    """A plain HTTP client on the server's origin, for what the SDK cannot send."""
    with httpx.Client(
        base_url=server.origin, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as raw:
        yield raw
