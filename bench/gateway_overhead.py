"""How much latency and throughput clawbot costs in front of a fast OpenAI upstream.

Starts a mock upstream (`bench/mock_upstream.py`) and `clawbot serve` with the
`openai_http` backend and auth on, each in its own process, then loads the upstream
directly and through clawbot with `bench/loadgen.py` (a third process), non-streamed and
streamed, at each concurrency, and prints a table with the targets. Exits 0 unless the
run itself fails, or, with `--check`, a target is missed.

    .venv/bin/python bench/gateway_overhead.py              # 1 s warm-up + 5 s per cell
    .venv/bin/python bench/gateway_overhead.py --quick      # ~1 s per cell, a smoke test
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
import subprocess
import sys
import tempfile
import time
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


class Report(msgspec.Struct, kw_only=True):
    """Everything one run measured, as `--json` writes it."""

    machine: dict[str, str]
    settings: dict[str, float | str]
    cells: list[Measured]
    checks: list[Check]


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard to load each cell."""

    duration_s: float
    warmup_s: float
    concurrencies: tuple[int, ...]
    rate: float
    timeout_s: float = 10.0


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

    def close(self) -> None:
        """Terminate the child and wait for it; kill it if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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


@dataclass(frozen=True, slots=True)
class Target:
    """Where a cell's requests go, and the processes whose CPU is ours."""

    name: str
    port: int
    server: Service
    services: tuple[Service, ...]


def clawbot_argv(config: Path, command: str | None = None) -> list[str]:
    """`clawbot serve` on any free port: `command`, else the running interpreter's clawbot."""
    if command:
        base = shlex.split(command)
    else:
        script = Path(sys.executable).with_name("clawbot")
        base = [str(script)] if script.exists() else [sys.executable, "-m", "app"]
    return [*base, "serve", "--config", str(config), "--port", "0"]


def clawbot_config(upstream_port: int) -> dict[str, object]:
    """The gateway config: one `openai_http` model in front of the mock, auth on."""
    return {
        "model_server": {"host": "127.0.0.1", "port": 0, "timeout": 60000},
        "auth": {"api_key": API_KEY},
        "logging": {"level": "WARNING"},
        "models": [{"id": MODEL, "backend": f"http://127.0.0.1:{upstream_port}/v1"}],
    }


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
    port: int, stream: bool, concurrency: int, settings: Settings, rate: float | None
) -> list[str]:
    """The loadgen command for one cell."""
    argv = [
        sys.executable, str(BENCH / "loadgen.py"),
        "--port", str(port),
        "--path", CHAT_PATH,
        "--body", request_body(stream),
        "--header", f"Authorization: Bearer {API_KEY}",
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
    argv = loadgen_argv(target.port, stream, concurrency, settings, rate)
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
    if server_s is not None and requests:
        measured.server_cpu_ms = server_s / requests * 1000
    used = [_delta(s.cpu_s(), before) for s, before in zip(target.services, ours, strict=True)]
    busy_s = _delta(machine_busy_s(), busy)
    if busy_s is not None and None not in used:
        ours_s = sum(u for u in used if u is not None) + children_cpu_s() - children
        measured.other_cores = max(0.0, busy_s - ours_s) / wall
    return measured


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
            f"  {name:<34} {_num(added, '+.2f'):>9} ms   target <= {limit:g} ms   "
            f"{'PASS' if passed else 'MISS'}"
        )
    return lines, checks


def summary(cells: Sequence[Measured], settings: Settings) -> tuple[str, list[Check]]:
    """The added-latency and throughput section, with PASS/MISS against the targets."""
    c = TARGET_CONCURRENCY
    lines = [f"added latency (clawbot minus direct), closed loop at c={c}:"]
    checks: list[Check] = []
    for stream, what in ((False, f"non-stream c={c}"), (True, f"stream TTFB c={c}")):
        more, found = added_latency(
            find(cells, "direct", stream, c), find(cells, "clawbot", stream, c), what
        )
        lines += more
        checks += found
    opened = [m for m in cells if m.rate is not None]
    if opened:
        lines.append(
            f"added latency at a fixed {settings.rate:,.0f} req/s offered "
            f"(open loop, up to {c} connections):"
        )
        for stream, what in ((False, "non-stream open loop"), (True, "stream TTFB open loop")):
            pair = {m.target: m for m in opened if m.stream == stream}
            more, found = added_latency(pair.get("direct"), pair.get("clawbot"), what)
            lines += more
            checks += found
        for m in opened:
            if m.rps < 0.95 * settings.rate:
                lines.append(
                    f"  note: {m.target} {'stream' if m.stream else 'non-stream'} kept up with "
                    f"only {m.rps:,.0f} of {settings.rate:,.0f} req/s (saturated)"
                )
    through = [m for m in cells if m.target == "clawbot" and not m.stream and m.rate is None]
    if through:
        best = max(through, key=lambda m: m.rps)
        passed = best.rps >= TARGET_RPS and best.errors == 0
        checks.append(
            Check(
                name="max req/s through clawbot",
                value=best.rps,
                target=f">= {TARGET_RPS:,.0f}",
                passed=passed,
            )
        )
        lines.append(
            f"max req/s through clawbot, non-stream: {best.rps:,.0f} (c={best.concurrency})"
            f"   target >= {TARGET_RPS:,.0f}   {'PASS' if passed else 'MISS'}"
        )
    for m in cells:
        if m.first_error:
            mode = "stream" if m.stream else "non-stream"
            lines.append(f"  first error, {m.target} {mode} c={m.concurrency}: {m.first_error}")
    lines.append(
        f"note: in a closed loop latency ~ concurrency / throughput, so an added p50 <= "
        f"{TARGET_ADDED_P50_MS:g} ms at c={c} needs ~{c / TARGET_ADDED_P50_MS:,.0f}k req/s "
        "through clawbot; the open-loop rows show latency at a load it can carry."
    )
    noisy = max((m.other_cores or 0.0 for m in cells), default=0.0)
    if noisy > NOISY_CORES:
        lines.append(
            f"WARNING: other processes kept up to {noisy:.2f} cores busy during the run "
            f"(column 'other load'); timings on this {os.cpu_count()}-CPU machine are skewed."
        )
    return "\n".join(lines), checks


@contextlib.contextmanager
def services(
    logdir: Path, command: str | None = None
) -> Iterator[tuple[Service, int, Service, int]]:
    """The mock upstream and clawbot in front of it, stopped on exit."""
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
        config = logdir / "clawbot.json"
        config.write_text(json.dumps(clawbot_config(upstream_port), indent=2))
        clawbot = Service("clawbot", clawbot_argv(config, command), logdir, env)
        stack.callback(clawbot.close)
        clawbot_port = clawbot.wait_ready(_CLAWBOT_READY)
        yield upstream, upstream_port, clawbot, clawbot_port


def profile(target: Target, settings: Settings, out: Path) -> str:
    """py-spy clawbot under closed-loop c=16 non-stream load (not in the table)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
    seconds = max(2, math.ceil(settings.duration_s))
    recorder = subprocess.Popen(
        [
            py_spy, "record", "--pid", str(target.server.pid), "--duration", str(seconds),
            "--rate", "250", "--format", fmt, "--output", str(out),
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
    text = f"profile ({fmt}) of clawbot at {loaded.rps:,.0f} req/s written to {out}"
    if fmt == "raw":
        summarised = subprocess.run(
            [sys.executable, str(BENCH / "profile_summary.py"), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        text += "\n" + (summarised.stdout or summarised.stderr)
    return text


def run(
    settings: Settings,
    json_out: Path | None = None,
    profile_out: Path | None = None,
    command: str | None = None,
) -> list[Check]:
    """Measure every cell and print the report; return the checks."""
    info = machine_info()
    print("clawbot gateway overhead: mock OpenAI upstream, direct vs. through clawbot")
    print(f"  (openai_http backend, auth on, one uvicorn worker, POST {CHAT_PATH})")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"each cell: {settings.warmup_s:g} s warm-up, then {settings.duration_s:g} s, closed loop "
        "with one keep-alive connection per concurrent client"
    )
    cells: list[Measured] = []
    profiled = ""
    with (
        tempfile.TemporaryDirectory(prefix="clawbot-bench-") as tmp,
        services(Path(tmp), command) as (upstream, upstream_port, clawbot, clawbot_port),
    ):
        both = (upstream, clawbot)
        targets = (
            Target("direct", upstream_port, upstream, both),
            Target("clawbot", clawbot_port, clawbot, both),
        )
        for target in targets:
            for stream in (False, True):
                for concurrency in settings.concurrencies:
                    cells.append(measure(target, stream, concurrency, settings))
                    print(".", end="", flush=True)
                if settings.rate > 0:
                    cells.append(
                        measure(target, stream, TARGET_CONCURRENCY, settings, settings.rate)
                    )
                    print(".", end="", flush=True)
        print()
        if profile_out is not None:
            profiled = profile(targets[1], settings, profile_out)
        if clawbot.process.poll() is not None:
            raise RuntimeError(f"clawbot died during the run:\n{clawbot.tail()}")
    print()
    print(table([m for m in cells if m.rate is None]))
    opened = [m for m in cells if m.rate is not None]
    if opened:
        print(
            f"\nopen loop, {settings.rate:,.0f} req/s offered on up to {TARGET_CONCURRENCY} conns:"
        )
        print(table(opened))
    print(
        "p50/p99: time to the full response, or to the first SSE data chunk for streams; "
        "full: to the end of the stream;\ncpu ms/req: CPU of the answering process alone "
        "(mock upstream, or clawbot); other load: cores used by processes outside the bench"
    )
    text, checks = summary(cells, settings)
    print()
    print(text)
    if profiled:
        print()
        print(profiled)
    if json_out is not None:
        report = Report(
            machine=info,
            settings={
                "duration_s": settings.duration_s,
                "warmup_s": settings.warmup_s,
                "concurrencies": ",".join(map(str, settings.concurrencies)),
                "rate": settings.rate,
            },
            cells=cells,
            checks=checks,
        )
        json_out.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        print(f"\nresults written to {json_out}")
    return checks


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Command-line options and the settings they make."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument("--quick", action="store_true", help="~1 s per cell, for a smoke test")
    parser.add_argument(
        "--concurrency", default="1,16,32", help="closed-loop concurrencies (16 is always run)"
    )
    parser.add_argument(
        "--rate", type=float, default=500.0, help="open-loop req/s for extra rows (0: skip them)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy clawbot under c=16 non-stream load: .svg, .json (speedscope), else raw "
        "(summarised)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--clawbot",
        metavar="COMMAND",
        help="command that runs clawbot's CLI, to compare builds (default: this venv's clawbot)",
    )
    args = parser.parse_args(argv)
    concurrencies = {int(c) for c in args.concurrency.split(",") if c.strip()}
    settings = Settings(
        duration_s=1.0 if args.quick else args.duration,
        warmup_s=0.3 if args.quick else args.warmup,
        concurrencies=tuple(sorted({*concurrencies, TARGET_CONCURRENCY})),
        rate=args.rate,
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args, settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        checks = run(settings, args.json, args.profile, args.clawbot)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    return 1 if args.check and not all(c.passed for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
