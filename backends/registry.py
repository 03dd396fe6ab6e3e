"""The registry that builds backends from URL-ish specs: the built-in schemes and the
`clawbot.backends` entry points of plugins."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from app.config import ConfigError, ModelConfig
from backends.base import Backend, BackendFactory, BackendSpec
from backends.llamacpp.backend import LlamaCppBackend
from backends.memory import MemoryBudget
from backends.mock import MockBackend
from backends.openai_http.backend import OpenAIHTTPBackend


def _builtin_factories() -> dict[str, BackendFactory]:
    return {
        "llamacpp": LlamaCppBackend,
        "mock": MockBackend,
        "http": OpenAIHTTPBackend,
        "https": OpenAIHTTPBackend,
    }


BACKEND_PLUGIN_GROUP = "clawbot.backends"


class PluginBackendFactory:
    """A `clawbot.backends` entry point, imported when a model first uses its scheme.

    The entry point is a `BackendFactory`: called with the BackendSpec, it returns a Backend or
    raises ConfigError. Any other failure, or a result lacking Backend's methods, becomes a
    ConfigError naming the plugin, so a broken plugin fails start-up only where it is used.
    """

    def __init__(self, ep: EntryPoint) -> None:
        self.ep = ep

    def __call__(self, spec: BackendSpec) -> Backend:
        """Build the plugin's backend for `spec`."""
        dist = self.ep.dist
        origin = f" from {dist.name} {dist.version}" if dist is not None else ""
        where = f"backend plugin {self.ep.name!r} ({self.ep.value}{origin})"
        try:
            factory = self.ep.load()
        except Exception as exc:
            raise ConfigError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
        try:
            backend = factory(spec)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{where} failed to start: {type(exc).__name__}: {exc}") from exc
        if not isinstance(backend, Backend):
            missing = ", ".join(a for a in _BACKEND_ATTRS if not hasattr(backend, a))
            raise ConfigError(
                f"{where} returned a {type(backend).__name__}, which lacks the Backend "
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
    """Built-in backends plus those registered under the `clawbot.backends` entry points.

    A plugin's entry point name is its scheme (`myscheme:` in a model's `backend`); the
    built-in schemes cannot be taken over, and of two plugins with one name the first wins.
    """
    factories = _builtin_factories()
    for ep in entry_points(group=BACKEND_PLUGIN_GROUP):
        factories.setdefault(ep.name, PluginBackendFactory(ep))
    return factories


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
