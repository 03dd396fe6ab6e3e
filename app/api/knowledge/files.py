"""The Files API: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from msgspec import UNSET

from app.api.knowledge.common import admitted, page_args, unix
from app.api.knowledge.protocol import Deleted, FileList, FileObject
from app.api.replies import json_response
from app.config import KnowledgeSettings
from app.core.gateway import Gateway
from app.errors import InvalidRequest
from app.knowledge.files import Upload
from app.knowledge.schema import StoredFile

MULTIPART_SLACK = 64 * 1024
"""Room for the multipart envelope and the other fields around the file's bytes."""


def file_object(record: StoredFile) -> FileObject:
    """The File object of a stored file."""
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=unix(record.created_at) or 0,
        filename=record.filename,
        purpose=record.purpose,
        expires_at=UNSET if record.expires_at is None else unix(record.expires_at) or 0,
    )


async def upload_file(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """Upload a file (multipart: `file` and `purpose`)."""
    kb, principal = await admitted(request, gateway)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            "upload a file as multipart/form-data with the fields 'file' and 'purpose'",
            param="file",
        )
    form = await request.form()
    file = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(file, UploadFile):
        raise InvalidRequest("the form has no 'file' field holding a file", param="file")
    if not isinstance(purpose, str) or not purpose:
        raise InvalidRequest("the form needs a 'purpose' field", param="purpose")
    data = await file.read()
    record = await kb.files.create(
        principal,
        Upload(
            filename=file.filename or "",
            purpose=purpose,
            data=data,
            content_type=file.content_type or None,
        ),
    )
    return json_response(file_object(record))


@get("/v1/files")
async def list_files(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]
) -> Response[bytes]:
    """The caller's files."""
    kb, principal = await admitted(request, gateway)
    args = page_args(request, default_limit=10000)
    page = await kb.files.page(
        principal,
        purpose=request.query_params.get("purpose") or None,
        limit=args["limit"],
        order=args["order"],
        after=args["after"],
    )
    data = [file_object(r) for r in page.items]
    return json_response(
        FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=page.has_more,
        )
    )


@get("/v1/files/{file_id:str}")
async def retrieve_file(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], file_id: FromPath[str]
) -> Response[bytes]:
    """One file's record."""
    kb, principal = await admitted(request, gateway)
    return json_response(file_object(await kb.files.get(principal, file_id)))


@get("/v1/files/{file_id:str}/content")
async def file_content(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], file_id: FromPath[str]
) -> Response[bytes]:
    """A file's bytes."""
    kb, principal = await admitted(request, gateway)
    record, data = await kb.files.content(principal, file_id)
    return Response(
        content=data,
        media_type=record.content_type or "application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{_quoted(record.filename)}"'},
    )


@delete("/v1/files/{file_id:str}", status_code=200)
async def delete_file(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], file_id: FromPath[str]
) -> Response[bytes]:
    """Delete a file (and take it out of every vector store)."""
    kb, principal = await admitted(request, gateway)
    await kb.files.delete(principal, file_id)
    return json_response(Deleted(id=file_id, object="file"))


def _quoted(name: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)


def routes(settings: KnowledgeSettings) -> list[HTTPRouteHandler]:
    """The Files routes; the upload takes bodies up to `knowledge.max_file_mb`."""
    upload = post(
        "/v1/files",
        status_code=200,
        request_max_body_size=settings.max_file_mb * 1024 * 1024 + MULTIPART_SLACK,
    )(upload_file)
    return [upload, list_files, retrieve_file, file_content, delete_file]
