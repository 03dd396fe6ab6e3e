"""The one plugin registry: built-ins and entry points alike, and how their failures read.

Entry points of real (hand-made) distributions are exercised in tests/policies/test_plugins.py;
here, the registry's own rules on built-ins."""

from __future__ import annotations

import pytest

from app.config import ConfigError
from app.plugins import Plugin, PluginFailed, registry


def test_built_ins_register_through_the_registry_and_build() -> None:
    found = registry("clawbot.nothing-registers-here", "widget plugin", "widget", {"w": dict})
    assert list(found) == ["w"]
    plugin = found["w"]
    assert str(plugin) == "widget plugin 'w' (built in)"
    assert plugin.build([("a", 1)]) == {"a": 1}


def fails(*_: object) -> object:
    raise RuntimeError("boom")


def refuses(*_: object) -> object:
    raise ConfigError("option x must be positive")


def test_a_plugins_own_failures_are_plugin_failed_and_its_option_errors_are_not() -> None:
    with pytest.raises(PluginFailed, match=r"^widget plugin 'f' \(built in\) failed to start: "):
        Plugin("widget plugin", "widget", "f", builtin=fails).build()
    with pytest.raises(PluginFailed, match="is a int, not a widget factory"):
        Plugin("widget plugin", "widget", "n", builtin=3).build()
    with pytest.raises(ConfigError) as refused:
        Plugin("widget plugin", "widget", "r", builtin=refuses).build()
    assert not isinstance(refused.value, PluginFailed)
    assert str(refused.value) == "option x must be positive"
