"""The llama.cpp library as this process loads it: its CPU backend and the features it uses.

clawbot's build of llama-cpp-python (`deploy/llama_wheel.py`) is portable. ggml's CPU backend
is compiled once per x86-64 level, as `libggml-cpu-<level>.so` files beside libllama
(GGML_BACKEND_DL with GGML_CPU_ALL_VARIANTS), and ggml loads the best level this CPU can run.
llama-cpp-python never asks ggml to load them, and ggml looks only next to the executable and
in the working directory, so `load_cpu_backend` points it at the package's own lib directory.
A build with its CPU backend linked in (plain `pip install llama-cpp-python`) needs nothing.

`python -m backends.llamacpp.runtime` prints `describe()` as JSON: `clawbot check` reads the build
that way, in a child process, so a build this CPU cannot run kills the child, not the check.
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from pathlib import Path
from typing import Any

from app.config import ConfigError

AMX = frozenset({"AMX_INT8", "AMX_TILE", "AMX_BF16", "AMX_FP16"})
"""Build features whose kernels crash (`ggml_backend_amx_mul_mat`, ggml-org/llama.cpp#20824)."""

CPU_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
"""ggml's names for x86 instruction sets, and the flag /proc/cpuinfo gives each."""

_VARIANT = re.compile(r"libggml-cpu-(?P<name>[\w.]+)\.so")
_LOADING = threading.Lock()
"""Models load on worker threads, and ggml's registry is not thread-safe: two first loads at
once would register the CPU backend twice. (The registry itself is the state; this only
orders access to it.)"""


def cpu_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction sets of `CPU_FLAGS` this CPU has, by ggml's names (empty off Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    return frozenset(name for name, flag in CPU_FLAGS.items() if flag in flags)


def _lib_dir() -> Path:
    """Where llama-cpp-python loaded libllama from (`LLAMA_CPP_LIB_PATH` moves it)."""
    from llama_cpp import llama_cpp as bindings

    return Path(bindings._base_path)


def _libggml() -> Any:
    """ggml's registry as libllama sees it.

    Looked up through libllama's handle, which searches libllama's own dependencies:
    `llama_cpp._ggml` opens another copy of libggml (the wheel holds the file twice, as
    libggml.so and libggml.so.0), with a registry of its own that libllama never reads."""
    from llama_cpp import llama_cpp as bindings

    lib = bindings._lib
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_count.argtypes = []
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    return lib


def variants() -> list[str]:
    """The CPU levels this build ships as loadable backends (none for a linked-in backend)."""
    found = (_VARIANT.fullmatch(p.name) for p in _lib_dir().glob("libggml-cpu-*.so"))
    return sorted(m.group("name") for m in found if m is not None)


def load_cpu_backend(variant: str | None = None) -> None:
    """Make sure ggml has a CPU backend: load the best variant of a portable build, once.

    `variant` loads that level instead (`haswell` is AVX2), to measure what another CPU gets.
    ggml keeps its own registry, so calling this again costs one lookup."""
    lib = _libggml()
    with _LOADING:
        if lib.ggml_backend_reg_count() == 0:
            if variant is None:
                lib.ggml_backend_load_all_from_path(str(_lib_dir()).encode())
            else:
                lib.ggml_backend_load(str(_lib_dir() / f"libggml-cpu-{variant}.so").encode())
    if lib.ggml_backend_reg_count() == 0:
        raise ConfigError(
            f"llama.cpp found no CPU backend it can run in {_lib_dir()}; rebuild it: "
            "`make llama` (or `python deploy/llama_wheel.py --lock requirements.txt "
            "--install .venv/bin/python`)"
        )


def loaded_variant() -> str | None:
    """The CPU level ggml loaded into this process, for a portable build."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    match = _VARIANT.search(maps)
    return match.group("name") if match else None


def build_features() -> frozenset[str]:
    """What the CPU backend in use was compiled for (`AVX2`, `AVX512_VNNI`, …), from
    `llama_print_system_info`."""
    import llama_cpp

    load_cpu_backend()
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return frozenset(re.findall(r"(\w+) = 1", info))


def describe() -> dict[str, Any]:
    """The build, as `clawbot check` reports it."""
    import llama_cpp

    features = build_features()
    return {
        "version": getattr(llama_cpp, "__version__", None),
        "features": sorted(features),
        "variant": loaded_variant(),
        "variants": variants(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


if __name__ == "__main__":
    print(json.dumps(describe()))
