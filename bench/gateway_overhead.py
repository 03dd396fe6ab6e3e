"""How much latency and throughput clawbot costs in front of a fast OpenAI upstream.

Starts a mock upstream (`bench/mock_upstream.py`) and one `clawbot serve` per mode with the
`openai_http` backend, each in its own process, then loads the upstream directly and through
each clawbot with `bench/loadgen.py` (a third process), non-streamed and streamed, at each
concurrency, and prints a table per mode with the targets. The modes (`--modes`):

  auth   auth-only: the master key, no per-key limits, audit off
  full   keys+limits+audit: a key from the database (made with POST /admin/keys) with huge
         rpm/tpm limits, the memory:// limiter, the audit log on (SQLite in the temp dir)
  redis  as full, with the limiter on redis://127.0.0.1:6379/13 (skipped if unreachable)
  keys   as full without the audit log; audit: auth-only with the audit log (to attribute
         the cost of full to its parts)
  pool3  as auth, but the model is a pool of 3 deployments under weighted_round_robin (equal
         weights, so requests rotate over all three); all three point at the one mock
         upstream under distinct names: three mock processes would compete for the CPU of a
         small machine and blur the comparison, while the router's work (strategy, breaker
         bookkeeping, one HTTP client and connection pool per deployment, health checks of
         each) is the same whichever address the deployments share

Cells are interleaved (direct, then every mode, at each coordinate) so drift in the
machine's load hits all modes alike; a cell with other load above 0.25 cores is measured
again (`--noisy-retries`). A comparison section puts each other mode against auth-only
(req/s and CPU per request, target within 15 % for the full modes, within 5 % (noise) for
pool3), and after stopping a mode with the audit on (SIGTERM, which flushes the log) its
audit rows are counted against the requests sent.
Exits 0 unless the run itself fails, or, with `--check`, a target is missed.

    .venv/bin/python bench/gateway_overhead.py              # 1 s warm-up + 5 s per cell
    .venv/bin/python bench/gateway_overhead.py --quick      # ~1 s per cell, a smoke test
    .venv/bin/python bench/gateway_overhead.py --modes auth,full,redis --duration 3
    .venv/bin/python bench/gateway_overhead.py --modes auth,pool3 --duration 3
    .venv/bin/python bench/gateway_overhead.py --json out.json --profile /tmp/clawbot.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
API_KEY = "sk-bench"
MODEL = "bench"
CHAT_PATH = "/v1/chat/completions"

TARGET_RPS = 1000.0
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_CONCURRENCY = 16
NOISY_CORES = 0.25
"""Cores used by processes outside the benchmark above which a cell is flagged as noisy."""
TARGET_FULL_RATIO = 0.15
"""Keys+limits+audit may cost at most this much more than auth-only (req/s and CPU/req)."""
TARGET_POOL_RATIO = 0.05
"""A pool of deployments may cost at most this much more than one backend: within noise."""
POOL_STRATEGY = "weighted_round_robin"
"""The pool modes' strategy: with equal weights it rotates, so every deployment is used."""
COMPARED_CONCURRENCIES = (1, TARGET_CONCURRENCY)
REDIS_URL = "redis://127.0.0.1:6379/13"
BENCH_KEY = {"name": "bench", "requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000}
"""The per-key limits of the full modes: checked on every request, never reached."""
STOP_GRACE_S = 45.0
"""How long a clawbot gets to exit on SIGTERM (its graceful shutdown is 30 s, then the flush)."""

_UPSTREAM_READY = re.compile(r"listening on http://[^:]+:(\d+)/v1")
_CLAWBOT_READY = re.compile(r"serving on http://[^:]+:(\d+)/v1")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Measured(msgspec.Struct, kw_only=True):
    """One cell of the table: a target loaded in one mode at one concurrency."""

    target: str = ""
    concurrency: int
    stream: bool
    rate: float | None = None
    """Offered req/s for open-loop cells; None for closed loop."""
    duration_s: float
    warmup_requests: int
    sent: int
    ok: int
    errors: int
    rps: float
    p50_ms: float | None
    """Full response time, or time to the first SSE data chunk when streaming."""
    p99_ms: float | None
    full_p50_ms: float | None
    """Full response time, streams included."""
    full_p99_ms: float | None
    first_error: str | None = None
    server_cpu_ms: float | None = None
    """CPU time per request of the process answering (the mock, or clawbot alone)."""
    other_cores: float | None = None
    """Cores busy with processes outside the benchmark during the cell (Linux only)."""


class Check(msgspec.Struct, kw_only=True):
    """One target and whether it was met."""

    name: str
    value: float | None
    target: str
    passed: bool


class AuditCount(msgspec.Struct, kw_only=True):
    """The audit rows one mode's clawbot wrote, against the requests the bench sent it."""

    mode: str
    chat_requests: int
    """Chat requests loadgen sent (warm-ups, retries and the profile included)."""
    chat_rows: int | None
    """Audit rows for the chat route after clawbot exited; None if the table was unreadable."""
    admin_rows: int | None
    """Audit rows for /admin/ routes (the key creation)."""
    exit_code: int | None
    """clawbot's exit status after SIGTERM (None: it had to be killed)."""
    request_errors: int
    """Requests loadgen counted as failed (a timed-out one may or may not have a row)."""


class Report(msgspec.Struct, kw_only=True):
    """Everything one run measured, as `--json` writes it."""

    machine: dict[str, str]
    settings: dict[str, float | str]
    cells: list[Measured]
    checks: list[Check]
    audit: list[AuditCount] = []


@dataclass(frozen=True, slots=True)
class Mode:
    """One way of configuring clawbot; its name labels its rows in the tables."""

    name: str
    title: str
    db_key: bool
    """Authenticate with a key from the database (with per-key limits), not the master key."""
    audit: bool
    storage: str
    """The rate limiter's storage URI."""
    deployments: int = 1
    """Above 1: the model is a pool of this many deployments (all in front of the one mock)."""
    target_ratio: float = TARGET_FULL_RATIO
    """How much more than auth-only it may cost (req/s and CPU/req) in the comparison."""


MODES = {
    m.name: m
    for m in (
        Mode(
            "auth", "auth-only: master key, no per-key limits, audit off", False, False, "memory://"
        ),
        Mode(
            "full",
            "keys+limits+audit: DB key with rpm/tpm limits, memory:// limiter, audit to SQLite",
            True,
            True,
            "memory://",
        ),
        Mode(
            "keys",
            "keys+limits: DB key with rpm/tpm limits, memory:// limiter, audit off",
            True,
            False,
            "memory://",
        ),
        Mode(
            "audit",
            "audit only: master key, no per-key limits, audit to SQLite",
            False,
            True,
            "memory://",
        ),
        Mode(
            "redis",
            f"keys+limits+audit with the limiter on {REDIS_URL}, audit to SQLite",
            True,
            True,
            REDIS_URL,
        ),
        Mode(
            "pool3",
            f"auth-only with a pool of 3 deployments ({POOL_STRATEGY}) on the one mock",
            False,
            False,
            "memory://",
            deployments=3,
            target_ratio=TARGET_POOL_RATIO,
        ),
    )
}
BASELINE = "auth"


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard to load each cell."""

    duration_s: float
    warmup_s: float
    concurrencies: tuple[int, ...]
    rate: float
    timeout_s: float = 10.0
    noisy_retries: int = 0


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Service:
    """A child process that announces its port on stdout; stopped on `close`."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.out = logdir / f"{name}.out"
        self.err = logdir / f"{name}.err"
        preexec: Callable[[], None] | None = _die_with_parent if sys.platform == "linux" else None
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # so Ctrl-C reaches only the benchmark, which stops it
                preexec_fn=preexec,  # the benchmark starts no threads
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def wait_ready(self, pattern: re.Pattern[str], timeout_s: float = 60.0) -> int:
        """Wait for `pattern` on stdout; return its first group as the port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(self.out.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start within {timeout_s:.0f}s:\n{self.tail()}")

    def cpu_s(self) -> float | None:
        """User + system CPU seconds the child has used so far (Linux only)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def tail(self, lines: int = 20) -> str:
        """The end of the child's stderr."""
        text = self.err.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the child and wait up to `grace_s`; kill it if it lingers (returns None)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


def machine_busy_s() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux only)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def children_cpu_s() -> float:
    """CPU seconds of the finished children this process waited for (the loadgen runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(slots=True)
class Target:
    """Where a cell's requests go, and the processes whose CPU is ours."""

    name: str
    port: int
    server: Service
    services: tuple[Service, ...]
    api_key: str = API_KEY
    requests: int = 0
    """Requests sent to it so far (warm-ups and re-measured cells included)."""
    errors: int = 0
    """Of those, the ones loadgen counted as failed."""


def clawbot_argv(config: Path, command: str | None = None) -> list[str]:
    """`clawbot serve` on any free port: `command`, else the running interpreter's clawbot."""
    if command:
        base = shlex.split(command)
    else:
        script = Path(sys.executable).with_name("clawbot")
        base = [str(script)] if script.exists() else [sys.executable, "-m", "app"]
    return [*base, "serve", "--config", str(config), "--port", "0"]


def model_config(upstream_port: int, mode: Mode) -> dict[str, object]:
    """The bench model: one `openai_http` backend, or a pool of them, in front of the mock."""
    backend = f"http://127.0.0.1:{upstream_port}/v1"
    if mode.deployments <= 1:
        return {"id": MODEL, "backend": backend}
    return {
        "id": MODEL,
        "routing": {"strategy": POOL_STRATEGY},
        "deployments": [{"name": f"d{i}", "backend": backend} for i in range(mode.deployments)],
    }


def clawbot_config(upstream_port: int, mode: Mode, database: Path) -> dict[str, object]:
    """The gateway config: one `openai_http` model (or pool) in front of the mock, auth on."""
    return {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60000},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "database": {"url": f"sqlite+aiosqlite:///{database}"},
        "rate_limits": {"storage": mode.storage},
        "audit": {"enabled": mode.audit},
        "models": [model_config(upstream_port, mode)],
    }


def create_key(port: int) -> str:
    """A database key with huge limits, made through the admin API with the master key."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/keys",
        data=json.dumps(BENCH_KEY).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST /admin/keys: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except OSError as exc:
        raise RuntimeError(f"POST /admin/keys failed: {exc}") from exc
    key = json.loads(body).get("key") if status == 201 else None
    if not isinstance(key, str) or not key:
        raise RuntimeError(f"POST /admin/keys: HTTP {status}, no key in {body[:500]!r}")
    return key


def pool_usage(port: int, mode: str) -> str:
    """How the pool's requests spread over its deployments, from `GET /admin/backends`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/backends",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            pools = json.loads(response.read())["data"]
    except (OSError, ValueError, KeyError) as exc:
        return f"pool {mode}: GET /admin/backends failed: {exc}"
    parts = []
    for pool in pools:
        if pool.get("model") != MODEL:
            continue
        for d in pool["deployments"]:
            parts.append(
                f"{d['name']} {d['total_successes']:,} ok / {d['total_failures']:,} failed"
                f"{'' if d['healthy'] else ' (unhealthy)'}"
            )
    return f"pool {mode}, requests per deployment: " + ", ".join(parts)


def redis_reachable(url: str = REDIS_URL) -> bool:
    """Whether something answers PING on the Redis host and port of `url`."""
    hostport = url.removeprefix("redis://").split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def count_audit_rows(database: Path) -> tuple[int | None, int | None]:
    """Audit rows for the chat route and for /admin/ routes, read after clawbot exited."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            chat = db.execute("SELECT count(*) FROM audit_log WHERE route = ?", (CHAT_PATH,))
            chat_rows = int(chat.fetchone()[0])
            admin = db.execute("SELECT count(*) FROM audit_log WHERE route LIKE '/admin/%'")
            return chat_rows, int(admin.fetchone()[0])
    except sqlite3.Error:
        return None, None


def request_body(stream: bool) -> str:
    """The chat request every cell sends."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def loadgen_argv(
    port: int,
    stream: bool,
    concurrency: int,
    settings: Settings,
    rate: float | None,
    api_key: str = API_KEY,
) -> list[str]:
    """The loadgen command for one cell."""
    argv = [
        sys.executable, str(BENCH / "loadgen.py"),
        "--port", str(port),
        "--path", CHAT_PATH,
        "--body", request_body(stream),
        "--header", f"Authorization: Bearer {api_key}",
        "--concurrency", str(concurrency),
        "--duration", str(settings.duration_s),
        "--warmup", str(settings.warmup_s),
        "--timeout", str(settings.timeout_s),
    ]  # fmt: skip
    if stream:
        argv.append("--stream")
    if rate is not None:
        argv += ["--rate", str(rate)]
    return argv


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def measure(
    target: Target, stream: bool, concurrency: int, settings: Settings, rate: float | None = None
) -> Measured:
    """Run one loadgen process against `target`; add CPU accounting to what it measured."""
    argv = loadgen_argv(target.port, stream, concurrency, settings, rate, target.api_key)
    budget = settings.duration_s + settings.warmup_s + 2 * settings.timeout_s + 30
    ours = [s.cpu_s() for s in target.services]
    server, busy, children = target.server.cpu_s(), machine_busy_s(), children_cpu_s()
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        timeout=budget,
        check=False,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    measured = msgspec.json.decode(done.stdout, type=Measured)
    measured.target = target.name
    server_s = _delta(target.server.cpu_s(), server)
    requests = measured.warmup_requests + measured.sent
    target.requests += requests
    target.errors += measured.errors
    if server_s is not None and requests:
        measured.server_cpu_ms = server_s / requests * 1000
    used = [_delta(s.cpu_s(), before) for s, before in zip(target.services, ours, strict=True)]
    busy_s = _delta(machine_busy_s(), busy)
    if busy_s is not None and None not in used:
        ours_s = sum(u for u in used if u is not None) + children_cpu_s() - children
        measured.other_cores = max(0.0, busy_s - ours_s) / wall
    return measured


def measure_steady(
    target: Target,
    stream: bool,
    concurrency: int,
    settings: Settings,
    rate: float | None = None,
) -> Measured:
    """`measure`, again while other processes loaded the machine; the quietest try is kept."""
    best = measure(target, stream, concurrency, settings, rate)
    for _ in range(settings.noisy_retries):
        if (best.other_cores or 0.0) <= NOISY_CORES:
            break
        print("r", end="", flush=True)
        again = measure(target, stream, concurrency, settings, rate)
        if (again.other_cores or 0.0) < (best.other_cores or 0.0):
            best = again
    return best


def machine_info() -> dict[str, str]:
    """CPU, OS and interpreter facts that decide how comparable two runs are."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": f"{os.cpu_count()} ({usable} usable){f', {model}' if model else ''}",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loop": loop,
    }


def _num(value: float | None, spec: str = ".2f") -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


def table(cells: Sequence[Measured]) -> str:
    """The main table; for streams p50/p99 are time to first chunk."""
    header = (
        f"{'target':<8} {'mode':<10} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'full p50':>9} {'full p99':>9} {'errors':>6} {'cpu ms/req':>10} {'other load':>10}"
    )
    rows = [header, "-" * len(header)]
    for c in cells:
        rows.append(
            f"{c.target:<8} {'stream' if c.stream else 'non-stream':<10} {c.concurrency:>4} "
            f"{c.rps:>8,.0f} {_num(c.p50_ms):>8} {_num(c.p99_ms):>8} "
            f"{_num(c.full_p50_ms):>9} {_num(c.full_p99_ms):>9} {c.errors:>6} "
            f"{_num(c.server_cpu_ms, '.3f'):>10} {_num(c.other_cores):>10}"
        )
    return "\n".join(rows)


def find(cells: Sequence[Measured], target: str, stream: bool, concurrency: int) -> Measured | None:
    """The closed-loop cell for these coordinates, if it was measured."""
    for c in cells:
        if (c.target, c.stream, c.concurrency, c.rate) == (target, stream, concurrency, None):
            return c
    return None


def added_latency(
    direct: Measured | None, clawbot: Measured | None, what: str
) -> tuple[list[str], list[Check]]:
    """Lines and checks for clawbot's added p50/p99 in one pair of cells."""
    if direct is None or clawbot is None:
        return [], []
    lines, checks = [], []
    for pct, limit in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
        added = _delta(getattr(clawbot, f"{pct}_ms"), getattr(direct, f"{pct}_ms"))
        passed = added is not None and added <= limit and clawbot.errors == 0
        name = f"added {pct}, {what}"
        checks.append(Check(name=name, value=added, target=f"<= {limit:g} ms", passed=passed))
        lines.append(
            f"  {name:<40} {_num(added, '+.2f'):>9} ms   target <= {limit:g} ms   "
            f"{'PASS' if passed else 'MISS'}"
        )
    return lines, checks


def summary(cells: Sequence[Measured], settings: Settings, mode: str) -> tuple[str, list[Check]]:
    """The added-latency and throughput section of one mode, with PASS/MISS."""
    c = TARGET_CONCURRENCY
    lines = [f"added latency ({mode} minus direct), closed loop at c={c}:"]
    checks: list[Check] = []
    for stream, what in ((False, f"non-stream c={c}"), (True, f"stream TTFB c={c}")):
        more, found = added_latency(
            find(cells, "direct", stream, c), find(cells, mode, stream, c), f"{mode}, {what}"
        )
        lines += more
        checks += found
    opened = [m for m in cells if m.rate is not None and m.target in ("direct", mode)]
    if opened:
        lines.append(
            f"added latency at a fixed {settings.rate:,.0f} req/s offered "
            f"(open loop, up to {c} connections):"
        )
        for stream, what in ((False, "non-stream open loop"), (True, "stream TTFB open loop")):
            pair = {m.target: m for m in opened if m.stream == stream}
            more, found = added_latency(pair.get("direct"), pair.get(mode), f"{mode}, {what}")
            lines += more
            checks += found
        for m in opened:
            if m.target == mode and m.rps < 0.95 * settings.rate:
                lines.append(
                    f"  note: {m.target} {'stream' if m.stream else 'non-stream'} kept up with "
                    f"only {m.rps:,.0f} of {settings.rate:,.0f} req/s (saturated)"
                )
    through = [m for m in cells if m.target == mode and not m.stream and m.rate is None]
    if through:
        best = max(through, key=lambda m: m.rps)
        passed = best.rps >= TARGET_RPS and best.errors == 0
        checks.append(
            Check(
                name=f"max req/s through clawbot, {mode}",
                value=best.rps,
                target=f">= {TARGET_RPS:,.0f}",
                passed=passed,
            )
        )
        lines.append(
            f"max req/s through clawbot ({mode}), non-stream: {best.rps:,.0f} "
            f"(c={best.concurrency})   target >= {TARGET_RPS:,.0f}   "
            f"{'PASS' if passed else 'MISS'}"
        )
    for m in cells:
        if m.first_error and m.target in ("direct", mode):
            kind = "stream" if m.stream else "non-stream"
            lines.append(f"  first error, {m.target} {kind} c={m.concurrency}: {m.first_error}")
    return "\n".join(lines), checks


def notes(cells: Sequence[Measured]) -> str:
    """What the closed-loop latency targets mean, and whether the machine was busy."""
    c = TARGET_CONCURRENCY
    lines = [
        f"note: in a closed loop latency ~ concurrency / throughput, so an added p50 <= "
        f"{TARGET_ADDED_P50_MS:g} ms at c={c} needs ~{c / TARGET_ADDED_P50_MS:,.0f}k req/s "
        "through clawbot; the open-loop rows show latency at a load it can carry."
    ]
    noisy = max((m.other_cores or 0.0 for m in cells), default=0.0)
    if noisy > NOISY_CORES:
        lines.append(
            f"WARNING: other processes kept up to {noisy:.2f} cores busy during the run "
            f"(column 'other load'); timings on this {os.cpu_count()}-CPU machine are skewed."
        )
    return "\n".join(lines)


def comparison(
    cells: Sequence[Measured], mode: str, ratio: float = TARGET_FULL_RATIO
) -> tuple[str, list[Check]]:
    """`mode` against auth-only at c=1 and c=16: req/s and CPU per request, within `ratio`."""
    pct = ratio * 100
    lines = [
        f"{mode} vs {BASELINE} (target: req/s >= {100 - pct:g} % and cpu ms/req "
        f"<= {100 + pct:g} % of {BASELINE}):",
        f"  {'cell':<16} {BASELINE + ' req/s':>11} {mode + ' req/s':>11} {'ratio':>7}      "
        f"{BASELINE + ' cpu':>9} {mode + ' cpu':>9} {'ratio':>7}      {'other load':>10}",
    ]
    checks: list[Check] = []
    for stream in (False, True):
        for conc in COMPARED_CONCURRENCIES:
            base, this = find(cells, BASELINE, stream, conc), find(cells, mode, stream, conc)
            if base is None or this is None:
                continue
            what = f"{'stream' if stream else 'non-stream'} c={conc}"
            rps = this.rps / base.rps if base.rps else None
            rps_ok = rps is not None and rps >= 1 - ratio and this.errors == 0
            cpu = (
                this.server_cpu_ms / base.server_cpu_ms
                if this.server_cpu_ms is not None and base.server_cpu_ms
                else None
            )
            cpu_ok = cpu is not None and cpu <= 1 + ratio
            checks.append(
                Check(
                    name=f"{mode}/{BASELINE} req/s, {what}",
                    value=rps,
                    target=f">= {1 - ratio:.2f}",
                    passed=rps_ok,
                )
            )
            checks.append(
                Check(
                    name=f"{mode}/{BASELINE} cpu ms/req, {what}",
                    value=cpu,
                    target=f"<= {1 + ratio:.2f}",
                    passed=cpu_ok,
                )
            )
            other = max(base.other_cores or 0.0, this.other_cores or 0.0)
            lines.append(
                f"  {what:<16} {base.rps:>11,.0f} {this.rps:>11,.0f} {_num(rps, '.3f'):>7} "
                f"{'PASS' if rps_ok else 'MISS'} {_num(base.server_cpu_ms, '.3f'):>9} "
                f"{_num(this.server_cpu_ms, '.3f'):>9} {_num(cpu, '.3f'):>7} "
                f"{'PASS' if cpu_ok else 'MISS'} {other:>10.2f}"
            )
    return "\n".join(lines), checks


def audit_check(count: AuditCount) -> tuple[str, Check]:
    """Whether every chat request the bench sent to a mode got its audit row."""
    passed = count.chat_rows == count.chat_requests and count.exit_code is not None
    if count.exit_code is None:
        exited = "killed after the grace period"
    elif count.exit_code == -signal.SIGTERM:
        exited = "exited on SIGTERM after shutdown"  # uvicorn re-raises the signal it caught
    else:
        exited = f"exit {count.exit_code}"
    line = (
        f"audit log, {count.mode}: {_num(count.chat_rows, 'd')} rows for {CHAT_PATH} after "
        f"SIGTERM ({exited}), {count.chat_requests:,} chat requests sent "
        f"(+{_num(count.admin_rows, 'd')} /admin/ rows)   no lost record: "
        f"{'PASS' if passed else 'MISS'}"
    )
    if count.request_errors:
        line += f"\n  note: loadgen counted {count.request_errors} failed requests"
    check = Check(
        name=f"audit rows = chat requests sent, {count.mode}",
        value=None if count.chat_rows is None else float(count.chat_rows - count.chat_requests),
        target="difference 0",
        passed=passed,
    )
    return line, check


@dataclass(slots=True)
class Clawbot:
    """One mode's running clawbot."""

    mode: Mode
    service: Service
    port: int
    api_key: str
    database: Path


@contextlib.contextmanager
def services(
    logdir: Path, modes: Sequence[Mode], command: str | None = None
) -> Iterator[tuple[Service, int, list[Clawbot]]]:
    """The mock upstream and one clawbot per mode in front of it, stopped on exit."""
    env = {k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    with contextlib.ExitStack() as stack:
        upstream = Service(
            "upstream",
            [sys.executable, str(BENCH / "mock_upstream.py"), "--port", "0"],
            logdir,
            env,
        )
        stack.callback(upstream.close)
        upstream_port = upstream.wait_ready(_UPSTREAM_READY)
        started = []
        for mode in modes:
            database = logdir / f"{mode.name}.db"
            config = logdir / f"clawbot-{mode.name}.json"
            config.write_text(json.dumps(clawbot_config(upstream_port, mode, database), indent=2))
            service = Service(f"clawbot-{mode.name}", clawbot_argv(config, command), logdir, env)
            stack.callback(service.close, STOP_GRACE_S)
            port = service.wait_ready(_CLAWBOT_READY)
            key = create_key(port) if mode.db_key else API_KEY
            started.append(Clawbot(mode, service, port, key, database))
        yield upstream, upstream_port, started


def profile(target: Target, settings: Settings, out: Path) -> str:
    """py-spy clawbot under closed-loop c=16 non-stream load (not in the table).

    `--gil` samples only the thread holding the GIL: a proxy for CPU that works where
    py-spy cannot tell idle threads (a worker blocked on its queue) from busy ones.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
    seconds = max(2, math.ceil(settings.duration_s))
    recorder = subprocess.Popen(
        [
            py_spy, "record", "--pid", str(target.server.pid), "--duration", str(seconds),
            "--rate", "250", "--format", fmt, "--output", str(out), "--threads", "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        loaded = measure(target, False, TARGET_CONCURRENCY, settings)
        _, err = recorder.communicate(timeout=seconds + 60)
    finally:
        if recorder.poll() is None:
            recorder.terminate()
            recorder.wait()
    if recorder.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
    text = f"profile ({fmt}) of clawbot {target.name} at {loaded.rps:,.0f} req/s written to {out}"
    if fmt == "raw":
        summarised = subprocess.run(
            [sys.executable, str(BENCH / "profile_summary.py"), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        text += "\n" + (summarised.stdout or summarised.stderr)
    return text


def profile_path(out: Path, mode: str, several: bool) -> Path:
    """`out`, or with several modes `out` with the mode before its suffix."""
    return out.with_name(f"{out.stem}.{mode}{out.suffix}") if several else out


def run(
    settings: Settings,
    modes: Sequence[Mode],
    json_out: Path | None = None,
    profile_out: Path | None = None,
    command: str | None = None,
) -> list[Check]:
    """Measure every cell and print the report; return the checks."""
    info = machine_info()
    print("clawbot gateway overhead: mock OpenAI upstream, direct vs. through clawbot")
    print(f"  (openai_http backend, one uvicorn worker per clawbot, POST {CHAT_PATH})")
    for mode in modes:
        print(f"  {mode.name:<6} {mode.title}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"each cell: {settings.warmup_s:g} s warm-up, then {settings.duration_s:g} s, closed loop "
        "with one keep-alive connection per concurrent client; cells interleaved across targets"
    )
    cells: list[Measured] = []
    profiled: list[str] = []
    counts: list[AuditCount] = []
    usage: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="clawbot-bench-") as tmp,
        services(Path(tmp), modes, command) as (upstream, upstream_port, clawbots),
    ):
        everyone = (upstream, *(c.service for c in clawbots))
        targets = [
            Target("direct", upstream_port, upstream, everyone),
            *(Target(c.mode.name, c.port, c.service, everyone, c.api_key) for c in clawbots),
        ]
        for stream in (False, True):
            for concurrency in settings.concurrencies:
                for target in targets:
                    cells.append(measure_steady(target, stream, concurrency, settings))
                    print(".", end="", flush=True)
            if settings.rate > 0:
                for target in targets:
                    cells.append(
                        measure_steady(target, stream, TARGET_CONCURRENCY, settings, settings.rate)
                    )
                    print(".", end="", flush=True)
        print()
        if profile_out is not None:
            for target in targets[1:]:
                out = profile_path(profile_out, target.name, len(targets) > 2)
                profiled.append(profile(target, settings, out))
        for clawbot in clawbots:
            if clawbot.service.process.poll() is not None:
                raise RuntimeError(f"clawbot {clawbot.mode.name} died:\n{clawbot.service.tail()}")
            if clawbot.mode.deployments > 1:
                usage.append(pool_usage(clawbot.port, clawbot.mode.name))
        for clawbot, target in zip(clawbots, targets[1:], strict=True):
            if not clawbot.mode.audit:
                continue
            exit_code = clawbot.service.close(STOP_GRACE_S)  # SIGTERM: the writer flushes
            chat_rows, admin_rows = count_audit_rows(clawbot.database)
            counts.append(
                AuditCount(
                    mode=clawbot.mode.name,
                    chat_requests=target.requests,
                    chat_rows=chat_rows,
                    admin_rows=admin_rows,
                    exit_code=exit_code,
                    request_errors=target.errors,
                )
            )
            if chat_rows != target.requests:
                print(f"clawbot {clawbot.mode.name} stderr:\n{clawbot.service.tail()}")
    checks: list[Check] = []
    direct = [m for m in cells if m.target == "direct"]
    for mode in modes:
        mine = [m for m in cells if m.target == mode.name]
        print(f"\n=== {mode.name}: {mode.title}")
        print(table([m for m in (*direct, *mine) if m.rate is None]))
        opened = [m for m in (*direct, *mine) if m.rate is not None]
        if opened:
            print(
                f"open loop, {settings.rate:,.0f} req/s offered on up to {TARGET_CONCURRENCY} "
                "conns:"
            )
            print(table(opened))
    print(
        "\np50/p99: time to the full response, or to the first SSE data chunk for streams; "
        "full: to the end of the stream;\ncpu ms/req: CPU of the answering process alone "
        "(mock upstream, or that clawbot); other load: cores used by processes outside the bench"
    )
    for mode in modes:
        text, found = summary(cells, settings, mode.name)
        print()
        print(text)
        checks += found
    names = [m.name for m in modes]
    if BASELINE in names:
        for mode in modes:
            if mode.name != BASELINE:
                text, found = comparison(cells, mode.name, mode.target_ratio)
                print()
                print(text)
                checks += found
    if usage:
        print()
        print("\n".join(usage))
    if counts:
        print()
        for count in counts:
            line, check = audit_check(count)
            print(line)
            checks.append(check)
    print()
    print(notes(cells))
    for text in profiled:
        print()
        print(text)
    if json_out is not None:
        report = Report(
            machine=info,
            settings={
                "duration_s": settings.duration_s,
                "warmup_s": settings.warmup_s,
                "concurrencies": ",".join(map(str, settings.concurrencies)),
                "rate": settings.rate,
                "modes": ",".join(names),
            },
            cells=cells,
            checks=checks,
            audit=counts,
        )
        json_out.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        print(f"\nresults written to {json_out}")
    return checks


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def parse_modes(text: str) -> list[Mode]:
    """The modes named in `--modes`, in table order; redis only when it answers."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise ValueError(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    modes = [m for m in MODES.values() if m.name in names]
    if any(m.name == "redis" for m in modes) and not redis_reachable():
        print(f"note: no Redis answers at {REDIS_URL}; skipping mode redis", file=sys.stderr)
        modes = [m for m in modes if m.name != "redis"]
    return modes


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Command-line options and the settings they make."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument("--quick", action="store_true", help="~1 s per cell, for a smoke test")
    parser.add_argument(
        "--concurrency", default="1,16,32", help="closed-loop concurrencies (1 and 16 always run)"
    )
    parser.add_argument(
        "--rate", type=float, default=500.0, help="open-loop req/s for extra rows (0: skip them)"
    )
    parser.add_argument(
        "--modes",
        default="auth,full",
        help=f"clawbot configurations, comma-separated, from {', '.join(MODES)} (default: "
        "auth,full)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=2,
        help=f"re-measure a cell up to this often while other load > {NOISY_CORES} cores",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy each clawbot under c=16 non-stream load: .svg, .json (speedscope), else "
        "raw (summarised); with several modes the mode goes before the suffix",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--clawbot",
        metavar="COMMAND",
        help="command that runs clawbot's CLI, to compare builds (default: this venv's clawbot)",
    )
    args = parser.parse_args(argv)
    try:
        args.modes = parse_modes(args.modes)
    except ValueError as exc:
        parser.error(str(exc))
    concurrencies = {int(c) for c in args.concurrency.split(",") if c.strip()}
    settings = Settings(
        duration_s=1.0 if args.quick else args.duration,
        warmup_s=0.3 if args.quick else args.warmup,
        concurrencies=tuple(sorted({*concurrencies, *COMPARED_CONCURRENCIES})),
        rate=args.rate,
        noisy_retries=max(0, args.noisy_retries),
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args, settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        checks = run(settings, args.modes, args.json, args.profile, args.clawbot)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    return 1 if args.check and not all(c.passed for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
