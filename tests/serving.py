"""Run `clawbot serve` as a real subprocess on a free port, for tests that need a process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class ServerDidNotStart(RuntimeError):
    """The process exited or printed no banner in time; the message quotes its log."""


_READY = re.compile(r"serving on (?P<url>https?://\S+/v1)")
_BANNER_END = re.compile(r"^  \S+ -c 'import os; from openai import OpenAI")
"""The banner's last line (app/ops/cli.py): the server is ready once the whole banner is logged,
so a test reading the log at once sees all of it (under load it once saw only its first lines)."""


@dataclass
class Server:
    """A running gateway process."""

    process: subprocess.Popen[str]
    base_url: str
    """E.g. http://127.0.0.1:PORT/v1."""
    log_path: Path

    @property
    def root(self) -> str:
        """The URL without /v1."""
        return self.base_url.removesuffix("/v1")

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")


def _drain(stream: IO[str], sink: IO[str], ready: threading.Event, found: list[str]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        match = _READY.search(line)
        if match and not found:
            found.append(match.group("url"))
        elif found and not ready.is_set() and _BANNER_END.match(line):
            ready.set()


@contextmanager
def serve(
    config: dict[str, Any],
    workdir: Path,
    *,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start `clawbot serve` on `config` (port forced to 0), yield it once models are loaded."""
    config = {**config, "model_server": {**config.get("model_server", {}), "port": 0}}
    config.setdefault("database", {"url": "sqlite+aiosqlite:///clawbot.db"})  # in workdir
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "clawbot.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"},
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        },
    )
    ready, found = threading.Event(), []
    sink = log_path.open("w")
    assert process.stdout is not None
    drainer = threading.Thread(
        target=_drain, args=(process.stdout, sink, ready, found), daemon=True
    )
    drainer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerDidNotStart(
                    f"clawbot did not start; its log:\n{log_path.read_text()[-4000:]}"
                )
        yield Server(process, found[0], log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        drainer.join(timeout=5)
        sink.close()
        process.stdout.close()
