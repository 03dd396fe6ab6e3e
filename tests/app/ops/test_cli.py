"""The clawbot command line: serve's start-up checks, check, and the banner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, parse_config
from app.ops.cli import banner, bind_socket, main
from tests.serving import serve


def write_config(tmp_path: Path, **server: object) -> Path:
    path = tmp_path / "clawbot.json"
    path.write_text(
        json.dumps({"model_server": server, "models": [{"id": "m", "backend": "mock:"}]})
    )
    return path


def test_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"model_server.port: {port} is already in use"):
            bind_socket("127.0.0.1", port)


def test_serve_refuses_public_bind_without_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, host="0.0.0.0")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err


def test_serve_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clawbot.json"
    path.write_text(json.dumps({"models": [{"id": "m", "backend": "mock:"}], "typo": 1}))
    assert main(["serve", "--config", str(path)]) == 2
    assert "unknown key 'typo'" in capsys.readouterr().err


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(write_config(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clawbot.json"
    path.write_text(
        json.dumps({"models": [{"id": "m", "backend": "mock:", "options": {"healthy": False}}]})
    )
    assert main(["check", "--config", str(path)]) == 1
    assert "FAIL m" in capsys.readouterr().err


def test_banner_tells_how_to_call() -> None:
    config = parse_config(
        {
            "auth": {"api_key": "sk-secret-123"},
            "models": [{"id": "m", "aliases": ["a"], "backend": "mock:"}],
        }
    )
    text = banner(config, "127.0.0.1", 9000)
    assert text.splitlines()[0] == "clawbot 0.1.0 serving on http://127.0.0.1:9000/v1"
    assert "m (aliases: a)" in text
    assert "curl http://127.0.0.1:9000/v1/chat/completions" in text
    assert "Authorization: Bearer $CLAWBOT_API_KEY" in text
    assert 'OpenAI(base_url="http://127.0.0.1:9000/v1"' in text
    assert "sk-secret-123" not in text
    assert "# first: export CLAWBOT_API_KEY=<auth.api_key of clawbot.json>" in text


def pasted(banner_text: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The banner's examples run as a user pasting them into bash would."""
    lines = banner_text.splitlines()
    start = lines.index("try it:") + 1
    end = next(i for i, line in enumerate(lines) if " -c 'import os; from openai" in line)
    script = "\n".join(lines[start : end + 1])
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.slow
@pytest.mark.parametrize("key", ["sk-pasted-key-1", None])
def test_banner_examples_work_when_pasted(tmp_path: Path, key: str | None) -> None:
    """With a master key (from the environment) and without one: the curl and the Python
    line both get the model's answer."""
    config: dict[str, object] = {
        "models": [{"id": "m", "backend": "mock:", "options": {"reply": "pasted-ok"}}]
    }
    env = {k: v for k, v in os.environ.items() if k != "CLAWBOT_API_KEY"}
    if key is not None:
        env["CLAWBOT_API_KEY"] = key
    with serve(config, tmp_path, env=env) as running:
        text = running.log()
        out = pasted(text[text.index("clawbot ") :], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("pasted-ok") == 2, out.stdout  # curl's JSON, then the SDK's text
    assert (key or "sk-") not in text


def test_python_m_app_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "clawbot 0.1.0"
