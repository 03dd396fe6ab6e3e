"""A deterministic backend for tests and benchmarks (spec `mock:`).

Replies are a fixed text or an echo of the last user message, split into word "tokens";
a completion with a `suffix` (fill-in-the-middle) is that text followed by ` before: ` and the
suffix, so tests can see the suffix arrived; embeddings are unit vectors derived from a hash of
the input. Options:
`reply`, `token_delay_ms`, `dimensions`, `fail_after_tokens` (raise mid-stream), `fail_with`
(raise before anything: what a failing upstream would), `healthy`, and for tool calls
`tool_arguments`, `tool_name`, `answers_tool_results`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import re
import struct
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from app.errors import (
    ContextLengthExceeded,
    GatewayError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    FunctionCall,
    NamedToolChoice,
    ResponseMessage,
    StreamItem,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from backends.base import BackendSpec, Capabilities
from backends.common import (
    ChatChunks,
    CompletionEvents,
    chat_completion,
    embedding_list,
    first_stop,
    new_id,
    now,
    read_options,
    stop_list,
    usage,
    wants_usage,
)

_WORD = re.compile(r"\S+\s*|\s+")
_LOGPROB = -0.25


Failure = Literal["unavailable", "timeout", "server_error", "rate_limited", "context_length"]


class MockOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Options of the mock backend."""

    reply: str | None = None
    """Fixed reply text; unset echoes the last user message."""
    token_delay_ms: Annotated[float, Meta(ge=0)] = 0.0
    """Delay before each streamed or generated token."""
    dimensions: Annotated[int, Meta(ge=1, le=4096)] = 16
    """Embedding size."""
    fail_after_tokens: int | None = None
    """Raise an upstream error after this many tokens (tests mid-stream failures)."""
    tool_arguments: dict[str, Any] | None = None
    """Makes the mock accept tools: with tools in the request (and `tool_choice` not "none") it
    calls the named or first tool with these arguments instead of replying."""
    tool_name: str | None = None
    """The tool to call when it is offered (and no `tool_choice` names another), not the first."""
    answers_tool_results: bool = False
    """With a tool result last in the conversation, reply to it ("You said: <result>") instead
    of calling again: the turn an agent client (Codex) needs to finish."""
    fail_with: Failure | None = None
    """Fail every call before its first token with this error."""
    healthy: bool = True
    """What `health()` reports."""
    embed_delay_ms: Annotated[float, Meta(ge=0)] = 0.0
    """Delay of each embeddings call (makes background work slow enough to interrupt)."""
    echo_system: bool = False
    """Echo the system messages before the last user message (shows what a gateway feature,
    such as grounding, put into the prompt)."""


def _failure(kind: Failure) -> GatewayError:
    if kind == "unavailable":
        return UpstreamUnavailable("mock backend is unreachable", retry_after=1)
    if kind == "timeout":
        return UpstreamTimeout("mock backend timed out")
    if kind == "context_length":
        return ContextLengthExceeded("mock backend: the prompt exceeds the context window")
    status = 500 if kind == "server_error" else 429
    return UpstreamStatusError(f"mock backend answered {status}", upstream_status=status)


def tokens_of(text: str) -> list[str]:
    """Split text into word tokens that concatenate back to it."""
    return _WORD.findall(text)


class _Generation(msgspec.Struct):
    tokens: list[str]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


class MockBackend:
    """Deterministic fake model."""

    capabilities = Capabilities(chat=True, completions=True, embeddings=True, max_n=1, fim=True)

    def __init__(self, spec: BackendSpec) -> None:
        self.options = read_options(spec, MockOptions)
        self.name = spec.model.id
        if self.options.tool_arguments is not None:
            self.capabilities = dataclasses.replace(self.capabilities, tools=True)

    def _tool_call(self, req: ChatCompletionRequest) -> ToolCall | None:
        """The call the mock makes, if this request gets one."""
        arguments = self.options.tool_arguments
        if arguments is None or not req.tools or req.tool_choice == "none":
            return None
        if self._answering_tool_result(req):
            return None
        names = [tool.function.name for tool in req.tools]
        name = self.options.tool_name if self.options.tool_name in names else names[0]
        if isinstance(req.tool_choice, NamedToolChoice):
            name = req.tool_choice.function.name
        return ToolCall(
            id=new_id("call"),
            function=FunctionCall(name=name, arguments=msgspec.json.encode(arguments).decode()),
        )

    async def start(self) -> None:
        """Nothing to load."""

    async def health(self) -> bool:
        """The configured health."""
        return self.options.healthy

    async def aclose(self) -> None:
        """Nothing to release."""

    def _generate(
        self, prompt: str, max_tokens: int | None, stop: list[str], suffix: str | None = None
    ) -> _Generation:
        if self.options.fail_with is not None:
            raise _failure(self.options.fail_with)
        text = self.options.reply if self.options.reply is not None else f"You said: {prompt}"
        if suffix:
            text = f"{text} before: {suffix}"
        finish: Literal["stop", "length"] = "stop"
        cut = first_stop(text, stop)
        if cut >= 0:
            text = text[:cut]
        tokens = tokens_of(text)
        if max_tokens is not None and len(tokens) > max_tokens:
            tokens, finish = tokens[:max_tokens], "length"
        prompt_tokens = len(tokens_of(prompt)) + len(tokens_of(suffix or ""))
        return _Generation(tokens, finish, prompt_tokens)

    async def _tick(self, produced: int) -> None:
        if (
            self.options.fail_after_tokens is not None
            and produced >= self.options.fail_after_tokens
        ):
            raise UpstreamError("mock backend failed mid-generation")
        if self.options.token_delay_ms:
            await asyncio.sleep(self.options.token_delay_ms / 1000)

    def _answering_tool_result(self, req: ChatCompletionRequest) -> bool:
        return self.options.answers_tool_results and req.messages[-1].role == "tool"

    def _chat_prompt(self, req: ChatCompletionRequest) -> str:
        if self._answering_tool_result(req):
            return req.messages[-1].text()
        users = [m for m in req.messages if m.role == "user"]
        last = users[-1].text() if users else req.messages[-1].text()
        if self.options.echo_system:
            system = [m.text() for m in req.messages if m.role in ("system", "developer")]
            return "\n".join([*system, last])
        return last

    def _chat_logprobs(self, tokens: list[str], top: int) -> ChoiceLogprobs:
        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    token=t,
                    logprob=_LOGPROB,
                    bytes=list(t.encode()),
                    top_logprobs=[TopLogprob(token=t, logprob=_LOGPROB, bytes=list(t.encode()))][
                        :top
                    ],
                )
                for t in tokens
            ],
            refusal=None,
        )

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """A reply to the last user message (or a tool call, see `tool_arguments`)."""
        call = self._tool_call(req)
        if call is not None:
            counts = usage(
                len(tokens_of(self._chat_prompt(req))), len(tokens_of(call.function.arguments))
            )
            message = ResponseMessage(content=None, tool_calls=[call])
            return chat_completion(req.model, message, "tool_calls", counts)
        gen = self._generate(self._chat_prompt(req), req.max_tokens, stop_list(req.stop))
        for produced in range(len(gen.tokens)):
            await self._tick(produced)
        logprobs = self._chat_logprobs(gen.tokens, req.top_logprobs or 0) if req.logprobs else None
        return chat_completion(
            req.model,
            ResponseMessage(content="".join(gen.tokens)),
            gen.finish_reason,
            usage(gen.prompt_tokens, len(gen.tokens)),
            logprobs,
        )

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """The same reply, a word per chunk (a tool call: name first, then argument pieces)."""
        chunks = ChatChunks(
            req.model, bool(req.stream_options and req.stream_options.include_usage)
        )
        call = self._tool_call(req)
        if call is not None:
            yield chunks.delta(ChunkDelta(role="assistant", content=None))
            yield chunks.delta(
                ChunkDelta(
                    tool_calls=[
                        ToolCallDelta(
                            index=0,
                            id=call.id,
                            type="function",
                            function={"name": call.function.name, "arguments": ""},
                        )
                    ]
                )
            )
            arguments = call.function.arguments
            third = max(1, len(arguments) // 3)
            for start in range(0, len(arguments), third):
                piece = arguments[start : start + third]
                yield chunks.delta(
                    ChunkDelta(tool_calls=[ToolCallDelta(index=0, function={"arguments": piece})])
                )
            yield chunks.delta(ChunkDelta(), "tool_calls")
            if chunks.include_usage:
                yield chunks.usage(
                    len(tokens_of(self._chat_prompt(req))), len(tokens_of(arguments))
                )
            return
        gen = self._generate(self._chat_prompt(req), req.max_tokens, stop_list(req.stop))
        yield chunks.delta(ChunkDelta(role="assistant", content=""))
        for produced, token in enumerate(gen.tokens):
            await self._tick(produced)
            lp = self._chat_logprobs([token], req.top_logprobs or 0) if req.logprobs else None
            yield chunks.delta(ChunkDelta(content=token), lp=lp)
        yield chunks.delta(ChunkDelta(), gen.finish_reason)
        if chunks.include_usage:
            yield chunks.usage(gen.prompt_tokens, len(gen.tokens))

    @staticmethod
    def _completion_logprobs(tokens: list[str], top: int, offset: int) -> CompletionLogprobs:
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(
            text_offset=offsets,
            token_logprobs=[_LOGPROB] * len(tokens),
            tokens=tokens,
            top_logprobs=[{t: _LOGPROB} if top else None for t in tokens],
        )

    async def complete(self, req: CompletionRequest) -> Completion:
        """Completions of each prompt (a list of prompts gives one choice each)."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else [str(p) for p in req.prompt]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            gen = self._generate(prompt, req.max_tokens, stop_list(req.stop), req.suffix)
            for produced in range(len(gen.tokens)):
                await self._tick(produced)
            prefix = prompt if req.echo else ""
            choices.append(
                CompletionChoice(
                    text=prefix + "".join(gen.tokens),
                    index=index,
                    logprobs=(
                        self._completion_logprobs(gen.tokens, req.logprobs, len(prefix))
                        if req.logprobs is not None
                        else None
                    ),
                    finish_reason=gen.finish_reason,
                )
            )
            prompt_tokens += gen.prompt_tokens
            completion_tokens += len(gen.tokens)
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=req.model,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens),
        )

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """A streamed completion of a single prompt."""
        prompt = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
        gen = self._generate(prompt, req.max_tokens, stop_list(req.stop), req.suffix)
        events = CompletionEvents(req.model)
        if req.echo:
            yield events.text(prompt)
        for produced, token in enumerate(gen.tokens):
            await self._tick(produced)
            lp = (
                self._completion_logprobs([token], req.logprobs, 0)
                if req.logprobs is not None
                else None
            )
            yield events.text(token, None, lp)
        yield events.text("", gen.finish_reason)
        if wants_usage(req.stream_options):
            yield events.usage(gen.prompt_tokens, len(gen.tokens))

    def _vector(self, text: str) -> list[float]:
        dims = self.options.dimensions
        digest = b""
        counter = 0
        while len(digest) < dims * 4:
            digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
            counter += 1
        raw = struct.unpack(f"<{dims}I", digest[: dims * 4])
        values = [v / 2**32 - 0.5 for v in raw]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """Hash-derived unit vectors, one per input, in input order."""
        if self.options.fail_with is not None:
            raise _failure(self.options.fail_with)
        if self.options.embed_delay_ms:
            await asyncio.sleep(self.options.embed_delay_ms / 1000)
        texts = [req.input] if isinstance(req.input, str) else [str(t) for t in req.input]
        tokens = sum(len(tokens_of(t)) for t in texts)
        return embedding_list([self._vector(t) for t in texts], req, model=req.model, tokens=tokens)
