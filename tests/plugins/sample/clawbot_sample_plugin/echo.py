"""A backend plugin for the `sample:` scheme: replies `[<label>] <the last user message>`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from app.errors import InvalidRequest
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ResponseMessage,
    StreamItem,
)
from backends.base import BackendSpec, Capabilities
from backends.common import (
    ChatChunks,
    CompletionEvents,
    chat_completion,
    new_id,
    now,
    read_options,
    usage,
    wants_usage,
)


class EchoOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A `sample:` model's `options`."""

    upper: bool = False
    """Shout the echo."""


class EchoBackend:
    """Echoes the prompt, one word per streamed chunk."""

    capabilities = Capabilities(chat=True, completions=True)

    def __init__(self, spec: BackendSpec) -> None:
        self.label = spec.target or "echo"
        self.options = read_options(spec, EchoOptions)

    def _reply(self, prompt: str) -> str:
        text = f"[{self.label}] {prompt}"
        return text.upper() if self.options.upper else text

    @staticmethod
    def _last_user(req: ChatCompletionRequest) -> str:
        users = [m for m in req.messages if m.role == "user"]
        return users[-1].text() if users else ""

    async def start(self) -> None:
        """Nothing to load."""

    async def health(self) -> bool:
        """Always healthy."""
        return True

    async def aclose(self) -> None:
        """Nothing to release."""

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """The echo as one message."""
        prompt = self._last_user(req)
        reply = self._reply(prompt)
        counts = usage(len(prompt.split()), len(reply.split()))
        return chat_completion(req.model, ResponseMessage(content=reply), "stop", counts)

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """The echo, a word per chunk."""
        prompt = self._last_user(req)
        words = self._reply(prompt).split(" ")
        chunks = ChatChunks(req.model, wants_usage(req.stream_options))
        yield chunks.delta(ChunkDelta(role="assistant", content=""))
        for i, word in enumerate(words):
            yield chunks.delta(ChunkDelta(content=word if i == 0 else f" {word}"))
        yield chunks.delta(ChunkDelta(), "stop")
        if chunks.include_usage:
            yield chunks.usage(len(prompt.split()), len(words))

    async def complete(self, req: CompletionRequest) -> Completion:
        """The echo of each prompt."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else [str(p) for p in req.prompt]
        replies = [self._reply(p) for p in prompts]
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=req.model,
            choices=[
                CompletionChoice(text=text, index=i, logprobs=None, finish_reason="stop")
                for i, text in enumerate(replies)
            ],
            usage=usage(sum(len(p.split()) for p in prompts), sum(len(r.split()) for r in replies)),
        )

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """The echo of a single prompt, in one event."""
        prompt = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
        reply = self._reply(prompt)
        events = CompletionEvents(req.model)
        yield events.text(reply)
        yield events.text("", "stop")
        if wants_usage(req.stream_options):
            yield events.usage(len(prompt.split()), len(reply.split()))

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """Not offered (`capabilities.embeddings` is false, so the gateway never asks)."""
        raise InvalidRequest("the sample backend does not embed", param="model")
