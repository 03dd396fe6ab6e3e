"""Request bodies decoded into wire Structs; decoding errors name the bad parameter."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from app.errors import InvalidRequest

T = TypeVar("T")

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _param(exc: msgspec.ValidationError, prefix: str = "") -> tuple[str, str | None]:
    """msgspec's message and the OpenAI-style `param` it points at (under `prefix`)."""
    text = str(exc)
    match = _AT.search(text)
    path = (prefix + (match.group("path") if match else "")).lstrip(".")
    message = text[: match.start()] if match else text
    missing = _MISSING.match(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return message, path or None


def convert(value: object, type_: type[T], param: str) -> T:
    """`msgspec.convert` of a part of a body found at `param`; errors name the full path
    (`input[2].call_id`)."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        message, path = _param(exc, param)
        raise InvalidRequest(f"invalid request: {message} (at '{path}')", param=path) from exc


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON request body into `type_`, or raise a 400 naming the bad parameter."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        message, param = _param(exc)
        where = f" (at '{param}')" if param else ""
        raise InvalidRequest(f"invalid request: {message}{where}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
