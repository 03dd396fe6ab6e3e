"""The gateway's exception tree; `app.api.errors` is the one place it becomes wire JSON.

GatewayError (500 internal_error)
├── InvalidRequest (400 invalid_request_error)
│   ├── UnsupportedParameter (400, code unsupported_parameter)
│   └── ContextLengthExceeded (400, code context_length_exceeded)
├── AuthenticationFailed (401 invalid_api_key)
├── PermissionDenied (403 permission_denied)
│   └── IpNotAllowed (403, code ip_not_allowed)
├── NotFound (404 not_found)
│   └── ModelNotFound (404 model_not_found)
├── PayloadTooLarge (413 request_too_large)
├── ClientClosedRequest (499 client_closed_request: the client went away)
├── RateLimited (429 rate_limit_exceeded, retry-after)
├── UpstreamError (502 upstream_error)
│   └── UpstreamStatusError (the upstream's own 4xx/5xx, relayed)
├── ServiceUnavailable (503 service_unavailable, retry-after)
│   ├── ServerBusy (503 server_busy: no slot, or no memory, in time)
│   └── UpstreamUnavailable (503 upstream_unavailable: connect failure)
└── UpstreamTimeout (504 upstream_timeout)
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error the gateway answers with; carries the OpenAI error fields."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.headers = headers or {}
        """Extra response headers (e.g. the x-ratelimit ones on a 429)."""

    @property
    def status_code(self) -> int:
        """The HTTP status this error is answered with."""
        return self.status

    @property
    def error_type(self) -> str:
        """The OpenAI `error.type` this error is answered with."""
        return self.type


def failure_code(exc: BaseException) -> str:
    """What the audit log calls a failure: the error's code, else its type; anything that is
    not a GatewayError is an `internal_error`."""
    if isinstance(exc, GatewayError):
        return exc.code or exc.error_type
    return "internal_error"


class InvalidRequest(GatewayError):
    """The request is malformed or has a bad parameter."""

    status = 400
    type = "invalid_request_error"
    default_code: ClassVar[str | None] = None


class UnsupportedParameter(InvalidRequest):
    """A parameter is valid OpenAI but this model or backend cannot honour it."""

    default_code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion do not fit the model's context window."""

    default_code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    """Missing, unknown or invalid credentials."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    """Authenticated, but not allowed to do this."""

    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class IpNotAllowed(PermissionDenied):
    """The client's address is outside the configured IP allowlist."""

    default_code = "ip_not_allowed"


class NotFound(GatewayError):
    """The route or object does not exist."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """No configured model has this id or alias."""

    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    """The route exists but not for this HTTP method."""

    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    """The request body exceeds the configured limit."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class ClientClosedRequest(GatewayError):
    """The client disconnected before the answer was ready; nobody receives this."""

    status = 499
    type = "invalid_request_error"
    default_code = "client_closed_request"


class RateLimited(GatewayError):
    """A rate limit or quota was hit; retry after `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The backend failed in a way that is not the client's fault."""

    status = 502
    type = "api_error"
    default_code = "upstream_error"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status; we relay its status and error body."""

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        upstream_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)
        self.upstream_status = upstream_status
        self.upstream_type = upstream_type

    @property
    def status_code(self) -> int:
        """The upstream's status for client errors and 429; 502 for its server errors."""
        return self.upstream_status if 400 <= self.upstream_status < 500 else 502

    @property
    def error_type(self) -> str:
        """The upstream's own error type when it gave one."""
        return self.upstream_type or self.type


class ServiceUnavailable(GatewayError):
    """The gateway cannot serve this right now (starting, overloaded, nothing healthy)."""

    status = 503
    type = "api_error"
    default_code = "service_unavailable"


class ServerBusy(ServiceUnavailable):
    """Every slot is taken and the queue is full, or the wait for a slot (or for memory to
    load a model) ran out."""

    default_code = "server_busy"


class UpstreamUnavailable(ServiceUnavailable):
    """The upstream could not be reached."""

    default_code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    """The upstream did not answer in time."""

    status = 504
    type = "api_error"
    default_code = "upstream_timeout"
