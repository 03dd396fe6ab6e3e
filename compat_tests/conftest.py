"""Real gateway processes on free ports, and official `openai` SDK clients pointed at them.

Two processes per session: an unauthenticated `upstream` serving mock models, and the `main`
gateway under test, which serves the embedded model, mock models, and the upstream's models
through its OpenAI-compatible HTTP backend.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

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

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

_BANNER = re.compile(r"clawbot \S+ serving on (?P<base>http://127\.0\.0\.1:(?P<port>\d+)/v1)\s*$")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under compat_tests/ is slow: it talks to real server processes."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


def _drain(stream: IO[str], lines: queue.Queue[str | None], log: Path) -> None:
    """Copy the child's stdout to its log, handing lines over until the stream ends."""
    with log.open("a", encoding="utf-8") as sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            lines.put(line)
    lines.put(None)


def _await_banner(
    proc: subprocess.Popen[str], lines: queue.Queue[str | None], name: str, log: Path
) -> re.Match[str]:
    """The banner line's match, or a failure quoting the server's log."""
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            reason = f"printed no banner within {START_TIMEOUT_S:.0f}s"
            break
        if line is None:
            reason = f"exited with status {proc.wait()} before printing its banner"
            break
        match = _BANNER.search(line)
        if match:
            return match
    proc.kill()
    proc.wait()
    pytest.fail(f"{name} server {reason}; log:\n{log.read_text(errors='replace')[-4000:]}")


def _serve(name: str, config: dict[str, Any], workdir: Path) -> Iterator[Server]:
    """Run `python -m app serve --port 0` on config until the generator is closed."""
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "app", "serve", "--config", str(config_path), "--port", "0"]
    with (
        log.open("w", encoding="utf-8") as stderr,
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=_HERE.parent,
        ) as proc,
    ):
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        drainer = threading.Thread(
            target=_drain, args=(proc.stdout, lines, workdir / f"{name}.stdout.log"), daemon=True
        )
        drainer.start()
        try:
            match = _await_banner(proc, lines, name, log)
            origin = match.group("base").removesuffix("/v1")
            yield Server(name=name, base_url=match.group("base"), origin=origin, log=log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            drainer.join(timeout=STOP_TIMEOUT_S)


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
