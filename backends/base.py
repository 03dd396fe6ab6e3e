"""The backend protocol, and the registry that builds backends from URL-ish specs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, runtime_checkable

from app.config import ConfigError, ModelConfig
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    RerankRequest,
    RerankResponse,
    StreamItem,
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the gateway answers 400 for what it cannot."""

    chat: bool = True
    completions: bool = True
    embeddings: bool = False
    max_n: int = 1
    """Largest `n` the backend serves (choices per request)."""
    tools: bool = False
    """Accepts `tools` / `tool_choice`."""
    vision: bool = False
    """Accepts image content parts."""
    token_inputs: bool = False
    """Accepts token-id arrays as embedding input as they are (else they are decoded as cl100k)."""
    rerank: bool = False
    """Scores documents against a query itself (`Reranker.rerank`); else rerank uses `embed`."""
    fim: bool = False
    """Completes with a `suffix` (fill-in-the-middle)."""
    json_schema: bool = False
    """Honours `response_format` json_schema / json_object."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Everything a backend factory gets: the model's config, the spec's target, the timeout."""

    model: ModelConfig
    scheme: str
    target: str
    """The spec after `scheme:` (a path for llamacpp), or the whole URL for http(s)."""
    timeout_s: float
    """Default total time for one call."""


@runtime_checkable
class Backend(Protocol):
    """A model server: in-process engine, remote HTTP server, or mock."""

    capabilities: Capabilities

    async def start(self) -> None:
        """Load weights or open connections; called once before serving."""

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """Answer a chat completion."""

    def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream a chat completion as chunks."""

    async def complete(self, req: CompletionRequest) -> Completion:
        """Answer a text completion."""

    def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream a text completion."""

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """Embed the request's inputs."""

    async def health(self) -> bool:
        """Whether the backend can serve now (loaded, reachable)."""

    async def aclose(self) -> None:
        """Release weights, threads and connections."""


@runtime_checkable
class Reranker(Protocol):
    """A backend that can rerank (one whose `capabilities.rerank` is true implements this)."""

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        """Score every document of `req` against its query; the gateway sorts and cuts."""


BackendFactory = Callable[[BackendSpec], Backend]


def _builtin_factories() -> dict[str, BackendFactory]:
    from backends.llamacpp import LlamaCppBackend
    from backends.mock import MockBackend
    from backends.openai_http import OpenAIHTTPBackend

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


def common_capabilities(caps: Iterable[Capabilities]) -> Capabilities:
    """What every one of several backends can do (a pool promises only that)."""
    caps = list(caps)
    return Capabilities(
        chat=all(c.chat for c in caps),
        completions=all(c.completions for c in caps),
        embeddings=all(c.embeddings for c in caps),
        max_n=min(c.max_n for c in caps),
        tools=all(c.tools for c in caps),
        vision=all(c.vision for c in caps),
        token_inputs=all(c.token_inputs for c in caps),
        rerank=all(c.rerank for c in caps),
        fim=all(c.fim for c in caps),
        json_schema=all(c.json_schema for c in caps),
    )


def backend_scheme(spec: str) -> str:
    """The registry key of a backend spec (`http`, `llamacpp`, ...)."""
    return spec.partition(":")[0]


def build_backend(
    model: ModelConfig,
    *,
    timeout_s: float,
    index: int = 0,
    factories: dict[str, BackendFactory] | None = None,
    where: str | None = None,
) -> Backend:
    """Build the backend for `model` from its spec; a bad spec is a ConfigError.

    `where` names the config entry in errors (default `models[index]`).
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
        return factories[scheme](BackendSpec(model, scheme, target, timeout_s))
    except ConfigError as exc:
        raise ConfigError(f"{where} ({model.id}): {exc}") from exc
