"""The backend protocol: what a backend can do, and what it is built from.

Only the contract lives here; `backends.registry` builds backends from their specs, so the
protocol imports no backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from app.config import ModelConfig
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
from backends.memory import MemoryBudget


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
    memory: MemoryBudget | None = None
    """The process's budget for in-process weights, which such backends register with."""


@dataclass(frozen=True, slots=True)
class BackendState:
    """What a backend knows of itself beyond its capabilities (an in-process model does)."""

    context_length: int | None = None
    """The context window it serves, once known (an in-process model's once loaded)."""
    trained_context: int | None = None
    """The context the model was trained for, when the backend can read it (a GGUF header)."""
    loaded: bool | None = None
    """Whether its weights are in memory; None where that means nothing (a remote server)."""
    engine: Mapping[str, float] | None = None
    """Its scheduler's counters (`slots`, `active`, `queued`, `steps`, ...), if it has one."""


@runtime_checkable
class SelfDescribing(Protocol):
    """A backend that says what it knows of itself (optional: remote backends do not)."""

    def state(self) -> BackendState:
        """Its state now; cheap, called per request and per scrape."""


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
"""Builds a backend from its spec (`backends.registry` holds the built-in ones and plugins)."""


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
