"""deploy/llama_wheel.py: the locked version, the cache key, and the wheel made portable."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_wheel", ROOT / "deploy" / "llama_wheel.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()
HASH = "ab" * 32


def test_the_version_and_hashes_come_from_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "httpx==0.28.1 \\\n    --hash=sha256:" + "cd" * 32 + "\n"
        f"llama-cpp-python==0.3.36 \\\n    --hash=sha256:{HASH}\n    # via clawbot\n"
    )
    assert recipe.pinned(lock) == ("0.3.36", [HASH])
    assert (
        recipe.pinned(ROOT / "requirements.txt")[0]
        == recipe.pinned(ROOT / "requirements-dev.txt")[0]
    )
    lock.write_text("httpx==0.28.1\n")
    with pytest.raises(SystemExit, match="pins no llama-cpp-python"):
        recipe.pinned(lock)


def test_the_cache_key_follows_every_input() -> None:
    key = recipe.cache_key("0.3.36", [HASH], recipe.PORTABLE_CMAKE_ARGS, False)
    assert key == recipe.cache_key("0.3.36", [HASH], recipe.PORTABLE_CMAKE_ARGS, False)
    others = {
        recipe.cache_key("0.3.35", [HASH], recipe.PORTABLE_CMAKE_ARGS, False),
        recipe.cache_key("0.3.36", ["cd" * 32], recipe.PORTABLE_CMAKE_ARGS, False),
        recipe.cache_key("0.3.36", [HASH], "-DGGML_CUDA=ON", False),
        recipe.cache_key("0.3.36", [HASH], recipe.PORTABLE_CMAKE_ARGS, True),
    }
    assert key not in others
    assert len(others) == 4


def test_the_default_build_is_portable() -> None:
    args = recipe.PORTABLE_CMAKE_ARGS.split()
    assert "-DGGML_NATIVE=OFF" in args
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(args)
    assert "sapphirerapids" in recipe.CRASHING_VARIANTS


def fake_wheel(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("llama_cpp_python-0.3.36.dist-info/RECORD", "stale,,\n")


def test_repack_moves_the_levels_beside_libllama_and_drops_amx(tmp_path: Path) -> None:
    source, target = tmp_path / "in.whl", tmp_path / "out.whl"
    fake_wheel(
        source,
        {
            "llama_cpp/__init__.py": b"",
            "llama_cpp/lib/libllama.so": b"llama",
            "bin/libggml-cpu-haswell.so": b"avx2",
            "bin/libggml-cpu-sapphirerapids.so": b"amx",
        },
    )
    recipe.repack(source, target)
    with zipfile.ZipFile(target) as wheel:
        names = set(wheel.namelist())
        record = list(
            csv.reader(io.StringIO(wheel.read(next(n for n in names if "RECORD" in n)).decode()))
        )
        assert wheel.read("llama_cpp/lib/libggml-cpu-haswell.so") == b"avx2"
    assert names == {
        "llama_cpp/__init__.py",
        "llama_cpp/lib/libllama.so",
        "llama_cpp/lib/libggml-cpu-haswell.so",
        "llama_cpp_python-0.3.36.dist-info/RECORD",
    }
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"avx2").digest()).rstrip(b"=").decode()
    assert ["llama_cpp/lib/libggml-cpu-haswell.so", f"sha256={digest}", "4"] in record
    assert record[-1] == ["llama_cpp_python-0.3.36.dist-info/RECORD", "", ""]
    recipe.repack(source, target, keep_amx=True)
    with zipfile.ZipFile(target) as wheel:
        assert "llama_cpp/lib/libggml-cpu-sapphirerapids.so" in wheel.namelist()


AMX_SOURCE = """
#include <immintrin.h>
void configure(const void *config) { _tile_loadconfig(config); }
"""
PLAIN_SOURCE = "int add(int a, int b) { return a + b; }\n"


def shared_library(tmp_path: Path, name: str, source: str, *flags: str) -> bytes:
    c, so = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    c.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", *flags, "-o", str(so), str(c)], check=True)
    return so.read_bytes()


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("objdump"), reason="no gcc")
def test_a_library_with_an_amx_instruction_fails_the_build(tmp_path: Path) -> None:
    plain = shared_library(tmp_path, "plain", PLAIN_SOURCE)
    amx = shared_library(tmp_path, "amx", AMX_SOURCE, "-mamx-tile")
    clean, dirty = tmp_path / "clean.whl", tmp_path / "dirty.whl"
    fake_wheel(clean, {"llama_cpp/lib/libggml-cpu-x64.so": plain})
    fake_wheel(dirty, {"llama_cpp/lib/libggml-cpu-x64.so": plain, "lib/libggml-cpu.so.0": amx})
    recipe.forbid_amx(clean)
    with pytest.raises(SystemExit, match=r"lib/libggml-cpu\.so\.0 contains the AMX instruction"):
        recipe.forbid_amx(dirty)
