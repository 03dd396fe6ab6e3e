"""Plugins through the real entry-point machinery: the sample plugin in tests/plugins/sample is
found by importlib.metadata from its hand-written dist-info, in-process and in a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.app import create_app
from app.config import ConfigError, parse_config
from app.core.gateway import Gateway
from backends.registry import PluginBackendFactory, backend_factories
from policies.plugins import available_plugins, load_plugin_policies
from tests.conftest import AUTH, MASTER_KEY, AppClient
from tests.serving import serve

SAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "sample"
BROKEN_MODULE = "clawbot_broken_plugin"
CHAT = {"model": "parrot", "messages": [{"role": "user", "content": "hello there"}]}


def config_of(
    plugins: list[str] | None = None,
    options: dict[str, Any] | None = None,
    models: list[dict[str, Any]] | None = None,
    api_key: str = MASTER_KEY,
) -> Any:
    return parse_config(
        {
            "auth": {"api_key": api_key},
            "database": {"url": "sqlite+aiosqlite://"},
            "policies": {"plugins": plugins or [], "plugin_options": options or {}},
            "models": models or [{"id": "parrot", "backend": "sample:parrot"}],
        }
    )


@pytest.fixture
def sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample plugin installed: its folder on sys.path, as PYTHONPATH puts it."""
    monkeypatch.syspath_prepend(str(SAMPLE))


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A distribution of plugins that fail in every way they can, installed the same way."""
    (tmp_path / f"{BROKEN_MODULE}.py").write_text(
        textwrap.dedent(
            '''
            """Plugins that fail."""

            NOT_CALLABLE = 42


            def boom(*args):
                raise RuntimeError("boom")


            class SyncCheck:
                name = "sync"

                def __init__(self, options, config):
                    pass

                def check(self, ctx):
                    pass


            class NotABackend:
                def __init__(self, spec):
                    pass

                async def chat(self, req):
                    pass
            '''
        )
    )
    dist = tmp_path / "clawbot_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: clawbot-broken-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            f"""
            [clawbot.policies]
            missing = clawbot_no_such_module:Policy
            raises = {BROKEN_MODULE}:boom
            not_callable = {BROKEN_MODULE}:NOT_CALLABLE
            sync_check = {BROKEN_MODULE}:SyncCheck

            [clawbot.backends]
            missing = clawbot_no_such_module:Backend
            raises = {BROKEN_MODULE}:boom
            half = {BROKEN_MODULE}:NotABackend
            mock = clawbot_no_such_module:Backend
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(BROKEN_MODULE, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(client: Any, **fields: Any) -> dict[str, Any]:
    r = await client.post("/admin/keys", json={"name": "t", **fields}, headers=AUTH)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.usefixtures("sample")
def test_sample_plugin_is_found_through_its_entry_points() -> None:
    ep = available_plugins()["sample_tenant"]
    assert ep.value == "clawbot_sample_plugin.tenant:TenantPolicy"
    assert ep.dist is not None
    assert ep.dist.name == "clawbot-sample-plugin"
    factory = backend_factories()["sample"]
    assert isinstance(factory, PluginBackendFactory)
    [policy] = load_plugin_policies(config_of(["sample_tenant"]))
    assert policy.name == "sample_tenant"


def test_without_the_plugin_nothing_is_found() -> None:
    assert "sample_tenant" not in available_plugins()
    assert "sample" not in backend_factories()
    with pytest.raises(ConfigError, match="unknown backend 'sample:parrot'"):
        Gateway.from_config(config_of())


@pytest.mark.usefixtures("sample")
async def test_tenant_policy_and_echo_backend_in_process() -> None:
    config = config_of(["sample_tenant"], {"sample_tenant": {"tenants": ["acme"]}})
    gateway = Gateway.from_config(config)
    assert [p.name for p in gateway.policies][-2:] == ["sample_tenant", "rate_limit"]
    async with AppClient(create_app(gateway)) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)  # master key
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "[parrot] hello there"

        nobody = bearer((await new_key(client))["key"])
        r = await client.post("/v1/chat/completions", json=CHAT, headers=nobody)
        assert r.status_code == 403
        assert r.json() == {
            "error": {
                "message": "this API key names no tenant: set metadata.tenant on it",
                "type": "permission_error",
                "param": None,
                "code": "tenant_required",
            }
        }
        globex = bearer((await new_key(client, metadata={"tenant": "globex"}))["key"])
        r = await client.post("/v1/chat/completions", json=CHAT, headers=globex)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "tenant_not_allowed"

        acme = bearer((await new_key(client, metadata={"tenant": "acme"}))["key"])
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=acme)
        assert r.status_code == 200
        pieces = [
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in r.text.splitlines()
            if line.startswith("data: {")
        ]
        assert "".join(pieces) == "[parrot] hello there"
        r = await client.post(
            "/v1/completions", json={"model": "parrot", "prompt": "hi"}, headers=acme
        )
        assert r.json()["choices"][0]["text"] == "[parrot] hi"
        r = await client.post(
            "/v1/embeddings", json={"model": "parrot", "input": "hi"}, headers=acme
        )
        assert r.status_code == 400  # the plugin says it does not embed


@pytest.mark.usefixtures("sample")
async def test_a_plugin_refusal_holds_no_rate_limit_slot() -> None:
    gateway = Gateway.from_config(config_of(["sample_tenant"]))
    async with AppClient(create_app(gateway)) as client:
        created = await new_key(client, max_parallel=1)
        key = bearer(created["key"])
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=key)
            assert r.json()["error"]["code"] == "tenant_required"
        r = await client.patch(
            f"/admin/keys/{created['id']}", json={"metadata": {"tenant": "acme"}}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=key)
            assert r.status_code == 200, r.text


@pytest.mark.usefixtures("sample")
@pytest.mark.parametrize(
    ("plugins", "options", "api_key", "message"),
    [
        (
            ["nope"],
            {},
            MASTER_KEY,
            r"no policy plugin is called 'nope' \(installed: .*sample_tenant",
        ),
        (["sample_tenant", "sample_tenant"], {}, MASTER_KEY, "'sample_tenant' is listed twice"),
        ([], {"sample_tenant": {}}, MASTER_KEY, "plugin_options: 'sample_tenant' is not enabled"),
        (
            ["sample_tenant"],
            {"sample_tenant": {"tenant": ["acme"]}},
            MASTER_KEY,
            r"policies\.plugin_options\.sample_tenant: Object contains unknown field `tenant`",
        ),
        (
            ["sample_tenant"],
            {},
            "",
            r"policies\.plugin_options\.sample_tenant: sample_tenant needs auth\.api_key",
        ),
    ],
)
def test_policy_config_errors(
    plugins: list[str], options: dict[str, Any], api_key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Gateway.from_config(config_of(plugins, options, api_key=api_key))


@pytest.mark.usefixtures("broken")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "missing",
            r"plugin 'missing' \(clawbot_no_such_module:Policy from clawbot-broken-plugin 0\.1\) "
            r"failed to load: ModuleNotFoundError: No module named 'clawbot_no_such_module'",
        ),
        ("raises", r"plugin 'raises' .* failed to start: RuntimeError: boom"),
        ("not_callable", r"plugin 'not_callable' .* is a int, not a policy factory"),
        ("sync_check", r"plugin 'sync_check' .* returned a SyncCheck, not a policy"),
    ],
)
def test_broken_policy_plugins_are_config_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^policies\.plugins: {message}"):
        Gateway.from_config(config_of([name], models=[{"id": "m", "backend": "mock:"}]))


@pytest.mark.usefixtures("broken")
@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (
            "missing",
            r"backend plugin 'missing' \(clawbot_no_such_module:Backend from "
            r"clawbot-broken-plugin 0\.1\) failed to load: ModuleNotFoundError",
        ),
        ("raises", r"backend plugin 'raises' .* failed to start: RuntimeError: boom"),
        (
            "half",
            r"backend plugin 'half' .* returned a NotABackend, which lacks the Backend members "
            "capabilities, start, stream_chat, complete, stream_complete, embed, health, aclose$",
        ),
    ],
)
def test_broken_backend_plugins_are_config_errors(scheme: str, message: str) -> None:
    models = [{"id": "ok", "backend": "mock:"}, {"id": "m", "backend": f"{scheme}:x"}]
    with pytest.raises(ConfigError, match=rf"^models\[1\] \(m\): {message}"):
        Gateway.from_config(config_of(models=models))


@pytest.mark.usefixtures("broken")
def test_broken_backend_plugins_only_fail_the_models_using_them() -> None:
    # `mock` is also registered by the broken distribution: built-in schemes are not taken over
    gateway = Gateway.from_config(config_of(models=[{"id": "m", "backend": "mock:"}]))
    assert type(gateway.models[0].backends[0]).__name__ == "MockBackend"


@pytest.mark.usefixtures("sample")
def test_plugin_backend_options_are_validated() -> None:
    models = [{"id": "p", "backend": "sample:", "options": {"loud": True}}]
    with pytest.raises(ConfigError, match=r"^models\[0\] \(p\): invalid backend options"):
        Gateway.from_config(config_of(models=models))


def sample_env() -> dict[str, str]:
    paths = [str(SAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.slow
async def test_plugins_in_a_real_server(tmp_path: Path) -> None:
    config = {
        "auth": {"api_key": MASTER_KEY},
        "policies": {"plugins": ["sample_tenant"]},
        "models": [{"id": "parrot", "backend": "sample:parrot", "options": {"upper": True}}],
    }
    with serve(config, tmp_path, env=sample_env()) as server:
        assert "parrot  [sample:parrot]" in server.log()
        async with httpx.AsyncClient(base_url=server.root, timeout=30) as client:
            r = await client.post(
                "/admin/keys", json={"name": "a", "metadata": {"tenant": "acme"}}, headers=AUTH
            )
            acme = bearer(r.json()["key"])
            r = await client.post("/admin/keys", json={"name": "b"}, headers=AUTH)
            nobody = bearer(r.json()["key"])
            r = await client.post("/v1/chat/completions", json=CHAT, headers=acme)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "[PARROT] HELLO THERE"
            r = await client.post("/v1/chat/completions", json=CHAT, headers=nobody)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "tenant_required"


def test_a_missing_plugin_stops_clawbot_serve(tmp_path: Path) -> None:
    config = {
        "auth": {"api_key": MASTER_KEY},
        "policies": {"plugins": ["sample_tenant"]},
        "models": [{"id": "m", "backend": "mock:"}],
    }
    path = tmp_path / "clawbot.json"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "config error: policies.plugins: no policy plugin is called 'sample_tenant'" in (
        done.stderr
    )
