"""clawbot.json parsing: clear errors naming the key and value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, load_config, parse_config
from app.core.gateway import Gateway

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
        ({"models": [{"id": "m"}]}, "set exactly one of 'backend', 'deployments' and 'base'"),
        (
            {"models": [{**MODEL, "deployments": [{"backend": "mock:"}]}]},
            "set exactly one of 'backend', 'deployments' and 'base'",
        ),
        (
            {"models": [{"id": "m", "deployments": [{"backend": "mock:"}, {"backend": "mock:"}]}]},
            "models[0].deployments[1]: name 'mock:' is used twice",
        ),
        (
            {"models": [{"id": "m", "deployments": [{"name": "a"}]}]},
            "models[0].deployments[0]: Object missing required field `backend`",
        ),
        (
            {"models": [{**MODEL, "deployments": (), "routing": {"strategy": "random"}}]},
            "models[0].routing.strategy",
        ),
        ({"models": [{**MODEL, "routing": {"retries": -1}}]}, "models[0].routing.retries"),
        ({"models": [{**MODEL, "fallbacks": ["nope"]}]}, "models[0].fallbacks: no model is called"),
        (
            {"models": [{**MODEL, "aliases": ["a"], "context_window_fallbacks": ["a"]}]},
            "models[0].context_window_fallbacks: 'a' is this model itself",
        ),
        (
            {
                "models": [
                    {"id": "m", "deployments": [{"backend": "mock:", "timeouts": {"total_s": 0}}]}
                ]
            },
            "models[0].deployments[0].timeouts.total_s",
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


@pytest.mark.parametrize(
    ("deployment", "expected"),
    [
        ({"backend": "nope:x"}, "models[0].deployments[1].backend: unknown backend 'nope:x'"),
        ({"backend": "mock:", "upstream_model": "x"}, "upstream_model only apply to http(s)"),
        (
            {"backend": "mock:", "timeouts": {"connect_s": 1}},
            "timeouts.connect_s only apply to http(s)",
        ),
        ({"backend": "mock:", "options": {"nope": 1}}, "models[0].deployments[1] (m)"),
    ],
)
def test_deployment_errors_name_the_deployment(deployment: dict[str, Any], expected: str) -> None:
    config = parse_config(
        {"models": [{"id": "m", "deployments": [{"backend": "mock:", "name": "a"}, deployment]}]}
    )
    with pytest.raises(ConfigError) as info:
        Gateway.from_config(config)
    assert expected in str(info.value)


def test_deployment_names_default_to_the_spec_without_credentials() -> None:
    config = parse_config(
        {
            "models": [
                {
                    "id": "m",
                    "deployments": [
                        {"backend": "http://user:secret@10.0.0.1:8000/v1"},
                        {"backend": "mock:", "name": "local"},
                    ],
                }
            ]
        }
    )
    pool = Gateway.from_config(config).models[0].pool
    assert [d.name for d in pool.deployments] == ["http://10.0.0.1:8000/v1", "local"]
    assert "secret" not in repr(pool.snapshot())


def test_bad_rate_limit_storage_is_a_config_error() -> None:
    config = parse_config({"rate_limits": {"storage": "mongodb://x"}, "models": [MODEL]})
    with pytest.raises(ConfigError, match=r"rate_limits\.storage"):
        Gateway.from_config(config)
