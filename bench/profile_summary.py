"""Summarise a py-spy `--format raw` profile: where the gateway's CPU time goes.

Each sample is charged to one layer: the innermost frame that belongs to a known package
(stdlib frames such as asyncio or contextlib are charged to whoever called them). It also
prints the hottest frames by self time and the share of time under a few key frames.

    py-spy record --pid PID --format raw --output /tmp/clawbot.txt --duration 10
    python bench/profile_summary.py /tmp/clawbot.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# (layer, pattern on a frame's file path); the first match from the leaf outwards wins.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("logging", re.compile(r"^logging/|/logging/")),
    ("httpx/httpcore/h11/anyio", re.compile(r"^(httpx|httpcore|h11|anyio|sniffio)/")),
    ("msgspec", re.compile(r"^msgspec/")),
    ("litestar", re.compile(r"^litestar/")),
    ("uvicorn/httptools", re.compile(r"^(uvicorn|httptools)/")),
    ("clawbot (app/backends/policies)", re.compile(r"^(app|backends|policies)/")),
)
EVENT_LOOP = "event loop (uvloop/asyncio, native)"
_LOOP_RUNNER = re.compile(r"^(Runner\.run|BaseEventLoop\.run_\w+) \(asyncio/")

# Frames whose inclusive share is worth knowing for the gateway.
KEY_FRAMES: tuple[tuple[str, str], ...] = (
    ("Edge.__call__", "app/api/middleware/edge.py"),
    ("Litestar.__call__", "litestar/app.py"),
    ("chat_completions", "app/api/openai/chat.py"),
    ("decode_body", "app/api/bodies.py"),
    ("admit", "app/core/gateway.py"),
    ("prepare_chat", "app/core/params.py"),
    ("unless_disconnected", "app/core/disconnect.py"),
    ("_disconnected", "app/core/disconnect.py"),
    ("OpenAIHTTPBackend._post", "backends/openai_http/backend.py"),
    ("AsyncClient.send", "httpx/_client.py"),
    ("AsyncConnectionPool._assign_requests_to_connections", "httpcore/"),
    ("json_response", "app/api/replies.py"),
    ("Handler.handle", "logging/"),
    ("Accounting.__call__", "app/api/middleware/accounting.py"),
    ("ApiKeyPolicy.check", "policies/api_key.py"),
    ("ModelAccessPolicy.check", "policies/model_access.py"),
    ("BudgetPolicy.check", "policies/budget.py"),
    ("RateLimitPolicy.check", "policies/rate_limit.py"),
    ("estimate_chat", "app/tokens.py"),
    ("RateLimiter.admit_all", "app/ledger/ratelimit.py"),
    ("Gateway.finish", "app/core/gateway.py"),
    ("release", "app/core/gateway.py"),
    ("AuditWriter.submit", "app/ledger/audit.py"),
    ("AuditWriter._run", "app/ledger/audit.py"),
    ("AuditWriter._insert", "app/ledger/audit.py"),
    ("KeyCache._poll", "app/ledger/keys.py"),
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a sampled stack."""

    func: str
    file: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        """A frame from py-spy's `func (file:line)` notation."""
        match = _FRAME.match(text)
        if match is None:
            return cls(text, "")
        return cls(match.group("func"), match.group("file"))


def read_raw(lines: Iterable[str]) -> list[tuple[list[Frame], int, str]]:
    """Stacks (root first), sample counts and thread labels from py-spy raw output."""
    stacks = []
    for line in lines:
        text, _, count = line.rstrip("\n").rpartition(" ")
        if not text or not count.isdigit():
            continue
        parts = text.split(";")
        thread = parts[0] if parts[0].startswith(("thread ", "process ")) else ""
        frames = [Frame.parse(p) for p in parts if not p.startswith(("thread ", "process "))]
        stacks.append((frames, int(count), thread))
    return stacks


def layer_of(frames: Sequence[Frame]) -> str:
    """The layer charged for one sample; time in the loop's own (native) code is its own layer."""
    for frame in reversed(frames):
        if _LOOP_RUNNER.search(f"{frame.func} ({frame.file})"):
            return EVENT_LOOP  # above the loop: startup frames, not request work
        for name, pattern in LAYERS:
            if pattern.search(frame.file):
                return name
    return EVENT_LOOP


def summarise(stacks: Sequence[tuple[list[Frame], int, str]], top: int = 25) -> str:
    """The report: layers, key frames, hottest self frames."""
    by_thread = any("MainThread" in t for _, _, t in stacks)
    on_main = [(f, n) for f, n, t in stacks if not by_thread or "MainThread" in t]
    other = sum(n for _, n, t in stacks if by_thread and "MainThread" not in t)
    total = sum(n for _, n in on_main)
    if total == 0:
        return "no samples"
    layers: Counter[str] = Counter()
    selves: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for frames, n in on_main:
        layers[layer_of(frames)] += n
        if frames:
            leaf = frames[-1]
            selves[f"{leaf.func} ({leaf.file})"] += n
        seen = {(f.func, f.file) for f in frames}
        for func, file in KEY_FRAMES:
            if any(f == func and file in path for f, path in seen):
                keys[func] += n
    lines = [f"main thread: {total} samples; other threads: {other} samples", "by layer:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in layers.most_common()]
    lines.append("under key frames (inclusive):")
    lines += [f"  {100 * keys[func] / total:5.1f}%  {func}" for func, _ in KEY_FRAMES if keys[func]]
    lines.append(f"hottest frames (self), top {top}:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in selves.most_common(top)]
    if other:
        threads: Counter[str] = Counter()
        for frames, n, thread in stacks:
            if by_thread and "MainThread" not in thread:
                where = f"{frames[0].func} ({frames[0].file})" if frames else "?"
                threads[f"{thread} {where}"] += n
        lines.append("other threads (samples, as % of the main thread's):")
        lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common(5)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy --format raw output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with args.profile.open() as lines:
        print(summarise(read_raw(lines), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
