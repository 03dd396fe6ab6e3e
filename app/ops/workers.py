"""`clawbot serve --workers N`: N processes on one listening socket, and their supervisor.

The parent binds the socket, forks the workers (each builds its own gateway after the fork,
so no event loop, thread or connection crosses it), prints the banner once every worker
serves, forwards SIGTERM/SIGINT (graceful stop) and SIGHUP (reload) to them, and restarts a
worker that dies unexpectedly. The kernel spreads connections over the workers' accepts.

Workers share nothing in memory, so what must agree across them has to live outside: rate
limits in Redis (with memory:// each worker would admit the whole limit: refused), keys and
the audit log in one database (an in-memory SQLite would give each worker its own: refused),
routing state in Redis to share cooldowns (else each worker learns them itself: warned).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from app.config import Config, ConfigError

log = logging.getLogger("clawbot.workers")

READY_TIMEOUT_S = 600.0
"""How long the workers get to load their models before the start counts as failed."""
CRASH_WINDOW_S = 10.0
"""A worker that dies this soon after starting, twice in a row, stops the restarts."""

WorkerMain = Callable[[Callable[[], None]], int]
"""A worker's body: serves until stopped, calls its argument once it serves, returns the exit
code."""


def check_workers(config: Config, workers: int) -> None:
    """Refuse worker counts the storage cannot support; warn where sharing is only partial."""
    if workers < 1:
        raise ConfigError(f"model_server.workers: {workers} is not a positive number")
    if workers == 1:
        return
    if config.rate_limits.storage.startswith("memory://"):
        raise ConfigError(
            f"{workers} workers need rate_limits.storage on redis:// — with memory:// every "
            "worker keeps its own counters, so together they would admit up to "
            f"{workers} times each limit"
        )
    url = config.database.url
    if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/").endswith(":")):
        raise ConfigError(
            "several workers need a database they all reach: an in-memory SQLite database "
            "would be a different one in every worker (keys created on one unknown to others)"
        )
    if config.router.state.startswith("memory://"):
        log.warning(
            "router.state is memory://: each of the %d workers learns backend cooldowns by "
            "itself; set router.state to redis:// to share them",
            workers,
        )


def _metrics_dir() -> str | None:
    """Workers' metrics are aggregated through files (prometheus-client multiprocess mode);
    returns the folder if it was made here (and is to be removed at the end)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="clawbot-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def _process_dead(pid: int) -> None:
    """Let the metrics of a worker that is gone stop counting as live (gauges)."""
    try:
        metrics = importlib.import_module("app.ledger.metrics")
    except ImportError:
        return
    mark = getattr(metrics, "mark_process_dead", None)
    if mark is not None:
        mark(pid)


class Supervisor:
    """Forks and watches the workers."""

    def __init__(self, workers: int, main: WorkerMain) -> None:
        self.workers = workers
        self.main = main
        self.children: dict[int, float] = {}
        """Worker pid → when it was started."""
        self.stopping = False
        self._ready_r, self._ready_w = os.pipe()

    def spawn(self) -> None:
        """Fork one worker."""
        pid = os.fork()
        if pid:
            self.children[pid] = time.monotonic()
            return
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._ready_r)
            code = self.main(self._say_ready)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _say_ready(self) -> None:
        os.write(self._ready_w, b"r")

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    def wait_ready(self) -> bool:
        """Until every worker said it serves; False if one died first or time ran out."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = 0
        while ready < self.workers:
            if self.stopping or time.monotonic() > deadline:
                return False
            readable, _, _ = select.select([self._ready_r], [], [], 0.2)
            if readable:
                ready += len(os.read(self._ready_r, 64))
            pid, _status = os.waitpid(-1, os.WNOHANG)
            if pid:
                log.error("worker %d exited while starting", pid)
                self.children.pop(pid, None)
                return False
        return True

    def run(self, announce: Callable[[], None]) -> int:
        """Start the workers, announce, then supervise until stopped; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        for _ in range(self.workers):
            self.spawn()
        if not self.wait_ready():
            self._forward(signal.SIGTERM, None)
            self._reap_all()
            return 1
        announce()
        log.info("%d workers serving", self.workers)
        crashes = 0
        while self.children:
            pid, status = os.wait()
            started = self.children.pop(pid, None)
            _process_dead(pid)
            if started is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.error("worker %d exited unexpectedly (code %d); starting another", pid, code)
            crashes = crashes + 1 if time.monotonic() - started < CRASH_WINDOW_S else 0
            if crashes >= 2:
                log.error("workers keep dying right after they start; stopping")
                self._forward(signal.SIGTERM, None)
                continue
            self.spawn()
        return 1 if crashes >= 2 else 0

    def _reap_all(self) -> None:
        while self.children:
            pid, _ = os.wait()
            self.children.pop(pid, None)
            _process_dead(pid)


def supervise(workers: int, main: WorkerMain, announce: Callable[[], None]) -> int:
    """Run `main` in `workers` forked processes; see the module docstring."""
    made = _metrics_dir()
    try:
        return Supervisor(workers, main).run(announce)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
