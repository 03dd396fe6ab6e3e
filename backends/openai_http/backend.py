"""Any OpenAI-compatible server over HTTP (spec `http(s)://host:port/v1`).

One pooled `httpx.AsyncClient` per backend. Streams pass through chunk by chunk: when the
upstream's model name equals the public id, chunk JSON is forwarded without re-encoding.
Options: `upstream_model`, `api_key`, `api_key_env`, `headers`, `connect_timeout_s`,
`max_connections`, `verify` (false, or a CA bundle path), `transport` (`pooled`, our
`PooledTransport`, or `httpx` for httpx's own httpcore pool), `rerank` (false when the
upstream has no `/rerank`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal, TypeVar

import httpx
import msgspec
from msgspec import Meta, Raw

from app.config import ConfigError
from app.errors import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    StreamItem,
)
from backends.base import BackendSpec, Capabilities
from backends.common import new_id, read_options
from backends.openai_http.transport import PooledTransport

T = TypeVar("T", ChatCompletion, Completion, EmbeddingList, ChatCompletionChunk)
A = TypeVar("A")


class HTTPOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Options of the OpenAI-compatible HTTP backend."""

    upstream_model: str | None = None
    """Model name sent upstream; defaults to the public id."""
    api_key: str | None = None
    """Bearer key for the upstream."""
    api_key_env: str | None = None
    """Environment variable holding the upstream key (preferred over `api_key`)."""
    headers: dict[str, str] = {}
    """Extra headers sent upstream."""
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    """Time to establish a connection."""
    max_connections: Annotated[int, Meta(ge=1)] = 256
    """Pool size."""
    verify: bool | str = True
    """TLS verification: false, true, or a CA bundle path."""
    transport: Literal["pooled", "httpx"] = "pooled"
    """Connection pool: our `PooledTransport` (cheap per request) or httpx's default (httpcore)."""
    rerank: bool = True
    """The upstream serves POST /rerank (llama.cpp's server with `--reranking`, vLLM, Infinity);
    false scores rerank requests by embedding similarity instead."""


class _UpstreamErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _UpstreamError(msgspec.Struct):
    error: _UpstreamErrorBody | str


_decode_error = msgspec.json.Decoder(_UpstreamError).decode


class _UpstreamRerankResult(msgspec.Struct):
    index: int
    relevance_score: float


class _UpstreamRerankUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    total_tokens: int | None = None


class _UpstreamRerank(msgspec.Struct):
    """A rerank answer in Cohere/Jina/llama.cpp style (`results`) or Voyage style (`data`)."""

    id: str | None = None
    results: list[_UpstreamRerankResult] | None = None
    data: list[_UpstreamRerankResult] | None = None
    usage: _UpstreamRerankUsage | None = None


def _is_error_event(payload: str) -> bool:
    """Whether a stream event's JSON is an `{"error": …}` object rather than a chunk."""
    return payload.startswith("{") and payload[1:].lstrip().startswith('"error"')


def _ssl_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's `verify` for the option: a CA bundle file or directory becomes an SSLContext."""
    if isinstance(verify, bool):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"options.verify: cannot load CA bundle {verify!r}: {exc}") from exc


@contextmanager
def map_httpx_errors(url: str) -> Iterator[None]:
    """Translate httpx failures into gateway errors."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UpstreamUnavailable(
            f"cannot connect to upstream {url}: {exc or type(exc).__name__}", retry_after=1
        ) from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"upstream {url} timed out ({type(exc).__name__})") from exc
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {url} did not answer within the timeout") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise UpstreamError(f"upstream {url} failed: {type(exc).__name__}: {exc}") from exc


def status_error(status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
    """The gateway error for an upstream error response, keeping its OpenAI fields.

    The upstream refusing *our* credentials (401/403) is a gateway misconfiguration, not the
    client's fault, so it becomes a 502 rather than telling the client its own key is wrong.
    """
    retry = headers.get("retry-after")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    try:
        parsed = _decode_error(body).error
    except msgspec.MsgspecError:
        parsed = body.decode(errors="replace")[:500] or f"HTTP {status}"
    if status in (401, 403):
        detail = parsed if isinstance(parsed, str) else parsed.message
        return UpstreamError(
            f"the upstream refused the gateway's credentials (HTTP {status}: {detail}); "
            "check this model's options.api_key / api_key_env",
            code="upstream_auth_failed",
        )
    if isinstance(parsed, str):
        return UpstreamStatusError(
            f"upstream error: {parsed}", upstream_status=status, retry_after=retry_after
        )
    return UpstreamStatusError(
        parsed.message or f"upstream returned HTTP {status}",
        upstream_status=status,
        upstream_type=parsed.type,
        param=parsed.param,
        code=None if parsed.code is None else str(parsed.code),
        retry_after=retry_after,
    )


class OpenAIHTTPBackend:
    """Forwards requests to an OpenAI-compatible server."""

    capabilities = Capabilities(
        chat=True,
        completions=True,
        embeddings=True,
        max_n=128,
        tools=True,
        vision=True,
        token_inputs=True,
        rerank=True,
        fim=True,
        json_schema=True,
    )

    def __init__(self, spec: BackendSpec) -> None:
        options = read_options(spec, HTTPOptions)
        try:
            url = httpx.URL(spec.target)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"backend: {spec.target!r} is not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"backend: {spec.target!r} is not an http(s) URL")
        self.base_url = spec.target.rstrip("/")
        self.public_model = spec.model.id
        self.upstream_model = options.upstream_model or spec.model.id
        self.timeout_s = spec.timeout_s
        api_key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
        api_key = api_key or options.api_key or ""
        headers = httpx.Headers({"content-type": "application/json", **options.headers})
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        verify = _ssl_verify(options.verify)
        transport = None
        if options.transport == "pooled":
            tls = httpx.create_ssl_context(verify=verify) if url.scheme == "https" else None
            transport = PooledTransport(max_connections=options.max_connections, ssl_context=tls)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(spec.timeout_s, connect=options.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=options.max_connections,
                max_keepalive_connections=options.max_connections,
            ),
            verify=verify,
            transport=transport,
        )
        self._passthrough = self.upstream_model == self.public_model
        if not options.rerank:
            self.capabilities = dataclasses.replace(self.capabilities, rerank=False)

    async def start(self) -> None:
        """Nothing to load; connections open on first use."""

    async def health(self) -> bool:
        """Whether the upstream lists its models."""
        try:
            response = await self._client.get("/models", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _body(self, req: msgspec.Struct, *, stream: bool) -> bytes:
        changes: dict[str, Any] = {"model": self.upstream_model}
        if stream:
            changes["stream"] = True
        elif getattr(req, "stream", None) is not None:
            changes.update(stream=None, stream_options=None)
        return msgspec.json.encode(msgspec.structs.replace(req, **changes))

    async def _post(self, path: str, req: msgspec.Struct, type_: type[T]) -> T:
        result = await self._answer(path, self._body(req, stream=False), type_)
        result.model = self.public_model
        return result

    async def _answer(self, path: str, content: bytes, type_: type[A]) -> A:
        """POST `content` to `path` upstream and decode the answer; upstream errors mapped."""
        with map_httpx_errors(self.base_url):
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.post(path, content=content)
        if response.status_code >= 400:
            raise status_error(response.status_code, response.content, response.headers)
        try:
            return msgspec.json.decode(response.content, type=type_)
        except msgspec.MsgspecError as exc:
            raise UpstreamError(
                f"upstream {self.base_url}{path} returned an invalid response: {exc}"
            ) from exc

    async def _stream(
        self, path: str, req: msgspec.Struct, chunk_type: type[T]
    ) -> AsyncIterator[StreamItem]:
        request = self._client.build_request("POST", path, content=self._body(req, stream=True))
        with map_httpx_errors(self.base_url):
            response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                with map_httpx_errors(self.base_url):
                    body = await response.aread()
                raise status_error(response.status_code, body, response.headers)
            done = False
            with map_httpx_errors(self.base_url):
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if not payload:
                        continue
                    if payload == "[DONE]":
                        done = True
                        break
                    if _is_error_event(payload):
                        raise status_error(502, payload.encode(), response.headers)
                    yield self._chunk(payload, chunk_type)
            if not done:
                raise UpstreamError(f"upstream {self.base_url} ended the stream before [DONE]")
        finally:
            await response.aclose()

    def _chunk(self, payload: str, chunk_type: type[T]) -> StreamItem:
        data = payload.encode()
        if self._passthrough:
            return Raw(data)
        try:
            chunk = msgspec.json.decode(data, type=chunk_type)
        except msgspec.MsgspecError as exc:
            raise UpstreamError(f"upstream {self.base_url} sent an invalid chunk: {exc}") from exc
        chunk.model = self.public_model
        return chunk  # type: ignore[return-value]

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion:
        """POST /chat/completions upstream."""
        return await self._post("/chat/completions", req, ChatCompletion)

    def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[StreamItem]:
        """Streamed POST /chat/completions upstream."""
        return self._stream("/chat/completions", req, ChatCompletionChunk)

    async def complete(self, req: CompletionRequest) -> Completion:
        """POST /completions upstream."""
        return await self._post("/completions", req, Completion)

    def stream_complete(self, req: CompletionRequest) -> AsyncIterator[StreamItem]:
        """Streamed POST /completions upstream."""
        return self._stream("/completions", req, Completion)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        """POST /embeddings upstream."""
        return await self._post("/embeddings", req, EmbeddingList)

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        """POST /rerank upstream, documents as plain strings (what llama.cpp's server needs)."""
        body = msgspec.structs.replace(
            req, model=self.upstream_model, documents=req.texts(), return_documents=None, top_k=None
        )
        answer = await self._answer("/rerank", msgspec.json.encode(body), _UpstreamRerank)
        scored = answer.results if answer.results is not None else answer.data
        if scored is None:
            raise UpstreamError(
                f"upstream {self.base_url}/rerank answered without `results` or `data`"
            )
        results = [RerankResult(index=r.index, relevance_score=r.relevance_score) for r in scored]
        usage = answer.usage or _UpstreamRerankUsage()
        total = usage.total_tokens or usage.prompt_tokens or 0
        return RerankResponse(
            id=answer.id or new_id("rerank"),
            model=self.public_model,
            results=results,
            data=results,
            usage=RerankUsage(prompt_tokens=usage.prompt_tokens or total, total_tokens=total),
        )
