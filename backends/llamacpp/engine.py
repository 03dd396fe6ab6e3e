"""Continuous batching over one llama.cpp context: many sequences decoded together.

One engine thread owns the context. Each step it builds one `llama_batch` holding the next
token of every generating sequence plus chunks of waiting prompts (at most `n_batch` tokens
in all, so a long prompt is read over several steps while the other streams keep getting
tokens), decodes it once, and samples each sequence from its own row of logits with its own
llama.cpp sampler chain (temperature, top-k/p, min-p, penalties, logit bias, seed, grammar).
New requests take a free slot between steps; finished and cancelled ones leave between steps.

A slot keeps the KV cache of its last sequence. A new prompt evaluates only what follows the
longest prefix it shares with any slot's cache, busy or free (the next turn of a conversation
re-reads only the new messages, a shared system prompt is read once): with a unified KV cache
the prefix's cells gain the new sequence id; with a stream per slot the source stream is copied.

Requests beyond the slots wait in a bounded FIFO: a full queue, or a wait longer than
`queue_timeout_s`, is a 503 `server_busy` with a retry-after. Events go back to the asyncio
side in one `call_soon_threadsafe` per step, not one per token.

Embeddings are decoded in a context of their own (`_Embedder`), between steps. An embedding
model's engine (`slots` 0) has no generation context at all: it only runs embedding jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import numpy as np

from app.errors import ServerBusy, UpstreamError
from backends.llamacpp.text import StopScanner, TokenLogprob, log_softmax_at

log = logging.getLogger("clawbot.llamacpp")


class Start(msgspec.Struct):
    """The sequence has a slot; its prompt is being read."""

    prompt_tokens: int
    cached_tokens: int


class Piece(msgspec.Struct):
    """Text released by the sequence (stop sequences held back), with its tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob]
    finish_reason: Literal["stop", "length"] | None


class End(msgspec.Struct):
    """The sequence is done."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens reused from the KV cache."""


Event = Start | Piece | End


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one sequence picks its tokens (llama-cpp-python's defaults and chain order)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None


def token_bytes(vocab: Any, token: int) -> bytes:
    """The exact bytes of one token (llama-cpp-python's own helper returns its whole buffer)."""
    import llama_cpp

    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def _sampler_chain(sampling: Sampling, vocab: Any, n_vocab: int) -> Any:
    """A llama.cpp sampler chain for `sampling`; freed by the caller."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        if sampler is None:
            llama_cpp.llama_sampler_free(chain)
            raise UpstreamError("llama.cpp could not build a sampler for this request")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(
            *(llama_cpp.llama_logit_bias(t, b) for t, b in sampling.logit_bias.items())
        )
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (
        1.0,
        0.0,
        0.0,
    ):
        add(
            llama_cpp.llama_sampler_init_penalties(
                sampling.penalty_last_n,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            )
        )
    if sampling.grammar is not None:
        add(llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root"))
    if sampling.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


PREFILL_FIRST_TOKENS = 64
"""Unread prompt tokens (all waiting prompts together) read in a step without generation."""
COPY_MIN_TOKENS = 16
"""Shortest gain in reused prompt tokens worth copying another slot's KV stream for."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation: its prompt, how to sample, where its events go."""

    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: list[str]
    logprobs: int | None
    reuse_prefix: bool = True
    loop: asyncio.AbstractEventLoop | None = None
    deliver: Callable[[Event | BaseException | None], None] = lambda _item: None
    """Called on `loop` with each event, an error, or None after the last."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-thread state
    slot: int = -1
    n_read: int = 0
    """Prompt tokens already in the KV cache."""
    cached: int = 0
    """Prompt tokens that were in the KV cache when the sequence got its slot."""
    generated: int = 0
    last_token: int = -1
    sampler: Any = None
    scanner: StopScanner | None = None
    pending: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class _Slot:
    index: int
    cache: list[int] = field(default_factory=list)
    """Tokens whose KV entries this sequence id holds, in position order."""
    seq: Sequence | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How a model's engine is sized."""

    slots: int = 4
    """Sequences generating at once; 0 for an embedding model (no generation context)."""
    n_ctx: int = 2048
    """Context per sequence."""
    n_batch: int = 256
    """Tokens decoded per step: every generating sequence's next token plus prompt chunks."""
    n_threads: int | None = None
    kv_unified: bool = True
    prefix_cache: bool = True
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    embed_window: int = 512
    """Longest input embedded, in tokens (see `_Embedder`)."""
    embed_pooling: int = 1
    """How an input's token vectors become one (llama.cpp's `LLAMA_POOLING_TYPE_*`): mean,
    unless the model names its own."""


class Engine:
    """The batching scheduler of one loaded model (see the module docstring)."""

    def __init__(self, model: Any, config: EngineConfig, name: str) -> None:
        """A context on `model` (an `llama_cpp._internals.LlamaModel`); starts the thread."""
        import llama_cpp
        from llama_cpp import _internals

        self.config = config
        self.name = name
        self.model = model
        self.vocab = model.vocab
        self.n_vocab = int(model.n_vocab())
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: Any = None
        if config.slots:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = config.n_ctx * config.slots
            params.n_batch = params.n_ubatch = config.n_batch
            params.n_seq_max = config.slots
            params.kv_unified = config.kv_unified
            params.no_perf = True
            if config.n_threads:
                params.n_threads = params.n_threads_batch = config.n_threads
            self._ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
            self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
            self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(config.slots)]
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.failed = False
        """The thread died of an unexpected error; the model must be loaded again."""
        self._outbox: list[tuple[Sequence, Event | BaseException | None]] = []
        self._embedder: Any = None
        self._embed_jobs: deque[_EmbedJob] = deque()
        self.steps = 0
        """Decode steps so far (for tests and metrics)."""
        self.embed_batches = 0
        """Embedding decodes so far."""
        self.batch_tokens = 0
        """Tokens decoded so far: prompts read and tokens generated."""
        self.decode_s = 0.0
        """Time spent in llama_decode so far (seconds)."""
        self.busy_s = 0.0
        """Time the engine thread spent working so far: decoding, sampling, bookkeeping."""
        self._step_decode_s = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # Called from any thread.

    @property
    def active(self) -> int:
        """Sequences holding a slot."""
        return sum(1 for s in self._slots if s.seq is not None)

    @property
    def queued(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` for a slot; ServerBusy when the queue is full."""
        if not self._slots:
            raise UpstreamError(f"model {self.name!r} only embeds: it has no generation slots")
        with self._wake:
            if self._stopping:
                raise UpstreamError(f"model {self.name!r} is being unloaded")
            if any(s.cancelled.is_set() for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.cancelled.is_set())
            free = any(s.seq is None for s in self._slots)
            if not free and len(self._waiting) >= self.config.max_queue:
                raise ServerBusy(
                    f"model {self.name!r} is busy: all {self.config.slots} slots are taken and "
                    f"{len(self._waiting)} requests are waiting; retry later",
                    retry_after=1.0,
                )
            self._waiting.append(seq)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq`: its slot (or place in the queue) is freed before the next step."""
        seq.cancelled.set()
        with self._wake:
            self._wake.notify()

    async def run(self, seq: Sequence) -> AsyncGenerator[Event]:
        """Submit `seq` and yield its events; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

        seq.loop, seq.deliver = loop, queue.put_nowait
        try:
            self.submit(seq)
            try:
                first = await asyncio.wait_for(queue.get(), self.config.queue_timeout_s)
            except TimeoutError:
                raise ServerBusy(
                    f"model {self.name!r} is busy: no slot became free within "
                    f"{self.config.queue_timeout_s:g} s; retry later",
                    retry_after=max(1.0, self.config.queue_timeout_s / 4),
                ) from None
            item = first
            while item is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                item = await queue.get()
        finally:
            self.cancel(seq)

    def close(self) -> None:
        """Stop the thread (failing what is still queued or running) and free the context."""
        import llama_cpp

        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        if self._embedder is not None:
            self._embedder.close()
        if self._ctx is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._ctx.close()

    # Called on the engine thread only.

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                started = time.perf_counter()
                self._admit()
                if self._embed_jobs:
                    self._embed_step()
                if any(s.seq is not None for s in self._slots):
                    self._step()
                # Both counters move together, busy first, before the step's events go out: a
                # scrape, even one the events prompted, never reads more decode than busy time.
                self.busy_s += time.perf_counter() - started
                self.decode_s += self._step_decode_s
                self._step_decode_s = 0.0
                self._flush()
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            log.exception("engine %s stopped", self.name)
            with self._wake:
                self._stopping = self.failed = True
            self._fail_all(UpstreamError(f"the inference engine failed: {exc}"))
        self._fail_all(UpstreamError(f"model {self.name!r} was unloaded"))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._embed_jobs) or any(
            s.seq is not None for s in self._slots
        )

    def _emit(self, seq: Sequence, item: Event | BaseException | None) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one wake-up per loop."""
        if not self._outbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Any]]] = {}
        for seq, item in self._outbox:
            if seq.loop is not None:
                batches.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in batches.items():
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver_all, items)

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
            jobs, self._embed_jobs = list(self._embed_jobs), deque()
        for seq in waiting:
            self._emit(seq, exc)
        for slot in self._slots:
            if slot.seq is not None:
                self._emit(slot.seq, exc)
                self._release(slot)
        for job in jobs:
            job.fail(exc)
        self._flush()

    def _admit(self) -> None:
        """Free the slots of cancelled sequences; give free slots to waiting ones, in order."""
        for slot in self._slots:
            if slot.seq is not None and slot.seq.cancelled.is_set():
                self._release(slot)
        while True:
            with self._wake:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()
                free = [s for s in self._slots if s.seq is None]
                if not self._waiting or not free:
                    return
                seq = self._waiting.popleft()
            try:
                self._place(seq, free)
            except Exception as exc:
                self._emit(seq, exc)
            # Now, not after the next decode: the queue timeout measures the wait for a slot.
            self._flush()

    def _place(self, seq: Sequence, free: list[_Slot]) -> None:
        import llama_cpp

        # The lowest free slot: busy slots stay contiguous, and llama.cpp decodes the tokens of
        # per-slot KV streams in one pass only when their sequence ids are consecutive.
        slot = free[0]
        keep, source = self._best_prefix(seq, slot)
        memory = self._memory
        if source is slot:
            if not llama_cpp.llama_memory_seq_rm(memory, slot.index, keep, -1):
                llama_cpp.llama_memory_seq_rm(memory, slot.index, -1, -1)
                keep = 0
        else:
            llama_cpp.llama_memory_seq_rm(memory, slot.index, -1, -1)
            if source is not None and self.config.kv_unified:
                # The prefix's cells gain this sequence id: no data moves.
                llama_cpp.llama_memory_seq_cp(memory, source.index, slot.index, 0, keep)
            elif source is not None:
                # Another stream: llama.cpp copies it whole (before the next decode), then
                # the copy is cut back to the shared prefix.
                llama_cpp.llama_memory_seq_cp(memory, source.index, slot.index, -1, -1)
                llama_cpp.llama_memory_seq_rm(memory, slot.index, keep, -1)
        slot.cache = seq.prompt[:keep]
        seq.slot, seq.n_read, seq.cached = slot.index, keep, keep
        seq.sampler = _sampler_chain(seq.sampling, self.vocab, self.n_vocab)
        seq.scanner = StopScanner(seq.stops)
        slot.seq = seq
        self._emit(seq, Start(len(seq.prompt), keep))

    def _best_prefix(self, seq: Sequence, target: _Slot) -> tuple[int, _Slot | None]:
        """How many prompt tokens `seq` can take from the KV cache, and from which slot.

        At least the last prompt token is always evaluated: its logits start the reply. Copying
        another slot's stream costs a copy of its whole buffer, so with per-slot streams it is
        done only when it saves at least `COPY_MIN_TOKENS` over what `target` holds.
        """
        if not (self.config.prefix_cache and seq.reuse_prefix):
            return 0, None
        limit = len(seq.prompt) - 1
        own = min(common_prefix(target.cache, seq.prompt), limit)
        best, best_keep = target, own
        for slot in self._slots:
            keep = min(common_prefix(slot.cache, seq.prompt), limit)
            if keep > best_keep:
                best, best_keep = slot, keep
        copying = best is not target and not self.config.kv_unified
        if copying and best_keep - own < COPY_MIN_TOKENS:
            best, best_keep = target, own
        return best_keep, best if best_keep > 0 else None

    def _release(self, slot: _Slot) -> None:
        import llama_cpp

        seq = slot.seq
        if seq is not None and seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        slot.seq = None

    def _step(self) -> None:
        """One decode: next tokens of generating sequences and prompt chunks, then sample."""
        import llama_cpp

        batch = self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        budget = self.config.n_batch
        active = [s for s in self._slots if s.seq is not None]

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            _put(batch, n, token, pos, seq_id, logits)
            n += 1

        unread = sum(len(s.seq.prompt) - s.seq.n_read for s in active if s.seq is not None)
        # Prompts short enough are read in a step of their own: the costs of a step's tokens
        # add up on a CPU, so the generating sequences' next tokens come no later than if they
        # had shared the step, and the new requests' first tokens come sooner. Longer prompts
        # share steps with them, a chunk at a time, so they never stall the streams for long.
        prefill_only = 0 < unread <= min(PREFILL_FIRST_TOKENS, budget)
        for slot in active:
            seq = slot.seq
            assert seq is not None
            if seq.n_read == len(seq.prompt) and not prefill_only:
                outputs.append((seq, n))
                add(seq.last_token, len(slot.cache), slot.index, True)
                slot.cache.append(seq.last_token)
                budget -= 1
        for slot in active:
            seq = slot.seq
            assert seq is not None
            if seq.n_read == len(seq.prompt) or budget <= 0:
                continue
            chunk = seq.prompt[seq.n_read : seq.n_read + budget]
            for i, token in enumerate(chunk):
                last = seq.n_read + i == len(seq.prompt) - 1
                if last:
                    outputs.append((seq, n))
                add(token, seq.n_read + i, slot.index, last)
            seq.n_read += len(chunk)
            slot.cache.extend(chunk)
            budget -= len(chunk)
        batch.n_tokens = n
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        self._step_decode_s = time.perf_counter() - started
        self.steps += 1
        self.batch_tokens += n
        if status != 0:
            error = UpstreamError(f"llama.cpp could not decode a batch (status {status})")
            for slot in active:
                if slot.seq is not None:
                    self._emit(slot.seq, error)
                    llama_cpp.llama_memory_seq_rm(self._memory, slot.index, -1, -1)
                    slot.cache = []
                    self._release(slot)
            return
        for seq, index in outputs:
            if seq.cancelled.is_set():
                continue
            try:
                self._sample(seq, index)
            except Exception as exc:  # this sequence's failure, not the batch's
                log.exception("sampling failed for a sequence of %s", self.name)
                slot = self._slots[seq.slot]
                self._emit(seq, UpstreamError(f"sampling failed: {type(exc).__name__}: {exc}"))
                llama_cpp.llama_memory_seq_rm(self._memory, slot.index, -1, -1)
                slot.cache = []
                self._release(slot)

    def _sample(self, seq: Sequence, index: int) -> None:
        import llama_cpp

        slot = self._slots[seq.slot]
        token = int(llama_cpp.llama_sampler_sample(seq.sampler, self._ctx.ctx, index))
        assert seq.scanner is not None
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, seq, "stop")
            return
        seq.generated += 1
        seq.last_token = token
        piece = token_bytes(self.vocab, token)
        if seq.logprobs is not None:
            raw = llama_cpp.llama_get_logits_ith(self._ctx.ctx, index)
            logits = np.ctypeslib.as_array(raw, shape=(self.n_vocab,))
            chosen, top = log_softmax_at(logits, token, seq.logprobs)
            seq.pending.append(
                TokenLogprob(
                    token=piece,
                    logprob=chosen,
                    top=[(token_bytes(self.vocab, i), lp) for i, lp in top],
                    offset=seq.scanner.decoded_chars,
                )
            )
        text, stopped = seq.scanner.feed(piece)
        if stopped:
            self._emit(seq, Piece(text, seq.pending, "stop"))
            seq.pending = []
            self._end(slot, seq)
        elif seq.generated >= seq.max_tokens:
            self._finish(slot, seq, "length", text)
        elif text:
            self._emit(seq, Piece(text, seq.pending, None))
            seq.pending = []

    def _finish(
        self, slot: _Slot, seq: Sequence, reason: Literal["stop", "length"], text: str = ""
    ) -> None:
        assert seq.scanner is not None
        self._emit(seq, Piece(text + seq.scanner.flush(), seq.pending, reason))
        seq.pending = []
        self._end(slot, seq)

    def _end(self, slot: _Slot, seq: Sequence) -> None:
        self._emit(seq, End(len(seq.prompt), seq.generated, seq.cached))
        self._emit(seq, None)
        self._release(slot)

    # Embeddings, decoded in a context of their own.

    def embed(self, texts: list[list[int]]) -> _EmbedJob:
        """Queue token lists for embedding; the job completes on the engine thread."""
        job = _EmbedJob(texts)
        with self._wake:
            if self._stopping:
                raise UpstreamError(f"model {self.name!r} is being unloaded")
            self._embed_jobs.append(job)
            self._wake.notify()
        return job

    def _embed_step(self) -> None:
        """Embed every queued input, as many sequences per decode as fit."""
        with self._wake:
            jobs, self._embed_jobs = list(self._embed_jobs), deque()
        try:
            if self._embedder is None:
                self._embedder = _Embedder(self.model, self.config)
            inputs = [(job, i, tokens) for job in jobs for i, tokens in enumerate(job.inputs)]
            self.embed_batches += self._embedder.run(inputs)
        except Exception as exc:
            for job in jobs:
                job.fail(exc)
            return
        for job in jobs:
            job.complete()


def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Token `i` of a llama_batch: one sequence id, logits wanted or not."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits


def _deliver_all(items: list[tuple[Sequence, Any]]) -> None:
    for seq, item in items:
        seq.deliver(item)


@dataclass(eq=False, slots=True)
class _EmbedJob:
    inputs: list[list[int]]
    vectors: list[list[float]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _future: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        self.vectors = [[] for _ in self.inputs]

    def bind(self) -> asyncio.Future[None]:
        """A future of this loop completed when the job is."""
        self._loop = asyncio.get_running_loop()
        self._future = self._loop.create_future()
        if self.done.is_set():
            self._resolve()
        return self._future

    def _resolve(self) -> None:
        future = self._future
        if future is None or future.done():
            return
        if self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(None)

    def _signal(self) -> None:
        self.done.set()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._resolve)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._signal()

    def complete(self) -> None:
        self._signal()


class _Embedder:
    """A pooling context sharing the model's weights; inputs batched as sequences.

    llama.cpp pools an input only within one batch and keeps logits and embeddings for every
    token of it, so the batch, hence the longest input, is bounded by `embed_window`: at
    n_ctx tokens it would cost n_ctx x n_vocab x 4 bytes (800 MB for a 49k vocabulary at 4k).
    """

    def __init__(self, model: Any, config: EngineConfig) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        window = min(config.n_ctx, config.embed_window)
        # llama.cpp reserves an output row per sequence and at most n_batch of them.
        self.n_seq = min(64, int(llama_cpp.llama_max_parallel_sequences()), window)
        params.n_ctx = params.n_batch = params.n_ubatch = window
        params.n_seq_max = self.n_seq
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = config.embed_pooling
        params.no_perf = True
        if config.n_threads:
            params.n_threads = params.n_threads_batch = config.n_threads
        self.n_embd = int(model.n_embd())
        self.capacity = window
        self._ctx: Any = _internals.LlamaContext(model=model, params=params, verbose=False)
        self._batch = llama_cpp.llama_batch_init(window, 0, 1)

    def run(self, inputs: list[tuple[_EmbedJob, int, list[int]]]) -> int:
        """Fill each job's vectors, inputs packed greedily into decodes; how many decodes."""
        group: list[tuple[_EmbedJob, int, list[int]]] = []
        used = decodes = 0
        for item in inputs:
            size = len(item[2])
            if group and (used + size > self.capacity or len(group) >= self.n_seq):
                self._decode(group)
                group, used, decodes = [], 0, decodes + 1
            group.append(item)
            used += size
        if group:
            self._decode(group)
            decodes += 1
        return decodes

    def _decode(self, group: list[tuple[_EmbedJob, int, list[int]]]) -> None:
        import llama_cpp

        batch = self._batch
        n = 0
        for seq_id, (_, _, tokens) in enumerate(group):
            for pos, token in enumerate(tokens):
                _put(batch, n, token, pos, seq_id, True)
                n += 1
        batch.n_tokens = n
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise UpstreamError(f"llama.cpp could not embed a batch (status {status})")
        for seq_id, (job, i, _) in enumerate(group):
            raw = llama_cpp.llama_get_embeddings_seq(self._ctx.ctx, seq_id)
            vector = np.ctypeslib.as_array(raw, shape=(self.n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            job.vectors[i] = (vector / norm if norm > 0 else vector).tolist()

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
