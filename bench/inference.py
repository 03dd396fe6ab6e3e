"""Inference throughput of the embedded model through clawbot, against llama-cpp-python's server.

Starts `clawbot serve` with the embedded model (SmolLM2-135M, context 2048, model options from
`--clawbot-options`) and drives it with 1, 4, 8, 16 and 50 concurrent streaming chat sessions;
each sends `--turns` requests back to back, each a short customer-service conversation (a
~40-token system prompt and a question from a fixed list, max_tokens 64-128, temperature 0.7,
seeded). Then the same load goes to `python -m llama_cpp.server` as the baseline: same GGUF,
n_ctx, n_threads and n_batch, run with `--interrupt_requests False` (its default cancels the
running stream whenever a new request arrives); it serves one request at a time. One server
runs at a time, so they never share the CPU; this process is the client (one httpx client).

Prints per server and concurrency: aggregate completion tokens/s, TTFT p50/p95 (to the first
chunk carrying content), per-stream tokens/s (p50 of tokens after the first / time after the
first), errors, wall time, and the cores the server and the rest of the machine used (other
above ~0.2 means a busy machine: llama.cpp with n_threads = cores slows down sharply when
another process takes a core); then the targets and the clawbot/baseline ratios. Tokens come
from `usage` (stream_options.include_usage) where sent, else one per content chunk. A prefix
scenario (`--prefix-turns`) runs one conversation resending its whole history each turn
(max_tokens 48, temperature 0) against clawbot, a second clawbot with `prefix_cache: false`
(n/a if the backend rejects the option) and the baseline, and prints each turn's TTFT.
Where the time goes: before the servers start, `llama_decode` alone is timed on batches of
each shape (1 sequence x 1 token, 16 x 1, a 16- and a 256-token prompt; `--no-costs` skips it):
its ms per token at 16 x 1 against 1 x 1 is the most batching can gain on the machine. Per
level, clawbot's /metrics engine counters split the wall time into llama_decode, sampling and
Python bookkeeping on the engine thread, and waiting.
Targets: clawbot agg tok/s at 16 sessions >= 3x at 1, no errors at 50, TTFT p50 at 8 <= 200 ms,
last-turn TTFT without prefix reuse >= 3x with it. The default `--clawbot-options` need the
batching backend (`slots`, `max_queue`, ...). Exits 2 if the run fails; 1 with `--check` and a
target missed (or not measured).

    .venv/bin/python bench/inference.py
    .venv/bin/python bench/inference.py --quick
    .venv/bin/python bench/inference.py --sessions 1,16 --turns 3 --no-baseline --json out.json
    make bench-inference BENCH_ARGS=--quick     # installs the `bench` extra first
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import operator
import os
import random
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from gateway_overhead import STOP_GRACE_S, Service, _terminate, machine_busy_s, machine_info
from prometheus_client.parser import text_string_to_metric_families

from backends.llamacpp.backend import LlamaOptions, embedded_model_path

MODEL = "smollm2"
ENGINE_COUNTERS = ("decode_steps", "batch_tokens", "decode_seconds", "busy_seconds")
N_CTX = 2048
DEFAULT_OPTIONS = '{"slots": 16, "n_threads": 2, "max_queue": 256, "queue_timeout_s": 600}'
TIMEOUT_S = 600.0  # per request
START_TIMEOUT_S = 180.0
BASELINE_MODULES = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
TARGET_SCALING = 3.0  # clawbot agg tok/s at 16 sessions / at 1
TARGET_TTFT_MS = 200.0  # clawbot TTFT p50 at 8 sessions
TARGET_PREFIX = 3.0  # last-turn TTFT without prefix reuse / with it
Running = tuple[str, Service]
"""A started server: its chat completions URL, and its process."""
OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}
SYSTEM = (  # 40 tokens
    "You are the support assistant of Northwind Outfitters, an outdoor gear shop. Answer in two "
    "or three short, friendly sentences, ask for the order number when needed, and never invent "
    "policies."
)
QUESTIONS = (
    "Where is my order? I placed it five days ago and it still says processing.",
    "Can I return a tent I bought three weeks ago if I already used it once?",
    "How do I change the shipping address on an order I just placed?",
    "Do you ship to Canada, and how long does it usually take?",
    "My hiking boots arrived in the wrong size. What should I do?",
    "Is there a warranty on your sleeping bags?",
    "I was charged twice for the same order. Can you help?",
    "What is the difference between your two-person and three-person tents?",
    "Can I use a discount code on items that are already on sale?",
    "How do I reset the password for my account?",
    "The zipper on my new backpack broke after one trip. Can I get a replacement?",
    "Do you have a store where I can try on jackets in person?",
    "How much does express shipping cost?",
    "Can I cancel my order if it has not shipped yet?",
    "Which water filter would you recommend for a week-long hike?",
    "My package says delivered but I cannot find it anywhere.",
    "Do you offer gift cards, and do they expire?",
    "How do I wash a down jacket without ruining it?",
    "Can I exchange a gift I received for a different color?",
    "Is my payment information stored safely on your site?",
)


@dataclass
class Reply:
    """One streamed chat request, timed with perf_counter."""

    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    prompt_tokens: int | None = None
    content: str = ""
    error: str | None = None


@dataclass
class Level:
    """One server at one concurrency; times in ms."""

    server: str
    sessions: int
    requests: int
    tokens: int
    wall_s: float
    agg_tps: float
    ttft_p50: float | None
    ttft_p95: float | None
    stream_tps_p50: float | None
    errors: int
    first_errors: list[str]
    server_cores: float | None
    """CPU the server used, in cores (its threads together)."""
    other_cores: float | None
    """CPU used by processes other than the server and this client: a busy machine."""
    engine: dict[str, float] | None = None
    """clawbot only: where its engine thread's time went (from its /metrics counters)."""
    ttft_later_p50: float | None = None
    """TTFT p50 over each session's turns after its first (not the opening burst)."""


@dataclass
class PrefixRun:
    """The TTFT (ms) of each turn of one growing conversation; `note` if it could not run."""

    name: str
    ttft_ms: list[float] = field(default_factory=list)
    last_prompt_tokens: int | None = None
    note: str | None = None


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def chat(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int, t: float
) -> Reply:
    """One streaming chat request; a failure of any kind lands in `Reply.error`."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": t}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    reply, chunks, counted, parts = Reply(time.perf_counter()), 0, None, []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                reply.error = f"HTTP {response.status_code}: {text[:300]}"
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if data == "[DONE]" or reply.error:
                    break
                event = json.loads(data) if data else {}
                if event.get("error"):
                    reply.error = f"error event: {json.dumps(event['error'])[:300]}"
                for choice in event.get("choices") or ():
                    if text := (choice.get("delta") or {}).get("content"):
                        reply.first = reply.first or time.perf_counter()
                        chunks += 1
                        parts.append(text)
                if usage := event.get("usage"):
                    counted = usage["completion_tokens"]
                    reply.prompt_tokens = usage["prompt_tokens"]
    except Exception as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.end = time.perf_counter()
    reply.tokens, reply.content = (chunks if counted is None else counted), "".join(parts)
    return reply


def client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits)


def question(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def cpu_now(service: Service) -> tuple[float | None, float, float | None]:
    """CPU seconds so far: the whole machine, this process (the client), the server."""
    return machine_busy_s(), time.process_time(), service.cpu_s()


async def sessions_level(
    name: str, url: str, service: Service, n: int, args: argparse.Namespace
) -> Level:
    """`n` concurrent sessions of `args.turns` requests each, summed up."""
    rng = random.Random(args.seed * 1000 + n)
    plan = range(args.turns)
    plans = [[(rng.choice(QUESTIONS), rng.randint(64, 128)) for _ in plan] for _ in range(n)]
    async with client(n + 4) as http:

        async def session(plan: list[tuple[str, int]]) -> list[Reply]:
            return [await chat(http, url, question(q), most, 0.7) for q, most in plan]

        counters0 = await asyncio.to_thread(engine_counters, url)
        started, (busy0, own0, srv0) = time.perf_counter(), cpu_now(service)
        by_session = await asyncio.gather(*map(session, plans))
        wall, (busy1, own1, srv1) = time.perf_counter() - started, cpu_now(service)
        replies = [r for rs in by_session for r in rs]
        counters1 = await asyncio.to_thread(engine_counters, url)
    srv = None if srv0 is None or srv1 is None else srv1 - srv0
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    other = None if srv is None or busy is None else max(0.0, busy - srv - (own1 - own0)) / wall
    good = [r for r in replies if r.error is None and r.first is not None]
    tokens = sum(r.tokens for r in good)
    ttfts = [(r.first - r.start) * 1000 for r in good if r.first]
    # All sessions start together, so first turns arrive as one burst; later turns arrive
    # spread out, as a steady state's requests do.
    later = [(r.first - r.start) * 1000 for rs in by_session for r in rs[1:] if r.first]
    rates = [(r.tokens - 1) / (r.end - r.first) for r in good if r.first and r.tokens > 1]
    errors = [r.error or "no content" for r in replies if r.error or r.first is None]
    return Level(
        name, n, len(replies), tokens, wall, tokens / wall, pct(ttfts, 50), pct(ttfts, 95),
        pct(rates, 50), len(errors), errors[:3], None if srv is None else srv / wall, other,
        engine_split(counters0, counters1, wall), pct(later, 50),
    )  # fmt: skip


def engine_counters(url: str) -> dict[str, float] | None:
    """The engine's counters from clawbot's /metrics (None for a server without them)."""
    base = url.split("/v1/")[0]
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except Exception:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("clawbot_engine_").removesuffix("_total")
            if sample.name.startswith("clawbot_engine_") and name in ENGINE_COUNTERS:
                found[name] = found.get(name, 0.0) + sample.value
    return found or None


def engine_split(
    before: dict[str, float] | None, after: dict[str, float] | None, wall: float
) -> dict[str, float] | None:
    """Shares of the wall time: decoding, sampling and bookkeeping, idle; tokens per decode."""
    if not before or not after:
        return None
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ENGINE_COUNTERS}
    steps, tokens = max(d["decode_steps"], 1.0), max(d["batch_tokens"], 1.0)
    return {
        "decode_pct": 100 * d["decode_seconds"] / wall,
        "other_pct": 100 * (d["busy_seconds"] - d["decode_seconds"]) / wall,
        "idle_pct": 100 * (1 - d["busy_seconds"] / wall),
        "tokens_per_decode": d["batch_tokens"] / steps,
        "ms_per_token": 1000 * d["decode_seconds"] / tokens,
    }


async def prefix_conversation(name: str, url: str, turns: int) -> PrefixRun:
    """One conversation of `turns` turns, each resending the whole history so far."""
    run = PrefixRun(name)
    messages = [{"role": "system", "content": SYSTEM}]
    async with client(2) as http:
        for k in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
            reply = await chat(http, url, messages, 48, 0.0)
            if reply.error or reply.first is None:
                run.note = f"turn {k + 1}: {reply.error or 'no content'}"
                break
            run.ttft_ms.append((reply.first - reply.start) * 1000)
            run.last_prompt_tokens = reply.prompt_tokens
            messages.append({"role": "assistant", "content": reply.content})
    return run


async def measure(
    name: str, url: str, service: Service, args: argparse.Namespace
) -> tuple[list[Level], PrefixRun]:
    """Warm up, run every concurrency level, then the prefix conversation."""
    async with client(2) as http:
        warm = await chat(http, url, question("Hello!"), 8, 0.7)
    if warm.error:
        raise RuntimeError(f"{name}: the warm-up request failed: {warm.error}")
    levels = []
    for n in args.sessions:
        levels.append(await sessions_level(name, url, service, n, args))
        print(f"  {name}: {n} sessions in {levels[-1].wall_s:.1f} s", flush=True)
    prefix = await prefix_conversation(name, url, args.prefix_turns)
    return levels, prefix


class StartFailed(RuntimeError):
    """A server exited, or did not answer in time; the message quotes its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)
    return False


@contextlib.contextmanager
def server(name: str, argv: list[str], ready: str, port: int, logdir: Path) -> Iterator[Running]:
    """Run `argv`; yield its chat URL and process once GET `ready` answers 200; stop it after."""
    env = {k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"}
    service = Service(name, argv, logdir, {**env, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(f"http://127.0.0.1:{port}{ready}"):
            if service.process.poll() is not None or time.monotonic() > deadline:
                raise StartFailed(f"{name} did not start:\n{service.tail(15)}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1/chat/completions", service
    finally:
        service.close(STOP_GRACE_S)


def clawbot(name: str, options: dict[str, Any], logdir: Path) -> ContextManager[Running]:
    """`clawbot serve` of the embedded model with `options`, ready once /ready answers."""
    port = free_port()
    model = {"id": MODEL, "backend": "llamacpp:embedded", "context_length": N_CTX}
    config = {
        "model_server": {"host": "127.0.0.1", "port": port, "timeout": int(TIMEOUT_S * 1000)},
        "auth": {"api_key": ""},
        "logging": {"level": "WARNING"},
        "database": {"url": f"sqlite+aiosqlite:///{logdir / name}.db"},
        "models": [{**model, "options": options}],
    }
    path = logdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    argv = [sys.executable, "-m", "app", "serve", "--config", str(path)]
    return server(name, argv, "/ready", port, logdir)


def baseline(n_threads: int, n_batch: int, logdir: Path) -> ContextManager[Running]:
    """llama-cpp-python's server on the same GGUF, ready once /v1/models answers."""
    port = free_port()
    # The portable build's CPU backend is loaded by clawbot; llama_cpp.server needs it done too.
    launch = (
        "import runpy; from backends.llamacpp.runtime import load_cpu_backend; load_cpu_backend(); "
        "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
    )
    argv = [
        sys.executable, "-c", launch, "--model", str(embedded_model_path()),
        "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(N_CTX), "--n_threads", str(n_threads),
        "--n_threads_batch", str(n_threads), "--n_batch", str(n_batch),
        "--interrupt_requests", "False",
    ]  # fmt: skip
    return server("baseline", argv, "/v1/models", port, logdir)


def _f(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def table(levels: Sequence[Level]) -> str:
    rows = [
        f"{'server':<9}{'sessions':>9}{'reqs':>6}{'agg tok/s':>11}{'ttft p50':>10}"
        f"{'ttft p95':>10}{'later p50':>11}{'stream tok/s':>14}{'errors':>8}{'wall s':>8}"
        f"{'srv cpu':>9}{'other':>7}"
    ]
    for lv in levels:
        rows.append(
            f"{lv.server:<9}{lv.sessions:>9}{lv.requests:>6}{lv.agg_tps:>11.1f}"
            f"{_f(lv.ttft_p50):>10}{_f(lv.ttft_p95):>10}{_f(lv.ttft_later_p50):>11}"
            f"{_f(lv.stream_tps_p50, '.1f'):>14}"
            f"{lv.errors:>8}{lv.wall_s:>8.1f}{_f(lv.server_cores, '.2f'):>9}"
            f"{_f(lv.other_cores, '.2f'):>7}"
        )
    errors = [f"  {lv.server} x{lv.sessions}: {e}" for lv in levels for e in lv.first_errors]
    return "\n".join(rows + (["first errors:", *errors] if errors else []))


def engine_table(levels: Sequence[Level]) -> str:
    rows = [
        f"{'sessions':>8}{'decode %':>10}{'sampling+python %':>19}{'idle %':>8}"
        f"{'tokens/decode':>15}{'decode ms/token':>17}"
    ]
    for lv in levels:
        if e := lv.engine:
            rows.append(
                f"{lv.sessions:>8}{e['decode_pct']:>10.1f}{e['other_pct']:>19.1f}"
                f"{e['idle_pct']:>8.1f}{e['tokens_per_decode']:>15.1f}{e['ms_per_token']:>17.2f}"
            )
    return "\n".join(rows) if len(rows) > 1 else ""


def decode_costs(n_threads: int, n_batch: int) -> list[tuple[str, int, float]]:
    """llama_decode alone on the embedded model (no server): ms per call, per batch shape.

    16 sequences at position 100 each (a KV stream per sequence, as clawbot's default), then
    one decode of each shape, best of 5: what a step of the engine costs at best, and so the
    most that batching can gain on this machine.
    """
    import llama_cpp
    from llama_cpp import _internals

    from backends.llamacpp.runtime import load_cpu_backend

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    load_cpu_backend()
    model = _internals.LlamaModel(
        path_model=str(embedded_model_path()),
        params=llama_cpp.llama_model_default_params(),
        verbose=False,
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = N_CTX * 16, 16, False
    params.n_batch = params.n_ubatch = max(n_batch, 256)
    params.n_threads = params.n_threads_batch = n_threads
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def decode(tokens: list[tuple[int, int]], outputs: bool) -> float:
        for i, (seq, pos) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + pos % 500, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, outputs or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - started) * 1000

    shapes = [  # name, tokens, (sequences, tokens each)
        ("1 sequence x 1 token (decode alone)", 1, (1, 1)),
        ("4 sequences x 1 token", 4, (4, 1)),
        ("16 sequences x 1 token", 16, (16, 1)),
        ("1 sequence x 16 tokens (prompt)", 16, (1, 16)),
        ("1 sequence x 256 tokens (prompt)", 256, (1, 256)),
    ]
    results = []
    try:
        for name, count, (seqs, each) in shapes:
            best = float("inf")
            for _ in range(5):
                llama_cpp.llama_memory_clear(memory, True)
                for seq in range(16):  # a 100-token history per sequence
                    decode([(seq, p) for p in range(100)], False)
                step = [(seq, 100 + k) for seq in range(seqs) for k in range(each)]
                best = min(best, decode(step, each == 1))
            results.append((name, count, best))
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()
        model.close()
    return results


def costs_table(costs: list[tuple[str, int, float]]) -> str:
    rows = [f"{'batch':<36}{'ms/decode':>10}{'ms/token':>10}{'tokens/s':>10}"]
    for name, count, ms in costs:
        rows.append(f"{name:<36}{ms:>10.1f}{ms / count:>10.2f}{1000 * count / ms:>10.0f}")
    alone, sixteen = costs[0][2], costs[2][2] / 16
    rows.append(
        f"most batching can gain (1x1 ms/token / 16x1 ms/token): {alone / sixteen:.2f}x "
        f"(target for the 16/1 sessions ratio: {TARGET_SCALING:g}x)"
    )
    return "\n".join(rows)


def prefix_table(runs: Sequence[PrefixRun]) -> str:
    turns = max((len(r.ttft_ms) for r in runs), default=0)
    lines = [f"{'ttft ms':<18}" + "".join(f"{f't{k + 1}':>7}" for k in range(turns)) + "  prompt"]
    for r in runs:
        if r.note and not r.ttft_ms:
            lines.append(f"{r.name:<18}n/a: {r.note.strip().splitlines()[-1][:120]}")
            continue
        cells = "".join(f"{t:>7.0f}" for t in r.ttft_ms).ljust(7 * turns)
        lines.append(f"{r.name:<18}{cells}  {_f(r.last_prompt_tokens, 'd'):>6}")
    return "\n".join(lines)


def checks_and_ratios(levels: list[Level], prefix: list[PrefixRun]) -> tuple[str, list[Any]]:
    """The targets (each passed, failed or n/a) and clawbot / baseline per concurrency."""
    at = {(lv.server, lv.sessions): lv for lv in levels}
    c1, c8, c16, c50 = (at.get(("clawbot", n)) for n in (1, 8, 16, 50))
    runs = {r.name: r for r in prefix}
    reuse, fresh = runs.get("clawbot"), runs.get("clawbot-noprefix")
    scaling = c16.agg_tps / c1.agg_tps if c1 and c16 and c1.agg_tps else None
    both = reuse and fresh and reuse.ttft_ms and len(fresh.ttft_ms) == len(reuse.ttft_ms)
    gain = fresh.ttft_ms[-1] / reuse.ttft_ms[-1] if both and reuse and fresh else None
    found = [  # name, value, target, passed when value is not None
        ("clawbot agg tok/s, 16 sessions / 1", scaling, TARGET_SCALING, ">="),
        ("clawbot errors at 50 sessions", c50.errors if c50 else None, 0, "=="),
        ("clawbot TTFT p50 at 8 sessions, ms", c8.ttft_p50 if c8 else None, TARGET_TTFT_MS, "<="),
        ("last-turn TTFT, no prefix reuse / reuse", gain, TARGET_PREFIX, ">="),
    ]
    lines, checks = [], []
    for name, value, target, op in found:
        ok = value is not None and OPS[op](value, target)
        checks.append({"name": name, "value": value, "target": f"{op} {target:g}", "passed": ok})
        verdict = "n/a " if value is None else ("PASS" if ok else "FAIL")
        lines.append(f"  [{verdict}] {name}: {_f(value, '.3g')} (target {op} {target:g})")
    lines.append(
        f"clawbot / baseline {'sessions':>12}{'agg tok/s':>11}{'ttft p50':>10}{'stream':>8}"
    )
    for lv in levels:
        if lv.server == "clawbot" and (base := at.get(("baseline", lv.sessions))):
            pairs = ((lv.agg_tps, base.agg_tps), (lv.ttft_p50, base.ttft_p50))
            pairs += ((lv.stream_tps_p50, base.stream_tps_p50),)
            div = [_f(a / b if a is not None and b else None, ".2f") for a, b in pairs]
            lines.append(f"{'':<18} {lv.sessions:>12}{div[0]:>11}{div[1]:>10}{div[2]:>8}")
    return "\n".join(lines), checks


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure clawbot, clawbot without prefix reuse, then the baseline; print the report."""
    options = args.clawbot_options
    n_threads = int(options.get("n_threads", 2))
    n_batch = int(options.get("n_batch", LlamaOptions().n_batch))
    info = {k: v for k, v in machine_info().items() if k != "loop"}  # the client: asyncio
    info["llama_cpp"] = version("llama-cpp-python")
    print("clawbot inference: embedded SmolLM2-135M, concurrent streaming chat sessions")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"clawbot: llamacpp:embedded, context_length {N_CTX}, options {json.dumps(options)}")
    if not args.no_baseline:
        print(
            f"baseline: python -m llama_cpp.server --n_ctx {N_CTX} --n_threads {n_threads} "
            f"--n_batch {n_batch} --interrupt_requests False (serves one request at a time)"
        )
    print(
        f"load: {','.join(map(str, args.sessions))} sessions x {args.turns} turn(s), "
        f"max_tokens 64-128, temperature 0.7, seed {args.seed}"
    )
    costs = [] if args.no_costs else decode_costs(n_threads, n_batch)
    levels: list[Level] = []
    prefix: list[PrefixRun] = []
    with tempfile.TemporaryDirectory(prefix="clawbot-inference-") as tmp:
        logdir = Path(tmp)
        try:
            with clawbot("clawbot", options, logdir) as (url, service):
                done, with_reuse = asyncio.run(measure("clawbot", url, service, args))
        except StartFailed as exc:
            hint = "for a backend without the batching options: --clawbot-options "
            raise StartFailed(f"{exc}\n({hint}'{{\"n_threads\": 2}}')") from None
        levels += done
        prefix.append(with_reuse)
        if args.prefix_turns:
            name = "clawbot-noprefix"
            try:
                with clawbot(name, {**options, "prefix_cache": False}, logdir) as (url, _):
                    prefix.append(asyncio.run(prefix_conversation(name, url, args.prefix_turns)))
            except StartFailed as exc:
                prefix.append(PrefixRun(name, note=str(exc)))
        if not args.no_baseline:
            with baseline(n_threads, n_batch, logdir) as (url, service):
                done, base_prefix = asyncio.run(measure("baseline", url, service, args))
            levels += done
            prefix.append(base_prefix)
    levels.sort(key=lambda lv: (lv.sessions, lv.server != "clawbot"))
    print(
        "\nTTFT in ms; later p50: TTFT p50 of the turns after each session's first (the first "
        "turns of all sessions arrive as one burst); stream tok/s: p50 per stream, after its "
        "first token; srv cpu: cores the server used; other: cores used by other processes "
        "(above ~0.2 the numbers are noisy)"
    )
    print("baseline: llama_cpp.server --interrupt_requests False")
    print(table(levels))
    if split := engine_table(levels):
        print(
            "\nclawbot's engine thread, share of each level's wall time (from /metrics): in "
            "llama_decode, sampling and Python bookkeeping, waiting; tokens per decode step"
        )
        print(split)
    if costs:
        print(f"\nllama_decode alone on this machine ({n_threads} threads, best of 5):")
        print(costs_table(costs))
    if args.prefix_turns:
        print(
            f"\nprefix reuse: one conversation of {args.prefix_turns} turns, each resending the "
            "whole history (max_tokens 48, temperature 0); prompt: last turn's prompt tokens"
        )
        print(prefix_table(prefix))
    text, checks = checks_and_ratios(levels, prefix if args.prefix_turns else [])
    print("\ntargets:")
    print(text)
    if args.json:
        report = {
            "machine": info,
            "options": options,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "levels": [asdict(lv) for lv in levels],
            "decode_costs": [{"batch": n, "tokens": c, "ms": ms} for n, c, ms in costs],
            "prefix": [asdict(r) for r in prefix],
            "checks": checks,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,4,8,16,50", help="concurrencies, comma-separated")
    parser.add_argument("--turns", type=int, default=2, help="requests per session, back to back")
    parser.add_argument("--quick", action="store_true", help="sessions 1,4 and 1 turn")
    parser.add_argument("--prefix-turns", type=int, default=10, help="0: no prefix scenario")
    parser.add_argument("--clawbot-options", default=DEFAULT_OPTIONS, help="model options (JSON)")
    parser.add_argument("--no-baseline", action="store_true", help="measure clawbot only")
    parser.add_argument("--no-costs", action="store_true", help="skip measuring llama_decode alone")
    parser.add_argument("--seed", type=int, default=7, help="seeds questions and max_tokens")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    args.sessions = [1, 4] if args.quick else sorted({int(s) for s in args.sessions.split(",")})
    args.turns = 1 if args.quick else args.turns
    try:
        args.clawbot_options = json.loads(args.clawbot_options)
    except ValueError as exc:
        parser.error(f"--clawbot-options: {exc}")
    if not isinstance(args.clawbot_options, dict):
        parser.error("--clawbot-options must be a JSON object")
    missing = [m for m in BASELINE_MODULES if importlib.util.find_spec(m) is None]
    if missing and not args.no_baseline:
        print(
            f"note: the baseline needs {', '.join(missing)}: .venv/bin/pip install -e '.[bench]' "
            "(or make bench-inference); measuring clawbot only",
            file=sys.stderr,
        )
        args.no_baseline = True
    signal.signal(signal.SIGTERM, _terminate)
    try:
        checks = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    return 1 if args.check and not all(c["passed"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
