"""Small helpers every backend shares: ids, timestamps, option parsing."""

from __future__ import annotations

import base64
import math
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from app.config import ConfigError
from app.protocol import (
    UNSET,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionFinishReason,
    CompletionLogprobs,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    FinishReason,
    PromptTokensDetails,
    ResponseMessage,
    StreamOptions,
    Usage,
)
from backends.base import BackendSpec

OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-…`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, for `created`."""
    return int(time.time())


def read_options(spec: BackendSpec, options_type: type[OptionsT]) -> OptionsT:
    """Validate the model's `options` against a backend's options Struct."""
    try:
        return msgspec.convert(spec.model.options, type=options_type)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("$.", "options.").replace("`$`", "`options`")
        raise ConfigError(f"invalid backend options: {text}") from exc


def first_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop sequence starts in `text`, or -1."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(hits) if hits else -1


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def wants_usage(options: StreamOptions | None) -> bool:
    """Whether a stream must end with a usage chunk."""
    return bool(options and options.include_usage)


def chat_completion(
    model: str,
    message: ResponseMessage,
    finish_reason: FinishReason,
    counts: Usage,
    logprobs: ChoiceLogprobs | None = None,
) -> ChatCompletion:
    """A one-choice chat completion."""
    return ChatCompletion(
        id=new_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[
            ChatChoice(index=0, message=message, logprobs=logprobs, finish_reason=finish_reason)
        ],
        usage=counts,
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
    """A Usage object with its total (and the prompt tokens read from cache, when known)."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=(
            UNSET if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        ),
    )


def embedding_list(
    vectors: list[list[float]], req: EmbeddingRequest, *, model: str, tokens: int
) -> EmbeddingList:
    """The response for `vectors` (in input order), shortened and encoded as `req` asks."""
    data = []
    for index, vector in enumerate(vectors):
        if req.dimensions is not None and req.dimensions < len(vector):
            # Shortened embeddings are renormalized, as OpenAI's `dimensions` does.
            vector = vector[: req.dimensions]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vector = [v / norm for v in vector]
        embedding: list[float] | str = vector
        if req.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append(Embedding(embedding=embedding, index=index))
    return EmbeddingList(
        data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


@dataclass(slots=True)
class ChatChunks:
    """Builds the chunks of one streamed chat completion: one id, one `created`."""

    model: str
    include_usage: bool
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)

    def delta(
        self,
        delta: ChunkDelta,
        finish: FinishReason | None = None,
        lp: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        """A chunk adding `delta` (OpenAI sends `usage: null` on these when usage is asked)."""
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(index=0, delta=delta, logprobs=lp, finish_reason=finish)],
            usage=None if self.include_usage else UNSET,
        )

    def usage(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
    ) -> ChatCompletionChunk:
        """The final chunk: no choices, the usage."""
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(prompt_tokens, completion_tokens, cached_tokens),
        )


@dataclass(slots=True)
class CompletionEvents:
    """Builds the events of one streamed text completion."""

    model: str
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)

    def text(
        self,
        text: str,
        finish: CompletionFinishReason | None = None,
        lp: CompletionLogprobs | None = None,
    ) -> Completion:
        """An event adding `text`."""
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=text, index=0, logprobs=lp, finish_reason=finish)],
        )

    def usage(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
    ) -> Completion:
        """The final event: no choices, the usage."""
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(prompt_tokens, completion_tokens, cached_tokens),
        )
