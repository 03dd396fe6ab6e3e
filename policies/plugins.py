"""Policies from plugins: the `clawbot.policies` entry points enabled in `policies.plugins`.

A plugin registers a factory under a name in its package metadata, e.g. in pyproject.toml:

    [project.entry-points."clawbot.policies"]
    tenant = "my_plugin.tenant:TenantPolicy"

The gateway calls it once per config load as `factory(options, config)`: `options` is a copy of
`policies.plugin_options[name]` (`{}` when unset) and `config` the whole frozen Config. It returns
a Policy (a `name` and an `async check(ctx)` that passes or raises a GatewayError) and raises
ConfigError for options it cannot accept. A Policy class whose `__init__` takes
`(options, config)` is such a factory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint
from typing import Any

from app.config import Config, ConfigError
from app.plugins import Plugin, PluginFailed, registry
from policies.base import Policy

POLICY_PLUGIN_GROUP = "clawbot.policies"

PolicyFactory = Callable[[dict[str, Any], Config], Policy]


def available_plugins() -> dict[str, EntryPoint]:
    """Installed policy plugins by name; of two with one name, the first on sys.path wins."""
    return {name: p.entry for name, p in _registry().items() if p.entry is not None}


def _registry() -> dict[str, Plugin]:
    return registry(POLICY_PLUGIN_GROUP, "plugin", "policy", {})


def load_plugin_policies(
    config: Config, installed: Mapping[str, Plugin] | None = None
) -> list[Policy]:
    """The policies named in `policies.plugins`, in order; ConfigError names a bad one."""
    settings = config.policies
    if not settings.plugins and not settings.plugin_options:
        return []
    installed = _registry() if installed is None else installed
    for name in settings.plugin_options:
        if name not in settings.plugins:
            raise ConfigError(
                f"policies.plugin_options: {name!r} is not enabled in policies.plugins"
            )
    policies: list[Policy] = []
    for index, name in enumerate(settings.plugins):
        if name in settings.plugins[:index]:
            raise ConfigError(f"policies.plugins: {name!r} is listed twice")
        plugin = installed.get(name)
        if plugin is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                f"policies.plugins: no policy plugin is called {name!r} (installed: {known}; "
                f"a plugin registers under the {POLICY_PLUGIN_GROUP!r} entry point group)"
            )
        policies.append(_build(plugin, dict(settings.plugin_options.get(name, {})), config))
    return policies


def _build(plugin: Plugin, options: dict[str, Any], config: Config) -> Policy:
    try:
        policy = plugin.build(options, config)
    except PluginFailed as exc:
        raise ConfigError(f"policies.plugins: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"policies.plugin_options.{plugin.name}: {exc}") from exc
    if not isinstance(policy, Policy) or not inspect.iscoroutinefunction(policy.check):
        raise ConfigError(
            f"policies.plugins: {plugin} returned a {type(policy).__name__}, not a policy "
            "(an object with a `name` and an `async def check(self, ctx)`)"
        )
    return policy
