"""The lock files: hash-pinned, within pyproject.toml's ranges, and what this venv has installed.

`make test` installs requirements-dev.txt and then runs these, so a pyproject.toml edited
without `make lock` fails here instead of testing something other than what is locked.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME, DEV = ROOT / "requirements.txt", ROOT / "requirements-dev.txt"


class Pin:
    """One `name==version [; marker]` entry of a lock, with its hashes."""

    def __init__(self, text: str) -> None:
        spec, *hashes = text.split("--hash=")
        self.requirement = Requirement(spec.strip())
        self.name = canonicalize_name(self.requirement.name)
        (specifier,) = self.requirement.specifier
        assert specifier.operator == "==", text
        self.version = specifier.version
        self.hashes = [h.strip() for h in hashes]

    def applies(self) -> bool:
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


def pins(lock: Path) -> dict[str, Pin]:
    """The lock's entries that apply to this interpreter, by normalized name."""
    text = lock.read_text().replace("\\\n", " ")
    entries = [Pin(line) for line in text.splitlines() if re.match(r"[A-Za-z0-9]", line)]
    applying = [pin for pin in entries if pin.applies()]
    assert len({pin.name for pin in applying}) == len(applying), "a name pinned twice"
    return {pin.name: pin for pin in applying}


def declared() -> tuple[list[Requirement], list[Requirement]]:
    """pyproject.toml's runtime requirements, and those of its dev and bench extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    return runtime, [Requirement(r) for r in extras["dev"] + extras["bench"]]


def unsatisfied(requirements: list[Requirement], lock: dict[str, Pin]) -> list[str]:
    problems = []
    for requirement in requirements:
        pin = lock.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is not locked")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} but {pin.name}=={pin.version} is locked")
    return problems


def test_the_locks_satisfy_pyproject() -> None:
    runtime, dev = declared()
    problems = unsatisfied(runtime, pins(RUNTIME)) + unsatisfied(runtime + dev, pins(DEV))
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_a_range_the_lock_misses_is_reported() -> None:
    lock = pins(DEV)
    locked = lock["litestar"].version
    problems = unsatisfied([Requirement(f"litestar>{locked}"), Requirement("left-pad>=1")], lock)
    assert problems == [
        f"litestar>{locked} but litestar=={locked} is locked",
        "left-pad>=1 is not locked",
    ]


@pytest.mark.parametrize("lock", [RUNTIME, DEV], ids=["runtime", "dev"])
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    text = lock.read_text().replace("\\\n", " ")
    entries = [Pin(line) for line in text.splitlines() if re.match(r"[A-Za-z0-9]", line)]
    assert entries
    for pin in entries:
        assert pin.hashes, f"{pin.name} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin.name


def test_runtime_and_dev_pin_the_same_versions() -> None:
    runtime, dev = pins(RUNTIME), pins(DEV)
    differ = [
        f"{name}: {pin.version} vs {dev[name].version}"
        for name, pin in runtime.items()
        if name not in dev or dev[name].version != pin.version
    ]
    assert not differ


def test_this_environment_is_the_dev_lock() -> None:
    drift = []
    for name, pin in pins(DEV).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            drift.append(f"{name} is not installed")
            continue
        if installed != pin.version:
            drift.append(f"{name} {installed} installed, {pin.version} locked")
    assert not drift, "reinstall with `make test` (or `make lock`): " + "; ".join(drift)
