"""The Vector Stores API: stores, their files, file batches, and search."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from app.api.bodies import decode_body
from app.api.knowledge.common import admitted, page_args, unix
from app.api.knowledge.protocol import (
    ChunkingStrategyObject,
    ChunkingStrategyParam,
    CreateFileBatch,
    CreateVectorStore,
    CreateVectorStoreFile,
    Deleted,
    ExpiresAfter,
    FileBatchObject,
    FileCountsObject,
    LastError,
    SearchContent,
    SearchRequest,
    SearchResult,
    SearchResultsPage,
    StaticChunking,
    UpdateVectorStore,
    UpdateVectorStoreFile,
    VectorStoreFileObject,
    VectorStoreList,
    VectorStoreObject,
)
from app.api.replies import json_response
from app.core.gateway import Gateway
from app.errors import InvalidRequest
from app.knowledge.schema import VectorStoreFile
from app.knowledge.search import Query
from app.knowledge.stores import BatchView, FileCounts, FileSpec, NewStore, StoreEdit, StoreView


def _counts(counts: FileCounts) -> FileCountsObject:
    return FileCountsObject(
        in_progress=counts.in_progress,
        completed=counts.completed,
        failed=counts.failed,
        cancelled=counts.cancelled,
        total=counts.total,
    )


def store_object(view: StoreView) -> VectorStoreObject:
    """The VectorStore object of a store."""
    store = view.store
    expiry = store.expires_after
    return VectorStoreObject(
        id=store.id,
        created_at=unix(store.created_at) or 0,
        name=store.name or "",
        usage_bytes=view.usage_bytes,
        file_counts=_counts(view.counts),
        status=view.status,  # type: ignore[arg-type]
        expires_after=msgspec.convert(expiry, ExpiresAfter) if expiry else msgspec.UNSET,
        expires_at=unix(store.expires_at),
        last_active_at=unix(store.last_active_at),
        metadata=dict(store.meta or {}),
        embedding_model=store.embedding_model,
    )


def store_file_object(row: VectorStoreFile) -> VectorStoreFileObject:
    """The VectorStoreFile object of a store's file."""
    error = row.last_error
    return VectorStoreFileObject(
        id=row.file_id,
        usage_bytes=row.usage_bytes,
        created_at=unix(row.created_at) or 0,
        vector_store_id=row.store_id,
        status=row.status,  # type: ignore[arg-type]
        last_error=LastError(code=error["code"], message=error["message"]) if error else None,
        chunking_strategy=ChunkingStrategyObject(static=StaticChunking(**row.chunking)),
        attributes=dict(row.attributes or {}),
    )


def batch_object(view: BatchView) -> FileBatchObject:
    """The FileBatch object of a batch."""
    return FileBatchObject(
        id=view.batch.id,
        created_at=unix(view.batch.created_at) or 0,
        vector_store_id=view.batch.store_id,
        status=view.status,  # type: ignore[arg-type]
        file_counts=_counts(view.counts),
    )


def _listing(items: list[Any], has_more: bool) -> VectorStoreList:
    return VectorStoreList(
        data=items,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
        has_more=has_more,
    )


def _strategy(param: ChunkingStrategyParam | None) -> dict[str, Any] | None:
    return None if param is None else msgspec.to_builtins(param)


# -- stores --------------------------------------------------------------------------------


@post("/v1/vector_stores", status_code=200)
async def create_store(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Create a vector store, optionally with files to ingest."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), CreateVectorStore)
    new = NewStore(
        name=body.name,
        metadata=body.metadata,
        expires_after=msgspec.to_builtins(body.expires_after) if body.expires_after else None,
        files=[FileSpec(file_id=f) for f in body.file_ids],
        chunking_strategy=_strategy(body.chunking_strategy),
    )
    return json_response(store_object(await kb.stores.create(principal, new)))


@get("/v1/vector_stores")
async def list_stores(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """The caller's vector stores."""
    kb, principal = await admitted(request, gateway)
    page = await kb.stores.page(principal, **page_args(request))
    return json_response(_listing([store_object(v) for v in page.items], page.has_more))


@get("/v1/vector_stores/{vector_store_id:str}")
async def retrieve_store(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """One vector store."""
    kb, principal = await admitted(request, gateway)
    return json_response(store_object(await kb.stores.view(principal, vector_store_id)))


@post("/v1/vector_stores/{vector_store_id:str}", status_code=200)
async def modify_store(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """Rename a store, change its metadata or expiry."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), UpdateVectorStore)
    edit = StoreEdit(name=body.name, metadata=body.metadata)
    if body.expires_after is None:
        edit.clear_expiry = True
    elif body.expires_after is not msgspec.UNSET:
        edit.expires_after = msgspec.to_builtins(body.expires_after)
    return json_response(store_object(await kb.stores.modify(principal, vector_store_id, edit)))


@delete("/v1/vector_stores/{vector_store_id:str}", status_code=200)
async def delete_store(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """Delete a store (its files stay in the Files API)."""
    kb, principal = await admitted(request, gateway)
    await kb.stores.delete(principal, vector_store_id)
    kb.cache.forget(vector_store_id)
    return json_response(Deleted(id=vector_store_id, object="vector_store.deleted"))


@post("/v1/vector_stores/{vector_store_id:str}/search", status_code=200)
async def search_store(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """Hybrid search: full text and vectors, fused; `filters` on file attributes."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), SearchRequest)
    queries = [body.query] if isinstance(body.query, str) else body.query
    if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise InvalidRequest("query must be a non-empty string (or strings)", param="query")
    options = body.ranking_options
    results = await kb.searcher.search(
        principal,
        [vector_store_id],
        Query(
            text=" ".join(queries),
            max_num_results=body.max_num_results,
            filters=body.filters,
            score_threshold=options.score_threshold if options else 0.0,
            rerank=options is None or options.ranker != "none",
        ),
    )
    return json_response(
        SearchResultsPage(
            search_query=queries,
            data=[
                SearchResult(
                    file_id=r.file_id,
                    filename=r.filename,
                    score=min(1.0, max(0.0, r.score)),
                    attributes=dict(r.attributes),
                    content=[SearchContent(text=r.text)],
                )
                for r in results
            ],
        )
    )


# -- files of a store ----------------------------------------------------------------------


@post("/v1/vector_stores/{vector_store_id:str}/files", status_code=200)
async def add_store_file(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """Add a file to a store (ingested in the background)."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), CreateVectorStoreFile)
    spec = FileSpec(body.file_id, body.attributes, _strategy(body.chunking_strategy))
    return json_response(
        store_file_object(await kb.stores.add_file(principal, vector_store_id, spec))
    )


@get("/v1/vector_stores/{vector_store_id:str}/files")
async def list_store_files(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """A store's files (`filter` by status)."""
    kb, principal = await admitted(request, gateway)
    page = await kb.stores.list_files(
        principal, vector_store_id, status=request.query_params.get("filter"), **page_args(request)
    )
    return json_response(_listing([store_file_object(r) for r in page.items], page.has_more))


@get("/v1/vector_stores/{vector_store_id:str}/files/{file_id:str}")
async def retrieve_store_file(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    file_id: FromPath[str],
) -> Response[bytes]:
    """One file of a store, with its ingestion status."""
    kb, principal = await admitted(request, gateway)
    return json_response(
        store_file_object(await kb.stores.get_file(principal, vector_store_id, file_id))
    )


@post("/v1/vector_stores/{vector_store_id:str}/files/{file_id:str}", status_code=200)
async def update_store_file(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    file_id: FromPath[str],
) -> Response[bytes]:
    """Replace a store file's attributes."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), UpdateVectorStoreFile)
    row = await kb.stores.update_file(principal, vector_store_id, file_id, body.attributes)
    return json_response(store_file_object(row))


@delete("/v1/vector_stores/{vector_store_id:str}/files/{file_id:str}", status_code=200)
async def delete_store_file(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    file_id: FromPath[str],
) -> Response[bytes]:
    """Take a file out of a store (the file itself stays)."""
    kb, principal = await admitted(request, gateway)
    await kb.stores.remove_file(principal, vector_store_id, file_id)
    return json_response(Deleted(id=file_id, object="vector_store.file.deleted"))


# -- batches -------------------------------------------------------------------------------


@post("/v1/vector_stores/{vector_store_id:str}/file_batches", status_code=200)
async def create_batch(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
) -> Response[bytes]:
    """Add several files at once."""
    kb, principal = await admitted(request, gateway)
    body = decode_body(await request.body(), CreateFileBatch)
    if body.file_ids and body.files:
        raise InvalidRequest("give either file_ids or files, not both", param="files")
    specs = [FileSpec(f, body.attributes) for f in body.file_ids] + [
        FileSpec(f.file_id, f.attributes or body.attributes, _strategy(f.chunking_strategy))
        for f in body.files
    ]
    view = await kb.stores.create_batch(
        principal, vector_store_id, specs, _strategy(body.chunking_strategy)
    )
    return json_response(batch_object(view))


@get("/v1/vector_stores/{vector_store_id:str}/file_batches/{batch_id:str}")
async def retrieve_batch(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    batch_id: FromPath[str],
) -> Response[bytes]:
    """A batch's status and counts."""
    kb, principal = await admitted(request, gateway)
    return json_response(batch_object(await kb.stores.batch(principal, vector_store_id, batch_id)))


@post("/v1/vector_stores/{vector_store_id:str}/file_batches/{batch_id:str}/cancel", status_code=200)
async def cancel_batch(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    batch_id: FromPath[str],
) -> Response[bytes]:
    """Cancel the batch's files not yet ingested."""
    kb, principal = await admitted(request, gateway)
    return json_response(
        batch_object(await kb.stores.cancel_batch(principal, vector_store_id, batch_id))
    )


@get("/v1/vector_stores/{vector_store_id:str}/file_batches/{batch_id:str}/files")
async def list_batch_files(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    vector_store_id: FromPath[str],
    batch_id: FromPath[str],
) -> Response[bytes]:
    """A batch's files."""
    kb, principal = await admitted(request, gateway)
    await kb.stores.batch(principal, vector_store_id, batch_id)
    page = await kb.stores.list_files(
        principal,
        vector_store_id,
        status=request.query_params.get("filter"),
        batch_id=batch_id,
        **page_args(request),
    )
    return json_response(_listing([store_file_object(r) for r in page.items], page.has_more))


ROUTES = [
    create_store,
    list_stores,
    retrieve_store,
    modify_store,
    delete_store,
    search_store,
    add_store_file,
    list_store_files,
    retrieve_store_file,
    update_store_file,
    delete_store_file,
    create_batch,
    retrieve_batch,
    cancel_batch,
    list_batch_files,
]
