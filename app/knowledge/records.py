"""Who owns what, and the checks on what clients attach to objects (metadata, attributes,
chunking strategies, search filters), with OpenAI's limits and error wording."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Principal:
    """Whoever calls: objects belong to the key that made them; the master key (and everyone,
    with authentication off) sees all of them."""

    owner: str
    """The key id ("master" for the master key, "" with authentication off)."""
    sees_all: bool

    @classmethod
    def of(cls, key_id: str | None) -> Principal:
        """The principal of an authenticated key id (None: authentication is off)."""
        if key_id is None:
            return cls(owner="", sees_all=True)
        return cls(owner=key_id, sees_all=key_id == "master")

    def may_see(self, owner: str) -> bool:
        """Whether an object of `owner` exists for this caller (404 otherwise, not 403)."""
        return self.sees_all or owner == self.owner


def new_id(prefix: str) -> str:
    """An object id the way OpenAI writes them (`file-…`, `vs_…`), hex so it is path-safe."""
    return f"{prefix}{secrets.token_hex(12)}"


def check_metadata(metadata: Mapping[str, Any] | None, param: str = "metadata") -> None:
    """Up to 16 pairs, keys of at most 64 characters, string values of at most 512."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise InvalidRequest(f"{param} has {len(metadata)} pairs; at most 16", param=param)
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequest(f"{param} key {key[:70]!r}… is over 64 characters", param=param)
        if not isinstance(value, str) or len(value) > 512:
            raise InvalidRequest(
                f"{param}[{key!r}] must be a string of at most 512 characters", param=param
            )


def check_attributes(attributes: Mapping[str, Any] | None, param: str = "attributes") -> None:
    """Up to 16 keys of at most 64 characters; strings (at most 512), numbers or booleans."""
    if attributes is None:
        return
    if len(attributes) > 16:
        raise InvalidRequest(f"{param} has {len(attributes)} keys; at most 16", param=param)
    for key, value in attributes.items():
        if len(key) > 64:
            raise InvalidRequest(f"{param} key {key[:70]!r}… is over 64 characters", param=param)
        ok = isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 512)
        if not ok:
            raise InvalidRequest(
                f"{param}[{key!r}] must be a string (at most 512 characters), a number or a "
                "boolean",
                param=param,
            )


def resolve_chunking(
    strategy: Mapping[str, Any] | None, *, size: int, overlap: int, param: str
) -> dict[str, int]:
    """A chunking strategy as stored: `auto` (or none) is this gateway's default sizes;
    `static` is checked against OpenAI's bounds."""
    kind = strategy.get("type") if strategy else "auto"
    if kind == "auto":
        return {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}
    if kind != "static" or strategy is None:
        raise InvalidRequest(f"{param}.type must be 'auto' or 'static', not {kind!r}", param=param)
    static = strategy.get("static")
    if not isinstance(static, Mapping):
        raise InvalidRequest(f"{param}.static is required for a static strategy", param=param)
    most = static.get("max_chunk_size_tokens")
    shared = static.get("chunk_overlap_tokens")
    if not isinstance(most, int) or isinstance(most, bool) or not 100 <= most <= 4096:
        raise InvalidRequest(
            f"{param}.static.max_chunk_size_tokens must be an integer from 100 to 4096",
            param=f"{param}.static.max_chunk_size_tokens",
        )
    if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared <= most // 2:
        raise InvalidRequest(
            f"{param}.static.chunk_overlap_tokens must be an integer from 0 to half of "
            f"max_chunk_size_tokens ({most // 2})",
            param=f"{param}.static.chunk_overlap_tokens",
        )
    return {"max_chunk_size_tokens": most, "chunk_overlap_tokens": shared}


_COMPARISONS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"})


def check_filter(node: Any, param: str = "filters") -> None:
    """A comparison `{type, key, value}` or a compound `{type: and|or, filters: [...]}`."""
    if not isinstance(node, Mapping):
        raise InvalidRequest(f"{param} must be an object", param=param)
    kind = node.get("type")
    if kind in ("and", "or"):
        children = node.get("filters")
        if not isinstance(children, list) or not children:
            raise InvalidRequest(f"{param}.filters must be a non-empty array", param=param)
        for i, child in enumerate(children):
            check_filter(child, f"{param}.filters[{i}]")
        return
    if kind not in _COMPARISONS:
        raise InvalidRequest(
            f"{param}.type must be one of {sorted(_COMPARISONS | {'and', 'or'})}, not {kind!r}",
            param=param,
        )
    if not isinstance(node.get("key"), str):
        raise InvalidRequest(f"{param}.key must be a string", param=param)
    value = node.get("value")
    if kind in ("in", "nin"):
        if not isinstance(value, list):
            raise InvalidRequest(f"{param}.value must be an array for {kind!r}", param=param)
    elif not isinstance(value, str | int | float | bool):
        raise InvalidRequest(f"{param}.value must be a string, number or boolean", param=param)


def matches(node: Mapping[str, Any], attributes: Mapping[str, Any] | None) -> bool:
    """Whether a file's attributes pass a (checked) filter. A missing key matches only `ne`
    and `nin`; ordering across types (a string against a number) never matches."""
    kind = node["type"]
    if kind == "and":
        return all(matches(child, attributes) for child in node["filters"])
    if kind == "or":
        return any(matches(child, attributes) for child in node["filters"])
    attrs = attributes or {}
    key, value = node["key"], node["value"]
    if key not in attrs:
        return kind in ("ne", "nin")
    have = attrs[key]
    if kind == "eq":
        return bool(have == value)
    if kind == "ne":
        return bool(have != value)
    if kind == "in":
        return have in value
    if kind == "nin":
        return have not in value
    numeric = (int, float)
    comparable = (isinstance(have, numeric) and isinstance(value, numeric)) or (
        isinstance(have, str) and isinstance(value, str)
    )
    if not comparable or isinstance(have, bool) or isinstance(value, bool):
        return False
    if kind == "gt":
        return bool(have > value)
    if kind == "gte":
        return bool(have >= value)
    if kind == "lt":
        return bool(have < value)
    return bool(have <= value)
