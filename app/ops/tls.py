"""TLS served directly: the server's SSLContext, built from `model_server`'s settings."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

from app.config import ConfigError, ModelServer

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(server: ModelServer) -> ssl.SSLContext:
    """The context serving `tls_cert` / `tls_key` to clients of at least `tls_min_version`.

    Raises ConfigError naming the key when a file cannot be read, is not PEM, or the key is
    not the certificate's.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[server.tls_min_version]
    context.set_alpn_protocols(["http/1.1"])
    cert, key = server.tls_cert, server.tls_key
    _check_certificate(cert)

    def encrypted() -> bytes:
        raise ConfigError(
            f"model_server.tls_key: {key!r} is encrypted; give clawbot an unencrypted key "
            f"(openssl pkey -in {key} -out plain.pem) readable only by its user"
        )

    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"model_server.tls_key: {key!r} is not the private key of the certificate in "
                f"model_server.tls_cert ({cert!r})"
            ) from exc
        raise ConfigError(
            f"model_server.tls_key: {key!r} holds no PEM private key ({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"model_server.tls_key: cannot read {key!r}: {exc.strerror}") from exc
    return context


def _check_certificate(cert: str) -> None:
    """Load the certificate alone first, so a bad one is not blamed on the key."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"model_server.tls_cert: {cert!r} holds no PEM certificate ({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"model_server.tls_cert: cannot read {cert!r}: {exc.strerror}") from exc


def _uvicorn_factory(server: ModelServer, _config: Any, _default: Any) -> ssl.SSLContext:
    return server_ssl_context(server)


def ssl_context_factory(server: ModelServer) -> Callable[[Any, Any], ssl.SSLContext] | None:
    """uvicorn's `ssl_context_factory` for `server`, None for plain http.

    Builds the context once now, so a bad certificate is a ConfigError before serving; the
    factory is picklable, so worker processes build their own.
    """
    if server.protocol != "https":
        return None
    server_ssl_context(server)
    return partial(_uvicorn_factory, server)
