"""Small helpers every backend shares: ids, timestamps, option parsing."""

from __future__ import annotations

import secrets
import time
from typing import TypeVar

import msgspec

from app.config import ConfigError
from backends.base import BackendSpec

OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-…`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, for `created`."""
    return int(time.time())


def read_options(spec: BackendSpec, options_type: type[OptionsT]) -> OptionsT:
    """Validate the model's `options` against a backend's options Struct."""
    try:
        return msgspec.convert(spec.model.options, type=options_type)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("$.", "options.").replace("`$`", "`options`")
        raise ConfigError(f"invalid backend options: {text}") from exc


def first_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop sequence starts in `text`, or -1."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(hits) if hits else -1


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
