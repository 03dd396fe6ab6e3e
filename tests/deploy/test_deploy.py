"""deploy/ cannot be run here (no Docker daemon, no systemd to boot), so its files are checked
against the code they start: the commands must parse with clawbot's own CLI, the Dockerfile must
copy every package pyproject.toml ships, and the paths must agree with the sample config."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from app.config import load_config
from app.ops.cli import _parser, main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG_PATH = "/etc/clawbot/clawbot.json"
DATA_DIR = "/var/lib/clawbot"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def unit() -> dict[str, dict[str, list[str]]]:
    """deploy/clawbot.service as {section: {key: [values]}} (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in (DEPLOY / "clawbot.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        assert current is not None, f"outside a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def only(instructions: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in instructions if kw == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def serve_args(argv: list[str]) -> dict[str, object]:
    """What clawbot's own parser makes of `argv` (everything after the program)."""
    parser, _ = _parser()
    args = parser.parse_args(argv)
    assert args.command == "serve"
    return vars(args)


def test_dockerfile_cmd_is_clawbot_serve_on_the_exposed_port() -> None:
    stage = final_stage()
    argv = json.loads(only(stage, "CMD"))  # exec form: SIGTERM reaches clawbot itself
    assert argv[0] == "clawbot"
    args = serve_args(argv[1:])
    assert args["config"] == CONFIG_PATH
    assert args["host"] == "0.0.0.0"  # loopback inside a container is unreachable from outside
    assert only(stage, "EXPOSE") == str(args["port"])
    healthcheck = only(stage, "HEALTHCHECK")
    assert f"http://127.0.0.1:{args['port']}/health" in healthcheck
    assert json.loads(healthcheck.partition(" CMD ")[2])[0] == "python"


def test_dockerfile_runs_unprivileged_with_a_data_volume() -> None:
    instructions = dockerfile()
    assert [args for kw, args in instructions if kw == "FROM"] == [
        "python:3.11-slim AS build",
        "python:3.11-slim",
    ]
    stage = final_stage()
    assert only(stage, "USER") not in ("root", "0")
    assert json.loads(only(stage, "VOLUME")) == [DATA_DIR]
    build = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "build-essential" in build
    assert "cmake" in build
    assert "pip install --no-cache-dir --no-deps ." in build


def test_dockerfile_installs_the_lock_and_the_portable_llama_build() -> None:
    runs = [args for kw, args in dockerfile() if kw == "RUN"]
    llama = next(i for i, run in enumerate(runs) if "deploy/llama_wheel.py" in run)
    locked = next(i for i, run in enumerate(runs) if "-r requirements.txt" in run)
    assert "--lock requirements.txt --install /opt/clawbot/bin/python" in runs[llama]
    assert "CMAKE_ARGS" not in runs[llama], "the image must take the portable default"
    assert "--require-hashes --no-deps" in runs[locked]
    assert llama < locked, "the lock must find the portable llama-cpp-python installed"


def test_dockerfile_copies_every_package_pyproject_ships() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied: set[str] = set()
    for keyword, args in dockerfile():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            copied.add(source)
    assert packages <= copied
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not copied & set(ignored)


def test_unit_starts_clawbot_serve_and_reloads_with_sighup() -> None:
    service = unit()["Service"]
    [exec_start] = service["ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert Path(program).name == "clawbot"
    assert Path(program).is_absolute()
    assert serve_args(argv)["config"] == CONFIG_PATH
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["User"] != ["root"]
    assert service["LimitNOFILE"]


def test_unit_hardening_leaves_only_the_data_dir_writable() -> None:
    service = unit()["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == [value], key
    assert service["ReadWritePaths"] == [DATA_DIR]
    assert service["StateDirectory"] == [Path(DATA_DIR).name]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_does_not_restart_on_config_errors(tmp_path: Path) -> None:
    [status] = unit()["Service"]["RestartPreventExitStatus"]
    assert main(["serve", "--config", str(tmp_path / "missing.json")]) == int(status)


def test_sample_config_keeps_its_database_in_the_data_dir() -> None:
    config = load_config(DEPLOY / "clawbot.json", environ={"CLAWBOT_API_KEY": "sk-x"})
    database = config.database.url.partition(":///")[2]
    assert Path(database).parent == Path(DATA_DIR)
    assert config.model_server.port == 8080
    assert config.auth.api_key == "sk-x"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    copy = tmp_path / "clawbot.service"
    copy.write_text((DEPLOY / "clawbot.service").read_text())
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable" not in line  # clawbot is not installed here
    ]
    assert not problems
