"""Validate JSON objects against component schemas of OpenAI's official OpenAPI spec."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

_SPEC_ENV = "CLAWBOT_OPENAPI_SPEC"

_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "schemas"}
)
_DATA_KEYWORDS = frozenset({"const", "default", "enum", "example", "examples"})
_NULL_MARKER_KEYS = frozenset({"nullable", "description", "title"})
_MAX_REPR = 400


def _spec_path() -> Path:
    """$CLAWBOT_OPENAPI_SPEC, else ../shared/openai-openapi.yaml beside the repository."""
    override = os.environ.get(_SPEC_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "openai-openapi.yaml"


def schema_names() -> frozenset[str]:
    """Names of every schema under components/schemas."""
    return frozenset(_spec()["components"]["schemas"])


def validate(schema_name: str, instance: object) -> None:
    """Raise AssertionError naming the failing path unless instance matches the named schema."""
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    error = best_match(errors)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    raise AssertionError(
        f"{schema_name} at {error.json_path}: {_shorten(error.message)}{more}\n"
        f"  schema path: {'/'.join(map(str, error.absolute_schema_path))}\n"
        f"  instance: {_shorten(repr(instance))}"
    )


@functools.cache
def _spec() -> dict[str, Any]:
    """The whole spec, loaded once, with OpenAPI 3.0 idioms rewritten for JSON Schema 2020-12."""
    path = _spec_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"OpenAI OpenAPI spec not found at {path}; set {_SPEC_ENV} to its path"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as stream:
        document = yaml.load(stream, Loader=loader)
    normalized = _normalize(document)
    if not isinstance(normalized, dict):
        raise TypeError(f"{path} is not an OpenAPI document")
    return normalized


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    """A validator for one component schema, resolving $refs against the whole spec."""
    if schema_name not in schema_names():
        raise KeyError(f"no schema {schema_name!r} under components/schemas in {_spec_path()}")
    uri = _spec_path().resolve().as_uri()
    registry: Registry[Any] = Registry().with_resource(uri, DRAFT202012.create_resource(_spec()))
    return Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/{schema_name}"}, registry=registry
    )


def _normalize(node: object) -> object:
    """Copy of node with `nullable` and boolean exclusive bounds turned into 2020-12 keywords."""
    if isinstance(node, list):
        return [_normalize(item) for item in node]
    if not isinstance(node, dict):
        return node
    nullable = node.get("nullable") is True
    out: dict[str, object] = {}
    for key, value in node.items():
        if key == "nullable":
            continue
        if key in _DATA_KEYWORDS or key.startswith("x-"):
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _normalize(schema) for name, schema in value.items()}
        elif key == "allOf" and isinstance(value, list):
            members = [member for member in value if not _is_null_marker(member)]
            nullable = nullable or len(members) < len(value)
            if members:
                out[key] = _normalize(members)
        else:
            out[key] = _normalize(value)
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(exclusive)
        if isinstance(flag, bool):
            del out[exclusive]
            if flag and bound in out:
                out[exclusive] = out.pop(bound)
    return {"anyOf": [out, {"type": "null"}]} if nullable else out


def _is_null_marker(member: object) -> bool:
    """Whether an allOf member only says `nullable: true` (3.0's way to make a $ref nullable)."""
    return (
        isinstance(member, dict)
        and member.get("nullable") is True
        and member.keys() <= _NULL_MARKER_KEYS
    )


def _shorten(text: str) -> str:
    """Text cut to a readable length."""
    return text if len(text) <= _MAX_REPR else f"{text[: _MAX_REPR - 3]}..."
