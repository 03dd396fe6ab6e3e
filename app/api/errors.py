"""The one place where exceptions become error JSON: responses and stream events.

Errors are OpenAI-shaped, except on Anthropic's Messages routes, whose clients (the
`anthropic` SDKs, Claude Code) expect Anthropic's shape: same status and headers, the
`error.type` from Anthropic's list.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from app.api.anthropic.protocol import ErrorDetail as AnthropicErrorDetail
from app.api.anthropic.protocol import ErrorResponse as AnthropicErrorResponse
from app.api.scope import exchange_of, request_id_of
from app.errors import GatewayError
from app.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("clawbot.errors")

_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}

# Anthropic documents these; other 4xx are invalid_request_error and other 5xx api_error.
# Its SDKs also know timeout_error (504). Anthropic says "overloaded" with 529; the gateway
# keeps its 503 (clients retry both) but names it the same way.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass(frozen=True, slots=True)
class WireError:
    """An exception, translated: status, body and extra headers."""

    status: int
    body: ErrorResponse
    headers: dict[str, str]


def translate(exc: BaseException, *, log_unknown: bool = True) -> WireError:
    """Map any exception to its wire form; unknown ones are logged and become a 500."""
    headers: dict[str, str] = {}
    if isinstance(exc, GatewayError):
        headers.update(exc.headers)
        if exc.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
            # The openai SDKs read the precise value first.
            headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000)))
        body = ErrorBody(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
        return WireError(exc.status_code, ErrorResponse(error=body), headers)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        err_type, code = _HTTP_CODES.get(
            status, ("api_error" if status >= 500 else "invalid_request_error", None)
        )
        message = exc.detail or "request failed"
        if isinstance(exc, ValidationException) and exc.extra:
            message = f"{message}: {exc.extra}"
        if status == 413:
            message = (
                "request body is larger than the configured limit (model_server.max_body_bytes; "
                "for file uploads, knowledge.max_file_mb)"
            )
        if exc.headers:
            headers.update(exc.headers)
        body = ErrorBody(message=message, type=err_type, param=None, code=code)
        return WireError(status, ErrorResponse(error=body), headers)
    if log_unknown:
        log.error("unhandled error", exc_info=exc)
    body = ErrorBody(
        message="internal server error; the request id identifies it in the gateway's log",
        type="internal_error",
        param=None,
        code="internal_error",
    )
    return WireError(500, ErrorResponse(error=body), headers)


def error_code(exc: BaseException) -> str:
    """What the audit log calls this failure: the error's code, else its type.

    Not logged here: whoever answers the client with this error logs it, once.
    """
    error = translate(exc, log_unknown=False).body.error
    return error.code or error.type


def encode_error_event(exc: BaseException) -> bytes:
    """The JSON of an error, for an SSE `data:` event after the first byte was sent."""
    return msgspec.json.encode(translate(exc).body)


def anthropic_error_type(status: int) -> str:
    """Anthropic's `error.type` for an HTTP status."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    return _ANTHROPIC_TYPES.get(status, default)


def _anthropic_body(wire: WireError) -> AnthropicErrorResponse:
    detail = AnthropicErrorDetail(
        type=anthropic_error_type(wire.status), message=wire.body.error.message
    )
    return AnthropicErrorResponse(error=detail)


def anthropic_error_event(exc: Exception) -> tuple[str, AnthropicErrorResponse]:
    """The `error` event that ends an Anthropic stream failing after its first byte."""
    return "error", _anthropic_body(translate(exc))


def _respond(request: Request[Any, Any, Any], wire: WireError, body: Any) -> Response[bytes]:
    wire.headers["x-request-id"] = request_id_of(request.scope)
    exchange = exchange_of(request.scope)
    if exchange is not None:
        exchange.error_type = wire.body.error.code or wire.body.error.type
    return Response(
        content=msgspec.json.encode(body),
        status_code=wire.status,
        media_type="application/json",
        headers=wire.headers,
    )


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar exception handler for every exception type."""
    wire = translate(exc)
    return _respond(request, wire, wire.body)


def anthropic_error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar exception handler of the Messages routes: Anthropic-shaped errors."""
    wire = translate(exc)
    return _respond(request, wire, _anthropic_body(wire))
