"""The registry that builds backends from URL-ish specs: the built-in schemes and the
`clawbot.backends` entry points of plugins."""

from __future__ import annotations

from app.config import ConfigError, ModelConfig
from app.plugins import Plugin, PluginFailed, registry
from backends.base import Backend, BackendFactory, BackendSpec
from backends.llamacpp.backend import LlamaCppBackend
from backends.memory import MemoryBudget
from backends.mock import MockBackend
from backends.openai_http.backend import OpenAIHTTPBackend

BACKEND_PLUGIN_GROUP = "clawbot.backends"
BUILTIN_BACKENDS: dict[str, BackendFactory] = {
    "llamacpp": LlamaCppBackend,
    "mock": MockBackend,
    "http": OpenAIHTTPBackend,
    "https": OpenAIHTTPBackend,
}


class PluginBackendFactory:
    """A `clawbot.backends` entry point, imported when a model first uses its scheme.

    The entry point is a `BackendFactory`: called with the BackendSpec, it returns a Backend or
    raises ConfigError. Any other failure (`app.plugins`), or a result lacking Backend's
    methods, becomes a ConfigError naming the plugin, so a broken plugin fails start-up only
    where it is used.
    """

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def __call__(self, spec: BackendSpec) -> Backend:
        """Build the plugin's backend for `spec`."""
        backend = self.plugin.build(spec)
        if not isinstance(backend, Backend):
            missing = ", ".join(a for a in _BACKEND_ATTRS if not hasattr(backend, a))
            raise PluginFailed(
                f"{self.plugin} returned a {type(backend).__name__}, which lacks the Backend "
                f"members {missing}"
            )
        return backend


_BACKEND_ATTRS = (
    "capabilities",
    "start",
    "chat",
    "stream_chat",
    "complete",
    "stream_complete",
    "embed",
    "health",
    "aclose",
)


def backend_factories() -> dict[str, BackendFactory]:
    """Every backend by scheme, through the one plugin registry (`app.plugins`): the built-ins,
    then those registered under the `clawbot.backends` entry points.

    A plugin's entry point name is its scheme (`myscheme:` in a model's `backend`); the
    built-in schemes cannot be taken over, and of two plugins with one name the first wins.
    """
    found = registry(BACKEND_PLUGIN_GROUP, "backend plugin", "backend", BUILTIN_BACKENDS)
    return {
        name: BUILTIN_BACKENDS[name] if plugin.entry is None else PluginBackendFactory(plugin)
        for name, plugin in found.items()
    }


def build_backend(
    model: ModelConfig,
    *,
    timeout_s: float,
    index: int = 0,
    factories: dict[str, BackendFactory] | None = None,
    where: str | None = None,
    memory: MemoryBudget | None = None,
) -> Backend:
    """Build the backend for `model` from its spec; a bad spec is a ConfigError.

    `where` names the config entry in errors (default `models[index]`); in-process backends
    register with `memory`, the process's budget.
    """
    factories = backend_factories() if factories is None else factories
    where = f"models[{index}]" if where is None else where
    scheme, sep, rest = model.backend.partition(":")
    if not sep or scheme not in factories:
        known = ", ".join(sorted(factories))
        raise ConfigError(
            f"{where}.backend: unknown backend {model.backend!r} "
            f"(expected one of the schemes: {known}; e.g. 'llamacpp:embedded')"
        )
    target = model.backend if scheme in ("http", "https") else rest
    try:
        return factories[scheme](BackendSpec(model, scheme, target, timeout_s, memory))
    except ConfigError as exc:
        raise ConfigError(f"{where} ({model.id}): {exc}") from exc
