"""The llama.cpp library as installed: a portable build, no AMX, and the embedded model answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backends.llamacpp.runtime import AMX, CPU_FLAGS, cpu_features

XEON_FLAGS = (
    "flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c bmi2 avx2 avx512f avx512dq "
    "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni\n"
)

# A child process: a build this CPU cannot run must fail the test, not kill the test session.
ANSWER = """
import json, logging
from backends.llamacpp.runtime import load_cpu_backend
load_cpu_backend()
import llama_cpp
from backends.llamacpp.backend import embedded_model_path
llm = llama_cpp.Llama(model_path=str(embedded_model_path()), n_ctx=512, verbose=False)
reply = llm.create_chat_completion(
    [{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0, seed=1
)
print(json.dumps(reply["choices"][0]["message"]))
"""


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_cpu_features_by_ggml_names() -> None:
    features = cpu_features(XEON_FLAGS)
    assert features == {
        "SSE3",
        "SSSE3",
        "AVX",
        "AVX_VNNI",
        "AVX2",
        "F16C",
        "FMA",
        "BMI2",
        "AVX512",
        "AVX512_VNNI",
        "AVX512_BF16",
        "AMX_INT8",
    }
    assert cpu_features("processor\t: 0\n") == frozenset()
    assert cpu_features() <= CPU_FLAGS.keys()


@pytest.mark.slow
def test_the_installed_build_is_portable_and_never_amx() -> None:
    child = run_child("import json; from backends.llamacpp.runtime import describe; "
                      "print(json.dumps(describe()))")  # fmt: skip
    assert child.returncode == 0, child.stderr
    build = json.loads(child.stdout.splitlines()[-1])
    features = set(build["features"])
    assert "AMX_INT8 = 1" not in build["system_info"]
    assert not features & AMX
    assert "sapphirerapids" not in build["variants"]
    assert {"x64", "haswell", "skylakex"} <= set(build["variants"]), "every x86-64 level"
    assert build["variant"] in build["variants"]
    assert features & CPU_FLAGS.keys() <= cpu_features(), "only what this CPU has"


@pytest.mark.slow
def test_the_embedded_model_answers_on_this_build() -> None:
    child = run_child(ANSWER)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    message = json.loads(child.stdout.splitlines()[-1])
    assert message["role"] == "assistant"
    assert message["content"].strip()


@pytest.mark.slow
def test_a_haswell_level_alone_serves_too() -> None:
    """What an AVX2-only server loads: the same wheel, held to that level."""
    code = ANSWER.replace("load_cpu_backend()", "load_cpu_backend('haswell')").replace(
        "print(json.dumps(",
        "from backends.llamacpp.runtime import build_features\n"
        "assert 'AVX512' not in build_features(), build_features()\nprint(json.dumps(",
    )
    child = run_child(code)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert json.loads(child.stdout.splitlines()[-1])["content"].strip()
