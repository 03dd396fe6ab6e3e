"""clawbot.json parsing: clear errors naming the key and value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, load_config, parse_config
from app.gateway import Gateway

MODEL = {"id": "m", "backend": "mock:"}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "clawbot.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_repo_config_is_valid() -> None:
    config = load_config(Path(__file__).parents[2] / "clawbot.json", environ={})
    assert config.model_server.port == 8080
    assert config.models[0].backend == "llamacpp:embedded"
    Gateway.from_config(config)  # backends build (the embedded model file is found)


def test_defaults() -> None:
    config = parse_config({"models": [MODEL]})
    assert config.model_server.host == "127.0.0.1"
    assert config.model_server.protocol == "http"
    assert config.auth.token_ttl == 3600
    assert config.logging.level == "INFO"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"models": [MODEL], "modle_server": {}}, "unknown key 'modle_server'"),
        ({"models": [MODEL], "model_server": {"prot": 1}}, "unknown key 'model_server.prot'"),
        (
            {"models": [MODEL], "model_server": {"port": "8080"}},
            "model_server.port: Expected `int`, got `str`",
        ),
        ({"models": [MODEL], "model_server": {"port": 70000}}, "model_server.port"),
        ({"models": [MODEL], "model_server": {"protocol": "ftp"}}, "model_server.protocol"),
        ({"models": [MODEL], "model_server": {"timeout": 0}}, "model_server.timeout"),
        ({"models": [MODEL], "logging": {"level": "LOUD"}}, "logging.level"),
        ({"models": [MODEL], "auth": {"token_ttl": -5}}, "auth.token_ttl"),
        ({"models": [{"backend": "mock:"}]}, "models[0]: Object missing required field `id`"),
        ({"models": [MODEL, {**MODEL, "extra": 1}]}, "unknown key 'models[1].extra'"),
        ({"models": []}, "at least one model"),
        (
            {"models": [MODEL, {"id": "n", "aliases": ["m"], "backend": "mock:"}]},
            "'m' is already used",
        ),
        (
            {"models": [MODEL], "model_server": {"protocol": "https"}},
            "model_server.tls_cert is required",
        ),
        (
            {
                "models": [MODEL],
                "model_server": {
                    "protocol": "https",
                    "tls_cert": "/no/cert.pem",
                    "tls_key": "/no/key",
                },
            },
            "model_server.tls_cert: file not found",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in str(info.value)


def test_invalid_json_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clawbot\.json"):
        load_config(write(tmp_path, "{nope"), environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.json", environ={})


def test_env_overrides_api_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"auth": {"api_key": "from-file"}, "models": [MODEL]})
    assert load_config(path, environ={}).auth.api_key == "from-file"
    assert load_config(path, environ={"CLAWBOT_API_KEY": "from-env"}).auth.api_key == "from-env"


@pytest.mark.parametrize(
    ("backend", "options", "expected"),
    [
        ("nope:x", {}, "unknown backend 'nope:x'"),
        ("no-colon", {}, "unknown backend"),
        ("llamacpp:/no/such/model.gguf", {}, "model file not found: '/no/such/model.gguf'"),
        ("mock:", {"unknown_opt": 1}, "invalid backend options"),
        ("mock:", {"dimensions": "many"}, "options.dimensions"),
        ("http://", {}, "is not an http(s) URL"),
        ("llamacpp:embedded", {"n_threads": 0}, "options.n_threads"),
    ],
)
def test_backend_spec_errors(backend: str, options: dict[str, Any], expected: str) -> None:
    config = parse_config({"models": [{"id": "m", "backend": backend, "options": options}]})
    with pytest.raises(ConfigError) as info:
        Gateway.from_config(config)
    assert expected in str(info.value)
    assert "models[0]" in str(info.value)


def test_bad_rate_limit_storage_is_a_config_error() -> None:
    config = parse_config({"rate_limits": {"storage": "mongodb://x"}, "models": [MODEL]})
    with pytest.raises(ConfigError, match=r"rate_limits\.storage"):
        Gateway.from_config(config)
