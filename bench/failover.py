"""The failover gap: what clients see when a pool's primary upstream is killed, and after.

Starts two mock upstreams (`bench/mock_upstream.py`: the primary and the backup) and one
`clawbot serve` with a `priority` pool [primary, backup] (health checks every 1 s, breaker
after 3 failures), then drives a steady open-loop load at it from a separate process
(raw keep-alive HTTP/1.1 sockets, so the load's timings are not disturbed by the process
starting and killing the upstreams). Every request is recorded: when it started, its latency
(for streams, to the first SSE data chunk), status and `x-clawbot-backend`. After the
warm-up and a steady phase the primary is SIGKILLed; the load goes on; then the primary
is restarted on the same port and the load goes on until the end.

Four variants, each with fresh processes:

  fast non-stream / fast stream   a fast upstream (~0.1 ms): the kill finds almost nothing
                                  in flight; requests after it fail over (connection
                                  refused) until the health check or the breaker takes the
                                  primary out
  slow non-stream / slow stream   both upstreams answer after `--delay-ms`: at the kill
                                  ~rate x delay requests are in flight on the primary and
                                  are retried on the backup (the time they spent on the
                                  primary is lost)

Per variant a table of phases (requests that finished before the kill; those in flight at
the kill; started in the 1 s after it; started later, until the restart; started after the
restart) with requests, errors, where they were served and p50/p99/max latency, then:

  failover gap      max latency of the requests in flight at the kill or started in the
                    1 s after it, minus the p50 before the kill
  in flight         their extra latency over the p50 before, and the time from the kill to
                    their answer
  back on primary   from the restarted primary's "listening" line to the first request
                    served by it, and to the last request served by the backup
  errors            every failed request: kind, status, body, time relative to the kill

Exits 1 with `--check` when a non-streamed request failed.

    .venv/bin/python bench/failover.py                      # all four variants, ~1 min
    .venv/bin/python bench/failover.py --variants fast-nonstream,slow-stream --delay-ms 300
    .venv/bin/python bench/failover.py --rate 100 --steady 5 --after-kill 5 --after-restart 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from gateway_overhead import (
    _CLAWBOT_READY,
    _UPSTREAM_READY,
    API_KEY,
    BENCH,
    CHAT_PATH,
    MODEL,
    STOP_GRACE_S,
    Service,
    clawbot_argv,
    machine_info,
    request_body,
)

PRIMARY = "primary"
BACKUP = "backup"
REQUEST_TIMEOUT_S = 20.0
KILL_WINDOW_S = 1.0
"""The window after the kill whose worst latency is the failover gap."""
READY_POLL_S = 0.005
"""How often the restarted primary's stdout is polled for its "listening" line."""


class Sample(msgspec.Struct, array_like=True):
    """One request as the load process saw it; times are `time.monotonic()` seconds."""

    start: float
    latency: float
    """To the full response; for streams, to the first SSE data chunk."""
    full: float
    """To the end of the response, streams included."""
    status: int
    """HTTP status; 0 when no response came (connection error, timeout)."""
    backend: str
    """The `x-clawbot-backend` header: `model/deployment`."""
    late: float
    """How long after its due time (open loop) the request was sent."""
    error: str = ""
    """Empty for a successful request; else what went wrong, with the body's start."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One failover scenario."""

    name: str
    stream: bool
    slow: bool


VARIANTS = {
    v.name: v
    for v in (
        Variant("fast-nonstream", stream=False, slow=False),
        Variant("fast-stream", stream=True, slow=False),
        Variant("slow-nonstream", stream=False, slow=True),
        Variant("slow-stream", stream=True, slow=True),
    )
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The load and the timeline of one variant."""

    rate: float
    conns: int
    slow_rate: float
    slow_conns: int
    delay_ms: float
    warmup_s: float
    steady_s: float
    after_kill_s: float
    after_restart_s: float
    health_check_interval_s: float


@dataclass(slots=True)
class Timeline:
    """When the orchestrator did what (monotonic seconds)."""

    measure_from: float
    kill: float
    restart_spawn: float
    restart_ready: float
    end: float


# The load process: a raw HTTP/1.1 client that records every request.


class Connection:
    """One keep-alive connection to clawbot."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        """Connect to clawbot on loopback."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()

    async def exchange(
        self, payload: bytes
    ) -> tuple[int, dict[bytes, bytes], float, bytes, bool, bool]:
        """Send one request; return status, headers, first data time, body, done, close."""
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        first_at = 0.0
        saw_done = False
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
            first_at = time.monotonic()
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers are expected
                    break
                chunk = (await self.reader.readexactly(size + 2))[:-2]
                if not first_at and b"data:" in chunk:
                    first_at = time.monotonic()
                if b"[DONE]" in chunk:
                    saw_done = True
                parts.append(chunk)
            body = b"".join(parts)
        else:
            raise ValueError("response has neither content-length nor chunked framing")
        closing = headers.get(b"connection", b"").lower() == b"close"
        return status, headers, first_at, body, saw_done, closing


def chat_request(port: int, stream: bool) -> bytes:
    """The raw keep-alive chat request every client sends."""
    body = request_body(stream).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def stream_error(body: bytes) -> str:
    """The error event in an SSE body, if the gateway sent one mid-stream."""
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and b'"error"' in line:
            return line[5:].strip().decode(errors="replace")[:300]
    return ""


class Load:
    """Open-loop load: requests due at `rate` per second, sent on the next free connection."""

    def __init__(
        self, port: int, stream: bool, rate: float, conns: int, start: float, stop: float
    ) -> None:
        self.port = port
        self.stream = stream
        self.rate = rate
        self.conns = conns
        self.start = start
        self.stop = stop
        self.payload = chat_request(port, stream)
        self.issued = 0
        self.samples: list[Sample] = []

    def next_due(self) -> float | None:
        """When the next request is due, or None when the load is over."""
        due = self.start + self.issued / self.rate
        if due >= self.stop:
            return None
        self.issued += 1
        return due

    async def worker(self) -> None:
        """Send requests on one connection until the load is over, reconnecting on failure."""
        conn: Connection | None = None
        while (due := self.next_due()) is not None:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                if conn is None:
                    conn = await Connection.open(self.port)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, headers, first_at, body, done, closing = await conn.exchange(
                        self.payload
                    )
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                now = time.monotonic()
                error = f"{type(exc).__name__}: {exc}"
                self.samples.append(
                    Sample(started, now - started, now - started, 0, "", started - due, error)
                )
                if conn is not None:
                    conn.close()
                conn = None
                continue
            end = time.monotonic()
            error = ""
            if status != 200:
                error = f"HTTP {status}: {body[:300].decode(errors='replace')}"
            elif self.stream and not (done and first_at):
                error = "stream ended without data or [DONE]"
            elif self.stream and (event := stream_error(body)):
                error = f"error event: {event}"
            first = first_at if self.stream and first_at else end
            backend = headers.get(b"x-clawbot-backend", b"").decode()
            self.samples.append(
                Sample(
                    started, first - started, end - started, status, backend, started - due, error
                )
            )
            if closing:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    async def run(self) -> list[Sample]:
        """Run every connection's worker to the end."""
        await asyncio.gather(*(self.worker() for _ in range(self.conns)))
        return sorted(self.samples, key=lambda s: s.start)


def load_main(args: argparse.Namespace) -> int:
    """The load process: run one Load and write its samples to `--out`."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    load = Load(args.port, args.stream, args.rate, args.conns, args.start_at, args.stop_at)
    samples = asyncio.run(load.run())
    Path(args.out).write_bytes(msgspec.json.encode(samples))
    return 0


# The orchestrator.


def mock_argv(port: int, delay_ms: float) -> list[str]:
    """A mock upstream on `port` (0: any free port)."""
    argv = [sys.executable, str(BENCH / "mock_upstream.py"), "--port", str(port)]
    if delay_ms > 0:
        argv += ["--delay-ms", str(delay_ms)]
    return argv


def clawbot_config(primary: int, backup: int, settings: Settings) -> dict[str, object]:
    """One model served by a priority pool [primary, backup], auth on, audit off."""
    timeouts = {"connect_s": 1, "first_token_s": 5, "total_s": 10}
    return {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60000},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "audit": {"enabled": False},
        "models": [
            {
                "id": MODEL,
                "routing": {
                    "strategy": "priority",
                    "retries": 2,
                    "failures_to_trip": 3,
                    "failure_window_s": 60,
                    "cooldown_s": 30,
                    "health_check_interval_s": settings.health_check_interval_s,
                    "health_check_timeout_s": 1,
                },
                "deployments": [
                    {
                        "name": PRIMARY,
                        "backend": f"http://127.0.0.1:{primary}/v1",
                        "priority": 0,
                        "upstream_model": MODEL,
                        "timeouts": timeouts,
                    },
                    {
                        "name": BACKUP,
                        "backend": f"http://127.0.0.1:{backup}/v1",
                        "priority": 1,
                        "upstream_model": MODEL,
                        "timeouts": timeouts,
                    },
                ],
            }
        ],
    }


def wait_listening(service: Service, timeout_s: float = 30.0) -> float:
    """Poll a mock's stdout finely for its "listening" line; return when it was seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _UPSTREAM_READY.search(service.out.read_text(errors="replace")):
            return time.monotonic()
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"{service.name} did not start within {timeout_s:.0f}s")


def pool_state(port: int) -> str:
    """The deployments' health and breaker state from `GET /admin/backends`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/backends",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            pools = json.loads(response.read())["data"]
    except (OSError, ValueError, KeyError) as exc:
        return f"GET /admin/backends failed: {exc}"
    parts = []
    for pool in pools:
        for d in pool["deployments"]:
            parts.append(
                f"{d['name']}: healthy={d['healthy']} state={d['state']} "
                f"ok={d['total_successes']} failed={d['total_failures']} "
                f"cooldown={d['cooldown_remaining_s']}s"
            )
    return "; ".join(parts)


def sleep_until(at: float) -> None:
    """Sleep until monotonic time `at`."""
    delay = at - time.monotonic()
    if delay > 0:
        time.sleep(delay)


@dataclass(slots=True)
class Outcome:
    """What one variant measured."""

    variant: Variant
    samples: list[Sample]
    timeline: Timeline
    rate: float
    conns: int
    health_check_interval_s: float
    state_before_restart: str
    state_at_end: str
    clawbot_warnings: list[str]


def run_variant(variant: Variant, settings: Settings, logdir: Path) -> Outcome:
    """Start the upstreams and clawbot, load them, kill and restart the primary."""
    env = {k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    delay = settings.delay_ms if variant.slow else 0.0
    rate = settings.slow_rate if variant.slow else settings.rate
    conns = settings.slow_conns if variant.slow else settings.conns
    tag = variant.name
    with contextlib.ExitStack() as stack:
        primary = Service(f"{tag}-primary", mock_argv(0, delay), logdir, env)
        stack.callback(lambda: primary.close())  # the restarted one, by then
        backup = Service(f"{tag}-backup", mock_argv(0, delay), logdir, env)
        stack.callback(backup.close)
        primary_port = primary.wait_ready(_UPSTREAM_READY)
        backup_port = backup.wait_ready(_UPSTREAM_READY)
        config = logdir / f"clawbot-{tag}.json"
        config.write_text(json.dumps(clawbot_config(primary_port, backup_port, settings)))
        clawbot = Service(f"{tag}-clawbot", clawbot_argv(config), logdir, env)
        stack.callback(clawbot.close, STOP_GRACE_S)
        port = clawbot.wait_ready(_CLAWBOT_READY)

        start = time.monotonic() + 1.0  # time for the load process to start
        measure_from = start + settings.warmup_s
        kill_at = measure_from + settings.steady_s
        restart_at = kill_at + settings.after_kill_s
        stop = restart_at + settings.after_restart_s
        out = logdir / f"{tag}-samples.json"
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--load",
            "--port", str(port), "--rate", str(rate), "--conns", str(conns),
            "--start-at", repr(start), "--stop-at", repr(stop), "--out", str(out),
        ]  # fmt: skip
        if variant.stream:
            argv.append("--stream")
        loader = subprocess.Popen(argv, cwd=BENCH.parent, env=env, stdin=subprocess.DEVNULL)
        try:
            sleep_until(kill_at)
            kill = time.monotonic()
            primary.process.send_signal(signal.SIGKILL)
            primary.process.wait()
            sleep_until(restart_at - 0.3)
            before_restart = pool_state(port)
            sleep_until(restart_at)
            spawn = time.monotonic()
            primary = Service(f"{tag}-primary-2", mock_argv(primary_port, delay), logdir, env)
            ready = wait_listening(primary)
            loader.wait(timeout=stop - time.monotonic() + REQUEST_TIMEOUT_S + 30)
        finally:
            if loader.poll() is None:
                loader.kill()
                loader.wait()
        if loader.returncode != 0:
            raise RuntimeError(f"the load process failed with {loader.returncode}")
        at_end = pool_state(port)
        samples = msgspec.json.decode(out.read_bytes(), type=list[Sample])
        if clawbot.process.poll() is not None:
            raise RuntimeError(f"clawbot died:\n{clawbot.tail()}")
    warnings = clawbot.err.read_text(errors="replace").splitlines()
    return Outcome(
        variant=variant,
        samples=samples,
        timeline=Timeline(measure_from, kill, spawn, ready, stop),
        rate=rate,
        conns=conns,
        health_check_interval_s=settings.health_check_interval_s,
        state_before_restart=before_restart,
        state_at_end=at_end,
        clawbot_warnings=warnings,
    )


# The report.


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of `values` (seconds) in milliseconds; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank] * 1000


def _ms(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def served_by(s: Sample, name: str) -> bool:
    """Whether deployment `name` answered `s`."""
    return s.backend.endswith("/" + name)


@dataclass(frozen=True, slots=True)
class Phase:
    """A slice of the run's requests."""

    name: str
    window: str
    samples: list[Sample]


def phases(outcome: Outcome) -> list[Phase]:
    """Before the kill, in flight at it, the 1 s after, until the restart, after it."""
    t = outcome.timeline
    k = t.kill
    measured = [s for s in outcome.samples if s.start >= t.measure_from]
    return [
        Phase(
            "before kill",
            f"[{t.measure_from - k:+.1f}, 0) s",
            [s for s in measured if s.start + s.full < k],
        ),
        Phase(
            "in flight at kill",
            "start < 0 <= end",
            [s for s in measured if s.start < k <= s.start + s.full],
        ),
        Phase(
            f"{KILL_WINDOW_S:g} s after kill",
            f"start in [0, {KILL_WINDOW_S:g}) s",
            [s for s in measured if k <= s.start < k + KILL_WINDOW_S],
        ),
        Phase(
            "until restart",
            f"[{KILL_WINDOW_S:g}, {t.restart_spawn - k:.1f}) s",
            [s for s in measured if k + KILL_WINDOW_S <= s.start < t.restart_spawn],
        ),
        Phase(
            "after restart",
            f"[{t.restart_spawn - k:.1f}, {t.end - k:.1f}) s",
            [s for s in measured if s.start >= t.restart_spawn],
        ),
    ]


def phase_table(rows: Sequence[Phase]) -> str:
    """Requests, errors, where they were served and latency per phase."""
    header = (
        f"  {'phase':<18} {'window (kill = 0)':<22} {'reqs':>6} {'errors':>6} "
        f"{'primary':>7} {'backup':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    lines = [header, "  " + "-" * (len(header) - 2)]
    for p in rows:
        ok = [s.latency for s in p.samples if not s.error]
        lines.append(
            f"  {p.name:<18} {p.window:<22} {len(p.samples):>6} "
            f"{sum(1 for s in p.samples if s.error):>6} "
            f"{sum(1 for s in p.samples if served_by(s, PRIMARY)):>7} "
            f"{sum(1 for s in p.samples if served_by(s, BACKUP)):>7} "
            f"{_ms(percentile(ok, 50)):>8} {_ms(percentile(ok, 99)):>8} "
            f"{_ms(percentile(ok, 100)):>8}"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The numbers one variant is judged by."""

    name: str
    gap_ms: float | None
    inflight: int
    inflight_extra_max_ms: float | None
    back_first_s: float | None
    back_all_s: float | None
    errors: int
    stream: bool


def report(outcome: Outcome) -> tuple[str, Verdict]:
    """The table and the summary lines of one variant."""
    v, t = outcome.variant, outcome.timeline
    rows = phases(outcome)
    before, inflight, window, _, after = rows
    steady = [s.latency for s in before.samples if not s.error]
    p50_before = percentile(steady, 50)
    lines = [
        f"=== {v.name}: {'streamed' if v.stream else 'non-streamed'} chat, "
        f"{'upstreams delayed' if v.slow else 'fast upstreams'}, open loop "
        f"{outcome.rate:g} req/s on up to {outcome.conns} connections"
        + ("   (latency: time to the first SSE data chunk)" if v.stream else ""),
        phase_table(rows),
    ]
    gap_samples = [s for s in (*inflight.samples, *window.samples) if not s.error]
    worst = max(gap_samples, key=lambda s: s.latency, default=None)
    gap = None
    if worst is not None and p50_before is not None:
        gap = worst.latency * 1000 - p50_before
        lines.append(
            f"  failover gap: {gap:+.2f} ms (worst latency {worst.latency * 1000:.2f} ms, "
            f"started {worst.start - t.kill:+.3f} s from the kill, served by "
            f"{worst.backend or '-'}; before the kill p50 {p50_before:.2f} ms, p99 "
            f"{_ms(percentile(steady, 99))} ms, max {_ms(percentile(steady, 100))} ms)"
        )
    extra_max = None
    if inflight.samples and p50_before is not None:
        done = [s for s in inflight.samples if not s.error]
        extra = [s.latency * 1000 - p50_before for s in done]
        after_kill = [(s.start + s.latency - t.kill) * 1000 for s in done]
        extra_max = max(extra, default=None)
        kill_to_answer = max(after_kill, default=None)
        overhead = None if kill_to_answer is None else kill_to_answer - p50_before
        lines.append(
            f"  in flight at the kill: {len(inflight.samples)} requests, "
            f"{sum(1 for s in done if served_by(s, BACKUP))} answered by the backup, "
            f"{len(inflight.samples) - len(done)} failed; extra latency over p50 before: "
            f"max {_ms(extra_max, '+.2f')} ms, mean "
            f"{_ms(sum(extra) / len(extra) if extra else None, '+.2f')} ms; kill to answer: "
            f"max {_ms(kill_to_answer)} ms, {_ms(overhead, '+.2f')} ms over a fresh request's "
            "p50 (the retry's own cost)"
        )
    else:
        lines.append("  in flight at the kill: none")
    back = [s for s in after.samples if not s.error]
    first_primary = next((s for s in back if served_by(s, PRIMARY)), None)
    last_backup = max(
        (s for s in back if served_by(s, BACKUP)), key=lambda s: s.start, default=None
    )
    back_first = None if first_primary is None else first_primary.start - t.restart_ready
    last_backup_s = None if last_backup is None else last_backup.start - t.restart_ready
    back_all = None
    if first_primary is not None:
        back_all = max(0.0, last_backup_s or 0.0)
    lines.append(
        f"  primary restarted: listening {(t.restart_ready - t.restart_spawn) * 1000:.0f} ms "
        f"after the spawn; the first request it served started "
        f"{_ms(None if back_first is None else back_first * 1000, '+.0f')} ms after that, "
        f"the last one the backup served "
        f"{_ms(None if last_backup_s is None else last_backup_s * 1000, '+.0f')} ms "
        f"(health checks every {outcome.health_check_interval_s:g} s)"
    )
    lines.append(f"  pool 0.3 s before the restart: {outcome.state_before_restart}")
    lines.append(f"  pool at the end:               {outcome.state_at_end}")
    late = max((s.late for s in outcome.samples if s.start >= t.measure_from), default=0.0)
    if late > 0.005:
        lines.append(
            f"  note: the load process sent requests up to {late * 1000:.1f} ms after they were "
            "due (busy CPU or connections); latencies are from the actual send"
        )
    failed = [s for s in outcome.samples if s.error and s.start >= t.measure_from]
    warm_failed = [s for s in outcome.samples if s.error and s.start < t.measure_from]
    for s in failed[:20]:
        lines.append(
            f"  ERROR {'stream' if v.stream else 'non-stream'} request started "
            f"{s.start - t.kill:+.3f} s from the kill, after {s.full * 1000:.1f} ms: "
            f"status {s.status or '-'}, backend {s.backend or '-'}: {s.error}"
        )
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more errors")
    if warm_failed:
        lines.append(f"  note: {len(warm_failed)} errors during the warm-up")
    noted = [w for w in outcome.clawbot_warnings if "ERROR" in w or "Traceback" in w]
    for w in noted[:5]:
        lines.append(f"  clawbot stderr: {w[:300]}")
    verdict = Verdict(
        name=v.name,
        gap_ms=gap,
        inflight=len(inflight.samples),
        inflight_extra_max_ms=extra_max,
        back_first_s=back_first,
        back_all_s=back_all,
        errors=len(failed) + len(warm_failed),
        stream=v.stream,
    )
    return "\n".join(lines), verdict


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line per variant, and the non-stream error check."""
    header = (
        f"  {'variant':<16} {'gap ms':>8} {'in flight':>9} {'their extra max ms':>18} "
        f"{'back 1st s':>10} {'back all s':>10} {'errors':>6}"
    )
    lines = ["summary:", header, "  " + "-" * (len(header) - 2)]
    for v in verdicts:
        lines.append(
            f"  {v.name:<16} {_ms(v.gap_ms, '+.2f'):>8} {v.inflight:>9} "
            f"{_ms(v.inflight_extra_max_ms, '+.2f'):>18} {_ms(v.back_first_s, '.3f'):>10} "
            f"{_ms(v.back_all_s, '.3f'):>10} {v.errors:>6}"
        )
    nonstream = [v for v in verdicts if not v.stream]
    if nonstream:
        errors = sum(v.errors for v in nonstream)
        lines.append(
            f"  non-streamed requests failed during failover: {errors}   target 0   "
            f"{'PASS' if errors == 0 else 'MISS'}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (`--load` runs the load process, for the orchestrator)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="req/s, fast variants")
    parser.add_argument("--conns", type=int, default=16, help="connections, fast variants")
    parser.add_argument("--slow-rate", type=float, default=40.0, help="req/s, slow variants")
    parser.add_argument("--slow-conns", type=int, default=32, help="connections, slow variants")
    parser.add_argument(
        "--delay-ms", type=float, default=200.0, help="upstream delay in the slow variants"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds before the kill")
    parser.add_argument("--after-kill", type=float, default=4.0, help="seconds until restart")
    parser.add_argument("--after-restart", type=float, default=4.0, help="seconds after it")
    parser.add_argument("--check", action="store_true", help="exit 1 if a non-stream failed")
    parser.add_argument(
        "--logdir",
        type=Path,
        help="keep the configs, logs and per-request samples here (default: a temp dir)",
    )
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    args.variants = [VARIANTS[n] for n in names]
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.load:
        return load_main(args)
    settings = Settings(
        rate=args.rate,
        conns=args.conns,
        slow_rate=args.slow_rate,
        slow_conns=args.slow_conns,
        delay_ms=args.delay_ms,
        warmup_s=args.warmup,
        steady_s=args.steady,
        after_kill_s=args.after_kill,
        after_restart_s=args.after_restart,
        health_check_interval_s=1.0,
    )
    signal.signal(signal.SIGTERM, _terminate)
    info = machine_info()
    print("clawbot failover: priority pool [primary, backup] of mock upstreams; primary SIGKILLed")
    print(
        f"  breaker: 3 failures in 60 s, 30 s cooldown; health checks every "
        f"{settings.health_check_interval_s:g} s (1 s timeout); retries 2; audit off"
    )
    print(
        f"  timeline: {settings.warmup_s:g} s warm-up, {settings.steady_s:g} s steady, kill, "
        f"{settings.after_kill_s:g} s, restart on the same port, {settings.after_restart_s:g} s;"
        f" slow variants: upstreams delay {settings.delay_ms:g} ms"
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    verdicts = []
    try:
        with contextlib.ExitStack() as stack:
            if args.logdir is None:
                logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="failover-")))
            else:
                logdir = args.logdir
                logdir.mkdir(parents=True, exist_ok=True)
            for variant in args.variants:
                outcome = run_variant(variant, settings, logdir)
                text, verdict = report(outcome)
                print()
                print(text, flush=True)
                verdicts.append(verdict)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    print()
    print(summary(verdicts))
    failed = any(v.errors for v in verdicts if not v.stream)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
