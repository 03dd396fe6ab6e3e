"""`clawbot check`: validate the config, then probe the database and every deployment.

A remote deployment is asked `GET {base}/models` with its own key and timeouts; a failure is
classified from the real exception (refused, timeout, DNS, TLS certificate, http/https mixed up,
not an OpenAI server, wrong base path, rejected key) into a `Check` that says what is wrong and
how to fix it. In-process deployments are loaded and asked whether they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
from sqlalchemy.engine import make_url

from app.config import Config, DeploymentConfig, ModelConfig, model_deployments
from app.core.gateway import Gateway
from app.ledger.storage.database import Database, head_revision
from app.routing.build import deployment_options
from app.routing.pool import Deployment
from backends.base import SelfDescribing, backend_scheme
from backends.openai_http.backend import HTTPOptions

_REMOTE = frozenset({"http", "https"})
_DEFAULT_CONNECT_S = 5.0

_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
"""OpenSSL verify codes meaning: no trusted CA signed this (self-signed, private CA)."""
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = frozenset({62, 64})
_PLAIN_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}
)
"""ssl reasons of a TLS client that got plain-HTTP bytes back instead of a handshake."""
_PLAIN_TO_TLS_ANSWERS = (
    b"plain HTTP request was sent to HTTPS port",  # nginx
    b"Client sent an HTTP request to an HTTPS server",  # Go's net/http (Ollama, LocalAI)
)


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one check: `config`, `database`, or one `model/deployment`."""

    target: str
    """What was checked."""
    ok: bool
    """Whether it passed."""
    backend: str = ""
    """The backend spec (without credentials) or database URL checked."""
    problem: str | None = None
    """A stable code for the failure: `connection_refused`, `tls_unknown_ca`, ..."""
    message: str = ""
    """What happened."""
    fix: str | None = None
    """How to fix it."""
    latency_ms: float | None = None
    """Time the probe took."""
    note: str | None = None
    """Something worth knowing even when it passed."""
    warning: str | None = None
    """It passed, but something is likely to bite (`fix` says what to change)."""

    def line(self) -> str:
        """One line for humans."""
        named = not self.backend or self.target.endswith(f"/{self.backend}")
        where = self.target if named else f"{self.target} [{self.backend}]"
        if self.ok and self.warning:
            fix = f"; fix: {self.fix}" if self.fix else ""
            return f"WARN {where}: {self.message}; {self.warning}{fix}"
        if self.ok:
            took = f" ({self.latency_ms:.0f} ms)" if self.latency_ms is not None else ""
            text = f"OK   {where}: {self.message}{took}"
            return f"{text}; note: {self.note}" if self.note else text
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"FAIL {where}: {self.message}{fix}"


class _Failure(Exception):
    """A probe's classified failure."""

    def __init__(self, problem: str, message: str, fix: str | None) -> None:
        super().__init__(message)
        self.problem, self.message, self.fix = problem, message, fix


class _ModelEntry(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


_decode_models = msgspec.json.Decoder(_ModelList).decode


async def run_checks(config: Config, gateway: Gateway) -> list[Check]:
    """The database, then every deployment of every model, in config order.

    Remote deployments are probed together; in-process ones one at a time, as each may load
    a model."""
    entries: list[tuple[ModelConfig, DeploymentConfig, Deployment]] = [
        (served.config, dep_config, deployment)
        for served in gateway.models
        if not served.config.base  # its base's deployments are checked once, there
        for dep_config, deployment in zip(
            model_deployments(served.config), served.pool.deployments, strict=True
        )
    ]
    remote = [i for i, (_, dep, _) in enumerate(entries) if backend_scheme(dep.backend) in _REMOTE]
    database, *probed = await asyncio.gather(
        probe_database(config.database.url),
        *(
            probe_remote(model, dep, deployment.label, f"{model.id}/{deployment.name}")
            for model, dep, deployment in (entries[i] for i in remote)
        ),
    )
    results = dict(zip(remote, probed, strict=True))
    for i, (model, _, deployment) in enumerate(entries):
        if i not in results:
            results[i] = await probe_loaded(f"{model.id}/{deployment.name}", deployment)
    return [database, *(results[i] for i in range(len(entries)))]


async def probe_loaded(target: str, deployment: Deployment) -> Check:
    """Start an in-process (or plugin) backend, ask whether it serves, and close it."""
    backend = deployment.backend
    started = time.perf_counter()
    try:
        await backend.start()
        healthy = await backend.health()
    except Exception as exc:
        return Check(
            target=target,
            ok=False,
            backend=deployment.label,
            problem="load_failed",
            message=f"loading failed: {type(exc).__name__}: {exc}",
            fix="check the model file (complete download? a GGUF llama.cpp supports?), "
            "the backend's options, and free memory",
        )
    finally:
        await backend.aclose()
    latency = (time.perf_counter() - started) * 1000
    if not healthy:
        return Check(
            target=target,
            ok=False,
            backend=deployment.label,
            problem="unhealthy",
            message="the backend started but reports it cannot serve",
            fix="check the backend's options and the log above",
        )
    warning, fix = _short_context(backend)
    return Check(
        target=target,
        ok=True,
        backend=deployment.label,
        message="loaded",
        latency_ms=latency,
        warning=warning,
        fix=fix,
    )


def _short_context(backend: object) -> tuple[str | None, str | None]:
    """A warning when a GGUF model runs with less context than it was trained for: agent
    clients' prompts then do not fit (Codex CLI's alone is about 6,400 tokens)."""
    state = backend.state() if isinstance(backend, SelfDescribing) else None
    n_ctx = state.context_length if state else None
    trained = state.trained_context if state else None
    if n_ctx is None or trained is None or n_ctx >= trained:
        return None, None
    return (
        f"its context is {n_ctx} tokens, below the {trained} it was trained for, so longer "
        "prompts get 400 context_length_exceeded (agent clients such as Codex CLI send about "
        "6,200 tokens)",
        f"set models[].context_length (or options.n_ctx) to {trained}, if memory allows "
        "(the KV cache grows with it; see the README)",
    )


def http_options(model: ModelConfig, dep: DeploymentConfig) -> HTTPOptions:
    """A remote deployment's effective options: the model's, the deployment's, its sugar."""
    options = deployment_options(model, dep)
    return msgspec.convert(options, HTTPOptions)  # build_pool validated them already


async def probe_remote(model: ModelConfig, dep: DeploymentConfig, label: str, target: str) -> Check:
    """`GET {base}/models` with the deployment's key and timeouts, classified."""
    options = http_options(model, dep)
    base = dep.backend.rstrip("/")
    probe = _RemoteProbe(
        base,
        options,
        connect_s=options.connect_timeout_s or _DEFAULT_CONNECT_S,
        read_s=model.routing.health_check_timeout_s,
        upstream_model=options.upstream_model or model.id,
    )
    started = time.perf_counter()
    try:
        models = await probe.run()
    except _Failure as failure:
        return Check(
            target=target,
            ok=False,
            backend=label,
            problem=failure.problem,
            message=failure.message,
            fix=failure.fix,
        )
    latency = (time.perf_counter() - started) * 1000
    note = None
    if probe.upstream_model not in models:
        listed = ", ".join(models[:5]) + (", ..." if len(models) > 5 else "")
        note = (
            f"the server does not list model {probe.upstream_model!r} (it lists: "
            f"{listed or 'nothing'}); set upstream_model if it answers 404 for it"
        )
    return Check(
        target=target,
        ok=True,
        backend=label,
        message=f"{len(models)} model(s) listed",
        latency_ms=latency,
        note=note,
    )


class _RemoteProbe:
    """One remote deployment's probe and the follow-up probes that explain its failure."""

    def __init__(
        self,
        base: str,
        options: HTTPOptions,
        *,
        connect_s: float,
        read_s: float,
        upstream_model: str,
    ) -> None:
        self.base = base
        self.options = options
        self.connect_s = connect_s
        self.read_s = read_s
        self.upstream_model = upstream_model
        url = httpx.URL(base)
        self.scheme = url.scheme
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.where = f"{self.host}:{self.port}"

    def _client(self) -> httpx.AsyncClient:
        options = self.options
        api_key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
        api_key = api_key or options.api_key or ""
        headers = dict(options.headers)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.read_s, connect=self.connect_s),
            verify=_verify(options.verify),
            follow_redirects=False,
        )

    async def run(self) -> list[str]:
        """The model ids listed; raises `_Failure` saying what is wrong."""
        async with self._client() as client:
            try:
                response = await client.get(f"{self.base}/models")
            except httpx.HTTPError as exc:
                raise await self._transport_failure(exc) from exc
            return await self._judge(client, response)

    async def _judge(self, client: httpx.AsyncClient, response: httpx.Response) -> list[str]:
        status = response.status_code
        url = f"{self.base}/models"
        if status == 200:
            try:
                return [m.id for m in _decode_models(response.content).data]
            except msgspec.MsgspecError:
                pass
            what = (
                "an HTML page"
                if _is_html(response)
                else f"something that is not a model list ({_snippet(response)!r})"
            )
            raise _Failure(
                "not_openai",
                f"GET {url} answered 200 with {what}: this is not an OpenAI-compatible API",
                await self._base_fix(client)
                or "point the backend at the server's OpenAI-compatible API (its base URL "
                "usually ends in /v1, as llama.cpp's llama-server, vLLM and Ollama serve it)",
            )
        if status in (401, 403):
            raise _Failure(
                "auth_failed",
                f"the server refused the credentials: GET {url} answered {status} "
                f"({_error_text(response)})",
                _auth_fix(self.options),
            )
        if status == 404:
            raise _Failure(
                "wrong_base_path",
                f"GET {url} answered 404: the base URL's path is wrong",
                await self._base_fix(client)
                or (
                    "remove '/v1' from the URL if the server serves /models at its root"
                    if httpx.URL(self.base).path.rstrip("/").endswith("/v1")
                    else "add '/v1' to the URL: OpenAI-compatible servers serve /v1/models"
                ),
            )
        if 300 <= status < 400 and "location" in response.headers:
            location = response.headers["location"]
            raise _Failure(
                "redirect",
                f"GET {url} redirects ({status}) to {location}",
                "use the URL it redirects to as the backend (e.g. https:// instead of http://)",
            )
        if status == 400 and any(text in response.content for text in _PLAIN_TO_TLS_ANSWERS):
            raise self._http_to_tls()
        raise _Failure(
            "http_error",
            f"GET {url} answered {status} ({_error_text(response)})",
            "the server is up but failing: check its log"
            if status >= 500
            else "check that this URL is the server's OpenAI-compatible API",
        )

    async def _base_fix(self, client: httpx.AsyncClient) -> str | None:
        """If another base path lists models, say to use it."""
        for candidate in _other_bases(self.base):
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"{candidate}/models")
                if response.status_code == 200:
                    try:
                        _decode_models(response.content)
                    except msgspec.MsgspecError:
                        continue
                    return f"use {candidate} as the backend URL: it lists the models"
        return None

    async def _transport_failure(self, exc: httpx.HTTPError) -> _Failure:
        chain = list(_causes(exc))
        https = self.scheme == "https"
        if isinstance(exc, httpx.ConnectTimeout):
            if https and await _tcp_connects(self.host, self.port, self.connect_s):
                if await _speaks_plain_http(self.host, self.port, self.connect_s):
                    return self._https_to_plain()
                return _Failure(
                    "tls_handshake_timeout",
                    f"{self.where} accepts connections but did not answer the TLS handshake "
                    f"within {self.connect_s:g} s",
                    "if the server speaks plain HTTP use http://; otherwise it is hung or "
                    "overloaded",
                )
            return _Failure(
                "connect_timeout",
                f"connecting to {self.where} timed out after {self.connect_s:g} s",
                "a firewall is dropping the packets, or the host is wrong or down: check the "
                "address and firewall rules (raise timeouts.connect_s only for a slow network)",
            )
        for cause in chain:
            if isinstance(cause, socket.gaierror):
                return _Failure(
                    "dns_failure",
                    f"cannot resolve the host name {self.host!r} ({cause.strerror})",
                    "check the host name's spelling and this machine's DNS (/etc/hosts, "
                    "/etc/resolv.conf); in Docker use the service name or host.docker.internal",
                )
            if isinstance(cause, ssl.SSLCertVerificationError):
                return self._certificate_failure(cause)
            if isinstance(cause, ssl.SSLError):
                if https and cause.reason in _PLAIN_REASONS:
                    return self._https_to_plain()
                if https and await _speaks_plain_http(self.host, self.port, self.connect_s):
                    return self._https_to_plain()
                return _Failure(
                    "tls_error",
                    f"the TLS handshake with {self.where} failed: {cause.reason or cause}",
                    "check the server's TLS setup (protocol versions, certificate) and "
                    "options.verify",
                )
            if isinstance(cause, ConnectionRefusedError):
                return _Failure(
                    "connection_refused",
                    f"connection refused by {self.where}: nothing listens on that port",
                    "is the server running? is the port right? (a server bound to 127.0.0.1 "
                    "is reachable only from its own machine; a firewall may also refuse)",
                )
            if isinstance(cause, OSError) and cause.errno in (
                errno.ENETUNREACH,
                errno.EHOSTUNREACH,
            ):
                return _Failure(
                    "unreachable",
                    f"{self.where} is unreachable ({cause.strerror})",
                    "check the address, this machine's network and routes, and firewalls",
                )
        if isinstance(exc, httpx.TimeoutException):
            return _Failure(
                "read_timeout",
                f"connected to {self.where}, but GET {self.base}/models got no answer within "
                f"{self.read_s:g} s",
                "the server is hung, overloaded or still loading a model; or this port is a "
                "different service (raise routing.health_check_timeout_s if it is just slow)",
            )
        if not https and await _speaks_tls(self.host, self.port, self.connect_s):
            return self._http_to_tls()
        return _Failure(
            "protocol_error",
            f"{self.where} did not answer HTTP ({type(exc).__name__}: {exc or 'no detail'})",
            "check that this host and port are the OpenAI-compatible server, not another service",
        )

    def _certificate_failure(self, cause: ssl.SSLCertVerificationError) -> _Failure:
        detail = cause.verify_message or str(cause)
        code = cause.verify_code
        if code in _UNKNOWN_CA:
            bundle = self.options.verify
            fix = (
                f"the CA bundle in options.verify ({bundle!r}) did not sign it: point "
                "options.verify at the CA that did"
                if isinstance(bundle, str)
                else 'self-signed or private CA: set "options": {"verify": '
                '"/path/to/ca.pem"} to the CA bundle that signed the server certificate '
                '(or "verify": false, which trusts anyone)'
            )
            return _Failure(
                "tls_unknown_ca",
                f"the certificate of {self.where} is not trusted: {detail}",
                fix,
            )
        if code == _EXPIRED:
            return _Failure(
                "tls_expired",
                f"the certificate of {self.where} has expired",
                "renew the server's certificate (and check this machine's clock)",
            )
        if code == _NOT_YET_VALID:
            return _Failure(
                "tls_not_yet_valid",
                f"the certificate of {self.where} is not valid yet",
                "check this machine's clock and the certificate's notBefore date",
            )
        if code in _NAME_MISMATCH:
            return _Failure(
                "tls_hostname_mismatch",
                f"the certificate of {self.where} is not issued for {self.host!r}: {detail}",
                "use a host name the certificate names (its subjectAltName) in the URL, or "
                f"reissue the certificate with {self.host!r} in its subjectAltName",
            )
        return _Failure(
            "tls_certificate",
            f"the certificate of {self.where} was rejected: {detail}",
            "check the server's certificate chain and options.verify",
        )

    def _https_to_plain(self) -> _Failure:
        return _Failure(
            "https_to_plain_http",
            f"the URL says https:// but {self.where} speaks plain HTTP (wrong version number "
            "in the TLS handshake)",
            f"use http:// in the URL ({_swap_scheme(self.base, 'http')}), or enable TLS on "
            "the server",
        )

    def _http_to_tls(self) -> _Failure:
        return _Failure(
            "http_to_tls",
            f"the URL says http:// but {self.where} speaks TLS (it answered with handshake "
            "bytes or dropped the plain request)",
            f"use https:// in the URL ({_swap_scheme(self.base, 'https')})",
        )


async def probe_database(url: str) -> Check:
    """Whether the database answers, and its schema revision (read-only: nothing created)."""
    shown = make_url(url).render_as_string(hide_password=True)
    unopened = _sqlite_not_opened(url, shown)
    if unopened is not None:
        return unopened
    database = Database(url)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(10):
            revision = await database.revision()
    except Exception as exc:
        refused = any(isinstance(c, ConnectionRefusedError) for c in _causes(exc))
        return Check(
            target="database",
            ok=False,
            backend=shown,
            problem="database_unreachable",
            message=f"cannot read the database: {type(exc).__name__}: {_short(str(exc))}",
            fix="is the database server running and listening there?"
            if refused
            else "check database.url (host, port, user, password, database name) and that "
            "the server accepts this client",
        )
    finally:
        await database.aclose()
    head = head_revision()
    note = (
        None
        if revision == head
        else f"schema at {revision or 'none'}; `clawbot serve` (or `clawbot db upgrade`) "
        f"migrates it to {head}"
    )
    return Check(
        target="database",
        ok=True,
        backend=shown,
        message=f"revision {revision or 'none'}",
        latency_ms=(time.perf_counter() - started) * 1000,
        note=note,
    )


def _sqlite_not_opened(url: str, shown: str) -> Check | None:
    """The check of a SQLite database that is not there to open (opening would create it)."""
    db_url = make_url(url)
    if db_url.get_backend_name() != "sqlite":
        return None
    path = db_url.database or ""
    if path in ("", ":memory:"):
        return Check(
            target="database",
            ok=True,
            backend=shown,
            message="in memory: keys and the audit log do not survive a restart",
        )
    file = Path(path)
    if file.exists():
        return None
    folder = file.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return Check(
            target="database",
            ok=False,
            backend=shown,
            problem="database_unwritable",
            message=f"{folder} does not exist or is not writable, so {file.name} cannot be created",
            fix="create the folder, make it writable by clawbot's user, or change database.url",
        )
    return Check(
        target="database",
        ok=True,
        backend=shown,
        message="no database yet; `clawbot serve` creates it",
    )


def _verify(option: bool | str) -> bool | ssl.SSLContext:
    if isinstance(option, bool):
        return option
    if os.path.isdir(option):
        return ssl.create_default_context(capath=option)
    return ssl.create_default_context(cafile=option)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


async def _tcp_connects(
    host: str, port: int, timeout_s: float, tls: ssl.SSLContext | None = None
) -> bool:
    """Whether a connection (with `tls`, its handshake too) to host:port succeeds."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port, ssl=tls)
    except (OSError, TimeoutError):  # ssl.SSLError is an OSError
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TLS handshake (not verified) with host:port succeeds."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return await _tcp_connects(host, port, timeout_s, context)


async def _speaks_plain_http(host: str, port: int, timeout_s: float) -> bool:
    """Whether host:port answers a plain `GET /` with an HTTP status line."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                head = await reader.read(5)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return head == b"HTTP/"


def _other_bases(base: str) -> list[str]:
    """Base URLs to try when `base` is not the API: cut after `/v1`, without or with `/v1`."""
    url = httpx.URL(base)
    path = url.path.rstrip("/")
    cut = path.find("/v1/")
    paths = [path[: cut + 3]] if cut >= 0 else []  # e.g. …/v1/chat/completions
    if path.endswith("/v1"):
        paths.append(path.removesuffix("/v1"))
    elif cut < 0:
        paths.append(f"{path}/v1")
    return [str(url.copy_with(path=p or "/")).rstrip("/") for p in paths]


def _swap_scheme(base: str, scheme: str) -> str:
    return str(httpx.URL(base).copy_with(scheme=scheme))


def _is_html(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "")
    return "html" in kind or response.content.lstrip()[:1] == b"<"


def _snippet(response: httpx.Response) -> str:
    return _short(response.content.decode(errors="replace"), 80)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("detail"):
            return str(body["detail"])
    return _snippet(response) or "no body"


def _auth_fix(options: HTTPOptions) -> str:
    if options.api_key_env:
        if os.environ.get(options.api_key_env):
            return (
                f"api_key_env {options.api_key_env} is set here but the server rejects its "
                "value: check the key (and that it grants access to /models)"
            )
        fallback = "; api_key was sent instead" if options.api_key else ""
        return (
            f"api_key_env {options.api_key_env} is NOT set in this environment{fallback}: "
            "export it where clawbot runs"
        )
    if options.api_key:
        return (
            "the server rejects the key in api_key: check it (api_key_env keeps it out of the file)"
        )
    return (
        "no key is configured for this deployment: set api_key_env (an environment variable "
        "holding the key) or api_key"
    )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
