"""`clawbot check` on the llama.cpp build: the CPU's instruction sets against the build's."""

from __future__ import annotations

import json
import signal

import pytest

from app.ops.llama_build import _judge, check_llama_build

AVX2_CPU = frozenset({"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"})
AMX_CPU = AVX2_CPU | {"AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"}


def report(features: set[str], variant: str | None = "haswell", **extra: object) -> bytes:
    build = {
        "version": "0.3.36",
        "features": sorted(features | {"OPENMP", "REPACK"}),
        "variant": variant,
        "variants": ["x64", "haswell", "skylakex"] if variant else [],
        "system_info": "",
        **extra,
    }
    return json.dumps(build).encode()


def test_a_portable_build_on_its_level_passes() -> None:
    check = _judge(AVX2_CPU, 0, report(set(AVX2_CPU)), b"")
    assert check.ok
    assert check.message == (
        "llama-cpp-python 0.3.36, CPU backend: haswell level of 3, "
        "SSE3 SSSE3 AVX AVX2 F16C FMA BMI2"
    )
    assert check.note is None


def test_a_build_using_what_the_cpu_lacks_fails_with_the_fix() -> None:
    check = _judge(AVX2_CPU, 0, report(AVX2_CPU | {"AVX512"}, variant=None), b"")
    assert not check.ok
    assert check.problem == "llama_build_cpu_mismatch"
    assert "this CPU lacks AVX512" in check.message
    assert check.fix is not None
    assert "make llama" in check.fix
    assert "-DGGML_NATIVE=OFF" in check.fix


def test_an_amx_build_fails_as_known_to_crash() -> None:
    check = _judge(AMX_CPU, 0, report(set(AMX_CPU), variant=None), b"")
    assert not check.ok
    assert check.problem == "llama_build_amx"
    assert "AMX_INT8 is known to crash" in check.message
    assert "ggml_backend_amx_mul_mat" in check.message


def test_a_build_that_kills_its_loader_is_reported_by_signal() -> None:
    check = _judge(AVX2_CPU, -signal.SIGILL, b"", b"")
    assert not check.ok
    assert check.problem == "llama_build_broken"
    assert "killed by SIGILL" in check.message
    check = _judge(AVX2_CPU, 1, b"", b"Traceback ...\nOSError: libllama.so: cannot open\n")
    assert "OSError: libllama.so: cannot open" in check.message


def test_a_fixed_level_build_passes_with_a_note() -> None:
    check = _judge(AVX2_CPU, 0, report({"AVX", "AVX2"}, variant=None), b"")
    assert check.ok
    assert "one fixed level" in check.message
    assert check.note is not None
    assert "portable build" in check.note


@pytest.mark.slow
async def test_this_machine_and_its_build() -> None:
    cpu, build = await check_llama_build()
    assert cpu.target == "cpu"
    assert "AVX2" in cpu.message
    assert build.target == "llama.cpp"
    assert build.ok, build.line()
    assert "level of" in build.message
    assert "AMX" not in build.message
