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
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from app.config import Config, ConfigError
from policies.base import Policy

POLICY_PLUGIN_GROUP = "clawbot.policies"

PolicyFactory = Callable[[dict[str, Any], Config], Policy]


def available_plugins() -> dict[str, EntryPoint]:
    """Installed policy plugins by name; of two with one name, the first on sys.path wins."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=POLICY_PLUGIN_GROUP):
        found.setdefault(ep.name, ep)
    return found


def describe(ep: EntryPoint) -> str:
    """`module:attr from distribution version`, for error messages."""
    dist = ep.dist
    return f"{ep.value} from {dist.name} {dist.version}" if dist is not None else ep.value


def load_plugin_policies(
    config: Config, installed: Mapping[str, EntryPoint] | None = None
) -> list[Policy]:
    """The policies named in `policies.plugins`, in order; ConfigError names a bad one."""
    settings = config.policies
    if not settings.plugins and not settings.plugin_options:
        return []
    installed = available_plugins() if installed is None else installed
    for name in settings.plugin_options:
        if name not in settings.plugins:
            raise ConfigError(
                f"policies.plugin_options: {name!r} is not enabled in policies.plugins"
            )
    policies: list[Policy] = []
    for index, name in enumerate(settings.plugins):
        if name in settings.plugins[:index]:
            raise ConfigError(f"policies.plugins: {name!r} is listed twice")
        ep = installed.get(name)
        if ep is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                f"policies.plugins: no policy plugin is called {name!r} (installed: {known}; "
                f"a plugin registers under the {POLICY_PLUGIN_GROUP!r} entry point group)"
            )
        policies.append(_build(name, ep, dict(settings.plugin_options.get(name, {})), config))
    return policies


def _build(name: str, ep: EntryPoint, options: dict[str, Any], config: Config) -> Policy:
    where = f"policies.plugins: plugin {name!r} ({describe(ep)})"
    try:
        factory = ep.load()
    except Exception as exc:
        raise ConfigError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{where} is a {type(factory).__name__}, not a policy factory")
    try:
        policy = factory(options, config)
    except ConfigError as exc:
        raise ConfigError(f"policies.plugin_options.{name}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{where} failed to start: {type(exc).__name__}: {exc}") from exc
    if not isinstance(policy, Policy) or not inspect.iscoroutinefunction(policy.check):
        raise ConfigError(
            f"{where} returned a {type(policy).__name__}, not a policy "
            "(an object with a `name` and an `async def check(self, ctx)`)"
        )
    return policy
