"""Wire objects of the Files and Vector Stores APIs, as OpenAI's spec writes them."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, Struct, UnsetType

Attributes = dict[str, str | int | float | bool]


class FileObject(Struct, kw_only=True):
    """A File."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | UnsetType = UNSET


class FileList(Struct, kw_only=True):
    """GET /v1/files."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Deleted(Struct, kw_only=True):
    """What a DELETE answers."""

    id: str
    object: str
    deleted: bool = True


class FileCountsObject(Struct, kw_only=True):
    """Files of a store or batch by state."""

    in_progress: int
    completed: int
    failed: int
    cancelled: int
    total: int


class ExpiresAfter(Struct, kw_only=True, forbid_unknown_fields=True):
    """Expiry `days` after the store was last active."""

    anchor: Literal["last_active_at"]
    days: int


class VectorStoreObject(Struct, kw_only=True):
    """A vector store."""

    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCountsObject
    status: Literal["expired", "in_progress", "completed"]
    expires_after: ExpiresAfter | UnsetType = UNSET
    expires_at: int | None = None
    last_active_at: int | None = None
    metadata: dict[str, str]
    embedding_model: str
    """Extension: the model its chunks are embedded with."""


class VectorStoreList(Struct, kw_only=True):
    """A page of vector stores (or of a store's files)."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StaticChunking(Struct, kw_only=True):
    """Chunk sizes in tokens."""

    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class ChunkingStrategyObject(Struct, kw_only=True):
    """How a file was chunked (always reported as static, with the sizes used)."""

    type: Literal["static"] = "static"
    static: StaticChunking


class LastError(Struct, kw_only=True):
    """Why a file's ingestion failed."""

    code: str
    message: str


class VectorStoreFileObject(Struct, kw_only=True):
    """A file in a vector store."""

    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    usage_bytes: int
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    last_error: LastError | None
    chunking_strategy: ChunkingStrategyObject
    attributes: Attributes


class FileBatchObject(Struct, kw_only=True):
    """A file batch."""

    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    file_counts: FileCountsObject


class ChunkingStrategyParam(Struct, kw_only=True):
    """`auto` or `static` with sizes (checked by `app.knowledge.records`)."""

    type: str
    static: dict[str, Any] | None = None


class FileParam(Struct, kw_only=True):
    """An entry of a batch's `files`."""

    file_id: str
    attributes: dict[str, Any] | None = None
    chunking_strategy: ChunkingStrategyParam | None = None


class CreateVectorStore(Struct, kw_only=True):
    """POST /v1/vector_stores."""

    name: str | None = None
    description: str | None = None
    file_ids: list[str] = []
    expires_after: ExpiresAfter | None = None
    chunking_strategy: ChunkingStrategyParam | None = None
    metadata: dict[str, Any] | None = None


class UpdateVectorStore(Struct, kw_only=True):
    """POST /v1/vector_stores/{id}."""

    name: str | None = None
    expires_after: ExpiresAfter | UnsetType | None = UNSET
    metadata: dict[str, Any] | None = None


class CreateVectorStoreFile(Struct, kw_only=True):
    """POST /v1/vector_stores/{id}/files."""

    file_id: str
    attributes: dict[str, Any] | None = None
    chunking_strategy: ChunkingStrategyParam | None = None


class UpdateVectorStoreFile(Struct, kw_only=True):
    """POST /v1/vector_stores/{id}/files/{file_id}."""

    attributes: dict[str, Any] | None


class CreateFileBatch(Struct, kw_only=True):
    """POST /v1/vector_stores/{id}/file_batches."""

    file_ids: list[str] = []
    files: list[FileParam] = []
    attributes: dict[str, Any] | None = None
    chunking_strategy: ChunkingStrategyParam | None = None


class RankingOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    """Reranking and the score cut-off."""

    ranker: Literal["none", "auto", "default-2024-11-15"] = "auto"
    score_threshold: float = 0.0


class SearchRequest(Struct, kw_only=True):
    """POST /v1/vector_stores/{id}/search."""

    query: str | list[str]
    max_num_results: int = 10
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False


class SearchContent(Struct, kw_only=True):
    """The text of a hit."""

    type: Literal["text"] = "text"
    text: str


class SearchResult(Struct, kw_only=True):
    """One hit."""

    file_id: str
    filename: str
    score: float
    attributes: Attributes
    content: list[SearchContent]


class SearchResultsPage(Struct, kw_only=True):
    """The answer of a search."""

    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[SearchResult]
    has_more: bool = False
    next_page: str | None = None
