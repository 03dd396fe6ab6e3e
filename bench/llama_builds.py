"""llama_decode speed of llama-cpp-python builds side by side: the portable wheel against native.

Each build runs in a child process of its own (one libllama per process), pointed at the
build's libraries with LLAMA_CPP_LIB_PATH, and times bench/inference.py's `decode_costs` on
the embedded model: tokens/s of one sequence's next token (generation), of 16 sequences' next
tokens in one batch (the engine's step at 16 sessions) and of a 256-token prompt, each the median
of `--repeats` decodes, best of `--rounds` interleaved passes. The first build is the baseline.

Builds (made by deploy/llama_wheel.py with `--keep-amx`, cached by their CMake arguments, so
only the first run compiles; about 4 minutes each and 8 for the portable one on 2 cores):
  native            -DGGML_NATIVE=ON: what a plain `pip install llama-cpp-python` compiles
  native-no-amx     the same with -mno-amx-*: native speed where the AMX kernels crash
  explicit-avx512   a fixed AVX-512 set (-DGGML_NATIVE=OFF -DGGML_AVX512=ON ...)
  portable          clawbot's wheel: every CPU level, the best loaded at run time
  portable@haswell  the same wheel held to its AVX2 level: what an AVX2-only server gets
A build whose child dies (the native build's AMX segfault) is reported with its signal.

    .venv/bin/python bench/llama_builds.py
    .venv/bin/python bench/llama_builds.py --builds portable,portable@haswell
    .venv/bin/python bench/llama_builds.py --lib mine=/opt/llama/lib --builds mine,portable
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAVORS = {
    "native": "-DGGML_NATIVE=ON",
    "native-no-amx": f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'",
    "explicit-avx512": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
    "-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON",
    "portable": None,  # deploy/llama_wheel.py's own default
}
DEFAULT_BUILDS = "native,native-no-amx,explicit-avx512,portable,portable@haswell"

_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from backends.llamacpp.runtime import build_features, load_cpu_backend, loaded_variant
load_cpu_backend({variant!r})
sys.path.insert(0, {bench!r})
from llama_builds import decode_speeds
print(json.dumps({{"speeds": decode_speeds({threads}, {repeats}), "variant": loaded_variant(),
                  "features": sorted(build_features())}}))
"""
SHAPES = {"generation": (1, 1), "16 sessions": (16, 1), "prompt": (1, 256)}
"""Batch shapes timed: (sequences, tokens each)."""
HISTORY = 64
"""Tokens already in each sequence's cache when a shape is timed."""


def decode_speeds(threads: int, repeats: int) -> dict[str, float]:
    """Tokens/s of llama_decode per shape on the embedded model (median of `repeats` runs).

    Runs in the child: 16 sequences of HISTORY tokens are read once; each timed batch is
    removed from the cache again, so every run sees the same state."""
    import logging
    import statistics
    import time

    import llama_cpp
    from llama_cpp import _internals

    from backends.llamacpp.backend import embedded_model_path

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    model = _internals.LlamaModel(
        path_model=str(embedded_model_path()),
        params=llama_cpp.llama_model_default_params(),
        verbose=False,
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 16 * 512, 16, False
    params.n_batch = params.n_ubatch = 256
    params.n_threads = params.n_threads_batch = threads
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(256, 0, 1)

    def decode(tokens: list[tuple[int, int]]) -> float:
        for i, (seq, pos) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + pos % 500, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, True
        batch.n_tokens = len(tokens)
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    try:
        for seq in range(16):
            decode([(seq, p) for p in range(HISTORY)])
        speeds = {}
        for name, (seqs, each) in SHAPES.items():
            step = [(seq, HISTORY + k) for seq in range(seqs) for k in range(each)]
            times = []
            for _ in range(repeats if each == 1 else max(3, repeats // 4)):
                times.append(decode(step))
                for seq in range(seqs):
                    llama_cpp.llama_memory_seq_rm(memory, seq, HISTORY, -1)
            speeds[name] = len(step) / statistics.median(times)
        return speeds
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()
        model.close()


def wheel_lib(flavor: str, lock: Path, work: Path) -> Path:
    """Build (or take from the cache) the flavor's wheel; its llama_cpp/lib, unpacked."""
    env = dict(os.environ)
    if (cmake_args := FLAVORS[flavor]) is not None:
        env["CLAWBOT_LLAMA_CMAKE_ARGS"] = cmake_args
    command = [sys.executable, str(ROOT / "deploy" / "llama_wheel.py"), "--lock", str(lock)]
    if flavor != "portable":
        command.append("--keep-amx")
    wheel = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    path = Path(wheel.stdout.strip().splitlines()[-1])
    target = work / flavor
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.startswith("llama_cpp/lib/"):
                archive.extract(name, target)
    return target / "llama_cpp" / "lib"


def measure(lib: Path, variant: str | None, threads: int, repeats: int) -> dict[str, object]:
    """One child on `lib`: its speeds, or how it died."""
    code = _CHILD.format(
        root=str(ROOT), bench=str(ROOT / "bench"), variant=variant, threads=threads, repeats=repeats
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if child.returncode != 0:
        why = (
            signal.Signals(-child.returncode).name
            if child.returncode < 0
            else (child.stderr.strip().splitlines() or ["failed"])[-1]
        )
        return {"error": why}
    result: dict[str, object] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, list[dict[str, object]]]) -> str:
    """Per build: its level and, per shape, the best round's tokens/s against the baseline."""
    head = f"{'build':<18}{'level':<10}" + "".join(f"{s + ' tok/s':>24}" for s in SHAPES)
    rows = [head]
    baseline: dict[str, float] | None = None
    for name, rounds in results.items():
        died = [r["error"] for r in rounds if "error" in r]
        if died:
            rows.append(f"{name:<18}{'-':<10}{'died: ' + str(died[0]):>24}")
            continue
        best = {
            shape: max(float(r["speeds"][shape]) for r in rounds)  # type: ignore[index]
            for shape in SHAPES
        }
        baseline = baseline or best
        cells = "".join(f"{f'{best[s]:,.0f} ({best[s] / baseline[s]:.2f}x)':>24}" for s in SHAPES)
        rows.append(f"{name:<18}{rounds[0]['variant'] or 'fixed'!s:<10}{cells}")
    rows.append(
        "(median of each run's timings, best of the rounds; x: against the first build that ran)"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", default=DEFAULT_BUILDS, help="comma-separated, in order")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.txt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--lib", action="append", default=[], metavar="NAME=DIR", help="an existing build"
    )
    parser.add_argument("--rounds", type=int, default=3, help="passes over every build")
    parser.add_argument("--repeats", type=int, default=40, help="timed decodes per shape")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.lib)
    builds = args.builds.split(",")
    results: dict[str, list[dict[str, object]]] = {build: [] for build in builds}
    with tempfile.TemporaryDirectory(prefix="clawbot-builds-") as tmp:
        libs = {}
        for build in builds:
            flavor = build.partition("@")[0]
            if flavor not in libs:
                libs[flavor] = (
                    Path(given[flavor])
                    if flavor in given
                    else wheel_lib(flavor, args.lock, Path(tmp))
                )
        for round_ in range(args.rounds):  # interleaved, so a busier minute hits every build
            for build in builds:
                flavor, _, variant = build.partition("@")
                result = measure(libs[flavor], variant or None, args.threads, args.repeats)
                results[build].append(result)
                print(f"round {round_ + 1} {build}: {result.get('error', 'ok')}", file=sys.stderr)
    print(f"llama_decode on the embedded model, {args.threads} threads, {args.rounds} rounds")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
