"""One registry for what can be added to the gateway from outside (backends, policies): the
built-in ones and those other packages register under an entry point group go through it alike,
the way simonw/llm registers its own models through the hooks it offers to plugins.

A `Plugin` knows where it comes from and builds what it provides; whatever goes wrong on the
way (the module does not import, the factory raises) becomes one ConfigError naming the plugin
and its distribution, so a broken plugin fails start-up with a message, and only where it is
used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from app.config import ConfigError


class PluginFailed(ConfigError):
    """The plugin itself is broken (does not import, is no factory, raised): not its options."""


@dataclass(frozen=True, slots=True)
class Plugin:
    """A named factory: built in (`builtin`), or an entry point loaded when first used."""

    kind: str
    """How messages name it: `backend plugin`, `plugin`."""
    product: str
    """What its factory makes: `backend`, `policy`."""
    name: str
    entry: EntryPoint | None = None
    builtin: object = None

    @property
    def origin(self) -> str:
        """`module:attr from distribution version`, or `built in`."""
        if self.entry is None:
            return "built in"
        dist = self.entry.dist
        where = self.entry.value
        return f"{where} from {dist.name} {dist.version}" if dist is not None else where

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} ({self.origin})"

    def load(self) -> Any:
        """The factory itself; a module that fails to import is a ConfigError."""
        if self.entry is None:
            return self.builtin
        try:
            return self.entry.load()
        except Exception as exc:
            raise PluginFailed(f"{self} failed to load: {type(exc).__name__}: {exc}") from exc

    def build(self, *args: Any) -> Any:
        """Call the factory with `args`. A ConfigError it raises is about the options it was
        given and goes up as it is; the plugin's own failures are `PluginFailed`."""
        factory = self.load()
        if not callable(factory):
            raise PluginFailed(
                f"{self} is a {type(factory).__name__}, not a {self.product} factory"
            )
        try:
            return factory(*args)
        except ConfigError:
            raise
        except Exception as exc:
            raise PluginFailed(f"{self} failed to start: {type(exc).__name__}: {exc}") from exc


def registry(
    group: str, kind: str, product: str, builtins: Mapping[str, object]
) -> dict[str, Plugin]:
    """The built-ins, then the installed entry points of `group`; a built-in name cannot be
    taken over, and of two plugins with one name the first on sys.path wins."""
    found = {
        name: Plugin(kind, product, name, builtin=factory) for name, factory in builtins.items()
    }
    for entry in entry_points(group=group):
        found.setdefault(entry.name, Plugin(kind, product, entry.name, entry=entry))
    return found
