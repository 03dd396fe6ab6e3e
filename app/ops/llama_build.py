"""`clawbot check` on the llama.cpp build: the CPU's instruction sets against the build's.

The build is read in a child process (`python -m backends.llamacpp.runtime`): a library compiled
for instructions this CPU lacks dies of SIGILL there, and the check reports it instead of
dying with it.
"""

from __future__ import annotations

import asyncio
import json
import platform
import signal
import sys

from app.ops.diagnose import Check
from backends.llamacpp.runtime import AMX, CPU_FLAGS, cpu_features

REBUILD = (
    "rebuild llama-cpp-python portably: `make llama` (or `python deploy/llama_wheel.py "
    "--lock requirements.txt --install .venv/bin/python`); a build of your own needs "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" '
    "without the sapphirerapids (AMX) variant"
)
_TIMEOUT_S = 120.0
_TARGET = "llama.cpp"


def _isa(features: frozenset[str] | list[str]) -> str:
    """Instruction sets in ggml's order."""
    return " ".join(name for name in CPU_FLAGS if name in features) or "none known"


async def check_llama_build(cpu: frozenset[str] | None = None) -> list[Check]:
    """The CPU's line, then the build's: FAIL when it uses what the CPU lacks or AMX."""
    cpu = cpu_features() if cpu is None else cpu
    checks = [
        Check(
            target="cpu",
            ok=True,
            message=f"{platform.machine()} with {_isa(cpu)}",
        )
    ]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.llamacpp.runtime",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), _TIMEOUT_S)
    except TimeoutError:
        child.kill()
        await child.wait()
        out, err = b"", b"no answer within %d s" % _TIMEOUT_S
    checks.append(_judge(cpu, child.returncode, out, err))
    return checks


def _failed(problem: str, message: str) -> Check:
    return Check(target=_TARGET, ok=False, problem=problem, message=message, fix=REBUILD)


def _judge(cpu: frozenset[str], returncode: int | None, out: bytes, err: bytes) -> Check:
    if returncode != 0:
        if returncode is not None and returncode < 0:
            why = f"killed by {signal.Signals(-returncode).name}"
        else:
            lines = err.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {returncode}"
        return _failed("llama_build_broken", f"loading the llama.cpp library failed ({why})")
    build = json.loads(out)
    features = frozenset(build["features"])
    variant, variants = build["variant"], build["variants"]
    where = f"{variant} level of {len(variants)}" if variant else "one fixed level"
    message = f"llama-cpp-python {build['version']}, CPU backend: {where}, {_isa(features)}"
    missing = sorted((features & CPU_FLAGS.keys()) - cpu) if cpu else []
    if missing:
        return _failed(
            "llama_build_cpu_mismatch",
            f"{message}; this CPU lacks {' '.join(missing)}: illegal instructions ahead",
        )
    if amx := sorted(features & AMX):
        return _failed(
            "llama_build_amx",
            f"{message}; {'/'.join(amx)} is known to crash llama_decode "
            "(ggml_backend_amx_mul_mat): models load without AMX and without repacked weights",
        )
    note = None
    if not variants:
        note = "built for one instruction set: a portable build picks the best level per CPU"
    elif "sapphirerapids" in variants:
        note = "ships the AMX (sapphirerapids) level, which crashes where it is chosen"
    return Check(target=_TARGET, ok=True, message=message, note=note)
