"""The gateway's own OpenAPI document (GET /openapi.json) and a docs page that renders it
(GET /docs), both served by clawbot itself: the machines it runs on may have no internet, so
the page loads nothing from elsewhere.

Routes decode their bodies themselves (`app.api.bodies`), so Litestar cannot see their
schemas; `OPERATIONS` names each public route's request and answer Structs, and msgspec makes
their JSON Schemas. A test holds `OPERATIONS` to the routes the app serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import msgspec
from litestar import Response, get
from litestar.handlers import HTTPRouteHandler

from app import __version__
from app.api.admin.keys import KeyCreate, KeyUpdate, Rotate
from app.api.anthropic.protocol import (
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessagesRequest,
)
from app.api.anthropic.protocol import ErrorResponse as AnthropicErrorResponse
from app.api.knowledge import protocol as kb
from app.api.pages import static_page
from app.api.responses.protocol import CreateResponse, ResponseObject
from app.core.reload import ReloadReport
from app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    FimCompletionRequest,
    Model,
    ModelList,
    RerankRequest,
    RerankResponse,
)

Access = Literal["key", "master", "none"]


@dataclass(frozen=True, slots=True)
class Operation:
    """One public route, as the document describes it."""

    method: Literal["get", "post", "patch", "delete"]
    path: str
    """OpenAPI's form: `/v1/models/{model_id}`."""
    summary: str
    tag: str
    request: type | None = None
    answer: type | None = None
    """None: a JSON object the document does not detail."""
    events: type | None = None
    """The payload of each SSE event when the request asks for `stream: true`."""
    access: Access = "key"
    status: int = 200
    text: bool = False
    """Answers plain text (Prometheus' format), not JSON."""
    anthropic: bool = False
    """Errors in Anthropic's shape."""
    upload: bool = False
    """The body is multipart/form-data with a `file` and a `purpose` (the Files API)."""


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/v1/chat/completions",
        "Create a chat completion",
        "OpenAI",
        ChatCompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
    ),
    Operation(
        "post",
        "/v1/completions",
        "Create a text completion",
        "OpenAI",
        CompletionRequest,
        Completion,
        Completion,
    ),
    Operation(
        "post",
        "/v1/embeddings",
        "Create embeddings",
        "OpenAI",
        EmbeddingRequest,
        EmbeddingList,
    ),
    Operation(
        "post",
        "/v1/fim/completions",
        "Fill in the middle (Mistral's shape)",
        "OpenAI",
        FimCompletionRequest,
        Completion,
        Completion,
    ),
    Operation(
        "post",
        "/v1/rerank",
        "Rerank documents against a query (Cohere's and Jina's shape)",
        "OpenAI",
        RerankRequest,
        RerankResponse,
    ),
    Operation("get", "/v1/models", "List the served models", "OpenAI", answer=ModelList),
    Operation("get", "/v1/models/{model_id}", "One model by id or alias", "OpenAI", answer=Model),
    Operation(
        "post",
        "/v1/responses",
        "Create a model response (OpenAI's Responses API)",
        "Responses",
        CreateResponse,
        ResponseObject,
    ),
    Operation(
        "post",
        "/v1/messages",
        "Create a message (Anthropic's Messages API)",
        "Anthropic",
        MessagesRequest,
        Message,
        anthropic=True,
    ),
    Operation(
        "post",
        "/v1/messages/count_tokens",
        "Count a message's input tokens",
        "Anthropic",
        CountTokensRequest,
        CountTokensResponse,
        anthropic=True,
    ),
    Operation("post", "/v1/files", "Upload a file", "Files", answer=kb.FileObject, upload=True),
    Operation("get", "/v1/files", "List files", "Files", answer=kb.FileList),
    Operation("get", "/v1/files/{file_id}", "One file", "Files", answer=kb.FileObject),
    Operation("delete", "/v1/files/{file_id}", "Delete a file", "Files", answer=kb.Deleted),
    Operation("get", "/v1/files/{file_id}/content", "A file's bytes", "Files"),
    Operation(
        "post",
        "/v1/vector_stores",
        "Create a vector store",
        "Vector stores",
        kb.CreateVectorStore,
        kb.VectorStoreObject,
    ),
    Operation(
        "get", "/v1/vector_stores", "List vector stores", "Vector stores", answer=kb.VectorStoreList
    ),
    Operation(
        "get",
        "/v1/vector_stores/{vector_store_id}",
        "One vector store",
        "Vector stores",
        answer=kb.VectorStoreObject,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}",
        "Modify a vector store",
        "Vector stores",
        kb.UpdateVectorStore,
        kb.VectorStoreObject,
    ),
    Operation(
        "delete",
        "/v1/vector_stores/{vector_store_id}",
        "Delete a vector store",
        "Vector stores",
        answer=kb.Deleted,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}/search",
        "Search a vector store (full text and vectors, fused)",
        "Vector stores",
        kb.SearchRequest,
        kb.SearchResultsPage,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}/files",
        "Add a file to a vector store",
        "Vector stores",
        kb.CreateVectorStoreFile,
        kb.VectorStoreFileObject,
    ),
    Operation(
        "get",
        "/v1/vector_stores/{vector_store_id}/files",
        "List a vector store's files",
        "Vector stores",
        answer=kb.VectorStoreList,
    ),
    Operation(
        "get",
        "/v1/vector_stores/{vector_store_id}/files/{file_id}",
        "One file of a vector store",
        "Vector stores",
        answer=kb.VectorStoreFileObject,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}/files/{file_id}",
        "Change a vector store file's attributes",
        "Vector stores",
        kb.UpdateVectorStoreFile,
        kb.VectorStoreFileObject,
    ),
    Operation(
        "delete",
        "/v1/vector_stores/{vector_store_id}/files/{file_id}",
        "Take a file out of a vector store",
        "Vector stores",
        answer=kb.Deleted,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}/file_batches",
        "Add files to a vector store in a batch",
        "Vector stores",
        kb.CreateFileBatch,
        kb.FileBatchObject,
    ),
    Operation(
        "get",
        "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}",
        "One file batch",
        "Vector stores",
        answer=kb.FileBatchObject,
    ),
    Operation(
        "post",
        "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel",
        "Cancel a file batch",
        "Vector stores",
        answer=kb.FileBatchObject,
    ),
    Operation(
        "get",
        "/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files",
        "List a file batch's files",
        "Vector stores",
        answer=kb.VectorStoreList,
    ),
    Operation("post", "/v1/auth/token", "Exchange an API key for a short-lived token", "Keys"),
    Operation(
        "post", "/admin/keys", "Create an API key", "Admin", KeyCreate, None, None, "master", 201
    ),
    Operation("get", "/admin/keys", "List API keys", "Admin", access="master"),
    Operation("get", "/admin/keys/{key_id}", "One API key", "Admin", access="master"),
    Operation(
        "patch", "/admin/keys/{key_id}", "Change an API key", "Admin", KeyUpdate, access="master"
    ),
    Operation("post", "/admin/keys/{key_id}/revoke", "Revoke an API key", "Admin", access="master"),
    Operation(
        "post",
        "/admin/keys/{key_id}/rotate",
        "Rotate an API key",
        "Admin",
        Rotate,
        None,
        None,
        "master",
        201,
    ),
    Operation("get", "/admin/usage", "Token usage by key and model", "Admin", access="master"),
    Operation("get", "/admin/usage/series", "Token usage over time", "Admin", access="master"),
    Operation("get", "/admin/errors", "Recent failed requests", "Admin", access="master"),
    Operation(
        "get", "/admin/backends", "Every deployment's health and load", "Admin", access="master"
    ),
    Operation(
        "post",
        "/admin/reload",
        "Reload clawbot.json",
        "Admin",
        answer=ReloadReport,
        access="master",
    ),
    Operation("get", "/health", "Liveness", "Operations", access="none"),
    Operation("get", "/ready", "Readiness: every model loaded", "Operations", access="none"),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics (text format)",
        "Operations",
        access="none",
        text=True,
    ),
)

_REF = "#/components/schemas/{name}"
_ERRORS = {
    400: "Bad request",
    401: "No or wrong key",
    403: "Not allowed",
    404: "Not found",
    429: "Rate limited",
    503: "Busy or unavailable",
}


def _schemas() -> tuple[dict[type, dict[str, Any]], dict[str, Any]]:
    """Each Struct's reference, and the components they point into."""
    types = sorted(
        {t for op in OPERATIONS for t in (op.request, op.answer, op.events) if t is not None}
        | {ErrorResponse, AnthropicErrorResponse},
        key=lambda t: f"{t.__module__}.{t.__qualname__}",
    )
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    return dict(zip(types, refs, strict=True)), components


def _operation(op: Operation, refs: dict[type, dict[str, Any]]) -> dict[str, Any]:
    content: dict[str, Any] = {
        "application/json": {"schema": refs[op.answer] if op.answer else {"type": "object"}}
    }
    if op.events is not None:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "SSE events, each `data:` one of:"},
            "x-event-schema": refs[op.events],
        }
    if op.text:
        content = {"text/plain": {"schema": {"type": "string"}}}
    error = {
        "application/json": {
            "schema": refs[AnthropicErrorResponse if op.anthropic else ErrorResponse]
        }
    }
    responses: dict[str, Any] = {str(op.status): {"description": "Success", "content": content}}
    for status, text in _ERRORS.items():
        responses[str(status)] = {"description": text, "content": error}
    words = op.path.strip("/").replace("{", "").replace("}", "").replace("/", "_")
    body: dict[str, Any] = {
        "operationId": f"{op.method}_{words}",
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
        "security": [] if op.access == "none" else [{"bearer": []}, {"apiKey": []}],
    }
    if op.access == "master":
        body["description"] = "Needs the master key (`auth.api_key`)."
    params = [part[1:-1] for part in op.path.split("/") if part.startswith("{")]
    if params:
        body["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in params
        ]
    if op.request is not None:
        body["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.request]}},
        }
    if op.upload:
        form = {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "contentMediaType": "application/octet-stream"},
                "purpose": {"type": "string"},
            },
        }
        body["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": form}},
        }
    return body


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every public route."""
    refs, components = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clawbot",
            "version": __version__,
            "description": "A local AI assistant gateway: OpenAI and Anthropic wire APIs over "
            "local and remote models, with keys, limits and an audit log.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


@cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


@get("/openapi.json", include_in_schema=False)
async def openapi_json() -> Response[bytes]:
    """The OpenAPI document."""
    return Response(content=_encoded(), media_type="application/json")


DOCS_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}
"""The files the docs page loads from /docs/, with their media types."""


def docs_routes() -> list[HTTPRouteHandler]:
    """The docs page, rendering /openapi.json with its own script and style sheet (read once)."""
    return static_page("app.api", "docs", ["/docs"], "index.html", DOCS_ASSETS, "docs")
