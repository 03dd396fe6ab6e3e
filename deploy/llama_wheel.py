"""Build llama-cpp-python once, portably, and keep the wheel: prints the wheel's path.

    python deploy/llama_wheel.py --lock requirements.txt [--install PYTHON]

The version and the sdist's hashes come from the lock file. The default build runs on every
x86-64 CPU: ggml's CPU backend is compiled once per instruction-set level (GGML_BACKEND_DL with
GGML_CPU_ALL_VARIANTS, as llama.cpp's own releases are) and the best level the CPU has is chosen
when the library loads (backends/llamacpp/runtime.py). `-march=native` is never used: a wheel must
not depend on the machine that compiled it.

The AMX level (`sapphirerapids`) is left out of the wheel: its kernels segfault in
`ggml_backend_amx_mul_mat` on AMX Xeons (ggml-org/llama.cpp#20824, still open), and the level
below it (AVX-512 with VNNI and BF16) decodes as fast on them. Every library in the wheel is then
disassembled and the build fails if any AMX instruction is left.

Wheels are kept in `$CLAWBOT_WHEEL_CACHE` (default `~/.cache/clawbot/wheels`), under a key of
the version, the sdist hashes, the CMake arguments and this recipe. pip's own wheel cache is not
used: it keys a built wheel by the sdist alone, so a wheel built with other `CMAKE_ARGS` (a
native one, say) would be installed again.

`CLAWBOT_LLAMA_CMAKE_ARGS` replaces the CMake arguments (for a GPU build, for instance); the
key follows them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "llama-cpp-python"
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
CRASHING_VARIANTS = frozenset({"sapphirerapids"})
"""ggml CPU variants left out of the wheel: they carry the AMX kernels."""
RECIPE = "2"
"""Part of the cache key: bump it when the way the wheel is made changes."""

_AMX_MNEMONICS = re.compile(
    r"\s(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tdpb[su][su]d|tdpbf16ps)\b"
)
_VARIANT = re.compile(r"libggml-cpu-(?P<name>[\w.]+)\.so$")


def pinned(lock: Path) -> tuple[str, list[str]]:
    """The locked version of llama-cpp-python and its `--hash=sha256:…` values."""
    text = lock.read_text().replace("\\\n", " ")
    match = re.search(rf"^{re.escape(PACKAGE)}==(\S+)(.*)$", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"{lock} pins no {PACKAGE}")
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", match.group(2))
    if not hashes:
        raise SystemExit(f"{lock} has no hashes for {PACKAGE}")
    return match.group(1), sorted(hashes)


def cache_root() -> Path:
    """Where built wheels are kept."""
    if override := os.environ.get("CLAWBOT_WHEEL_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clawbot" / "wheels"


def cache_key(version: str, hashes: list[str], cmake_args: str, keep_amx: bool) -> str:
    """Names one build: same key, same wheel. A native build is keyed by this CPU too."""
    material = [PACKAGE, version, *hashes, cmake_args, RECIPE, str(keep_amx)]
    if _native(cmake_args):
        material.append(Path("/proc/cpuinfo").read_text().partition("flags")[2].split("\n")[0])
    return hashlib.sha256("\n".join(material).encode()).hexdigest()[:16]


def _native(cmake_args: str) -> bool:
    return re.search(r"GGML_NATIVE=(ON|1|TRUE)", cmake_args, re.IGNORECASE) is not None


def build(
    python: str, version: str, hashes: list[str], cmake_args: str, into: Path, keep_amx: bool
) -> Path:
    """Download the locked sdist (hash-checked), build it, make it portable; the wheel's path."""
    with tempfile.TemporaryDirectory(prefix="clawbot-llama-") as tmp:
        work = Path(tmp)
        requirement = work / "requirement.txt"
        requirement.write_text(
            f"{PACKAGE}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n"
        )
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "download", "--quiet", "--no-deps", "--no-binary", PACKAGE,
             "--require-hashes", "-r", str(requirement), "-d", str(work / "sdist")],
            check=True,
        )  # fmt: skip
        (sdist,) = (work / "sdist").iterdir()
        env = {
            **os.environ,
            "CMAKE_ARGS": cmake_args,
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
        }
        print(f"building {PACKAGE} {version} with CMAKE_ARGS={cmake_args!r}", file=sys.stderr)
        subprocess.run(
            [*pip, "wheel", "--quiet", "--no-deps", "--no-cache-dir", "-w", str(work / "wheel"),
             str(sdist)],
            check=True,
            env=env,
        )  # fmt: skip
        (wheel,) = (work / "wheel").glob("*.whl")
        portable = work / "out" / wheel.name
        portable.parent.mkdir()
        repack(wheel, portable, keep_amx)
        if not keep_amx:
            forbid_amx(portable)
        staged = into.with_name(into.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        shutil.move(portable, staged / portable.name)
        shutil.rmtree(into, ignore_errors=True)
        staged.rename(into)  # whole or not at all: an interrupted build leaves no wheel behind
        return into / portable.name


def repack(source: Path, target: Path, keep_amx: bool = False) -> None:
    """Copy the wheel, moving ggml's CPU variants beside libllama and dropping the crashing ones.

    ggml installs the variants into `bin/` at the top of site-packages, where nothing looks.
    """
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        record_name = next(n for n in old.namelist() if n.endswith(".dist-info/RECORD"))
        for info in old.infolist():
            name = info.filename
            if name == record_name:
                continue
            variant = _VARIANT.search(name)
            if variant is not None and name.startswith("bin/"):
                if variant.group("name") in CRASHING_VARIANTS and not keep_amx:
                    print(f"left out {name} (AMX)", file=sys.stderr)
                    continue
                name = "llama_cpp/lib/" + Path(name).name
            data = old.read(info)
            entry = zipfile.ZipInfo(name, date_time=info.date_time)
            entry.external_attr = info.external_attr
            entry.compress_type = zipfile.ZIP_DEFLATED
            new.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append((name, f"sha256={digest.decode()}", str(len(data))))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((record_name, "", ""))
        new.writestr(record_name, out.getvalue())


def forbid_amx(wheel: Path) -> None:
    """Fail if any shared library in `wheel` contains an AMX instruction."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump (binutils) is needed to check the build for AMX instructions")
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not re.search(r"\.so(\.\d+)*$", name):
                continue
            digest = hashlib.sha256(archive.read(name)).hexdigest()
            if digest in seen:  # the wheel holds each library up to six times
                continue
            seen.add(digest)
            path = Path(archive.extract(name, tmp))
            listing = subprocess.run(
                [objdump, "-d", "--no-show-raw-insn", str(path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            if found := _AMX_MNEMONICS.search(listing):
                raise SystemExit(
                    f"{name} contains the AMX instruction {found.group(1)}: not portable"
                )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build at a time per cache entry (two `make` runs may start together)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lock", type=Path, required=True, help="the lock file pinning the version"
    )
    parser.add_argument(
        "--install", metavar="PYTHON", help="also install the wheel into this interpreter's env"
    )
    parser.add_argument(
        "--keep-amx",
        action="store_true",
        help="keep AMX kernels (bench/llama_builds.py measures such builds; never install one)",
    )
    args = parser.parse_args()
    if args.keep_amx and args.install:
        parser.error("--keep-amx builds are for measurements, not for --install")
    version, hashes = pinned(args.lock)
    cmake_args = os.environ.get("CLAWBOT_LLAMA_CMAKE_ARGS", PORTABLE_CMAKE_ARGS)
    if _native(cmake_args):
        print("warning: GGML_NATIVE=ON builds for this CPU only", file=sys.stderr)
    key = cache_key(version, hashes, cmake_args, args.keep_amx)
    entry = cache_root() / f"{PACKAGE}-{version}-{key}"
    with _lock(entry.with_name(entry.name + ".lock")):
        wheels = sorted(entry.glob("*.whl"))
        wheel = (
            wheels[0]
            if wheels
            else build(sys.executable, version, hashes, cmake_args, entry, args.keep_amx)
        )
    if args.install:
        subprocess.run(
            [args.install, "-m", "pip", "install", "-qq", "--disable-pip-version-check",
             "--no-deps", "--force-reinstall", str(wheel)],
            check=True,
        )  # fmt: skip
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
