"""The OpenAI wire schema, as msgspec Structs.

Fields follow the order of OpenAI's API reference. Requests tolerate unknown fields (msgspec
ignores them); request Structs use `omit_defaults` so that forwarding one upstream sends only
what the client set. Response fields that OpenAI marks optional are `UNSET` until set, so they
are left out of the JSON rather than sent as null. Our own extensions are marked "extension".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Raw, Struct, UnsetType, field

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Meta(ge=1)]
Stop = str | Annotated[list[str], Meta(max_length=16)]


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
"""Why a chat choice ended."""
CompletionFinishReason = Literal["stop", "length", "content_filter"]
"""Why a text completion choice ended."""


class StreamOptions(Struct, kw_only=True, omit_defaults=True):
    """Options for streamed responses."""

    include_usage: bool = False


class TextPart(Struct, tag_field="type", tag="text"):
    """A text content part."""

    text: str


class ImageUrl(Struct, kw_only=True, omit_defaults=True):
    """An image reference (URL or data: URI)."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Struct, tag_field="type", tag="image_url"):
    """An image content part."""

    image_url: ImageUrl


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    """A refusal content part (assistant messages)."""

    refusal: str


ContentPart = TextPart | ImagePart | RefusalPart


class FunctionCall(Struct, kw_only=True):
    """A function name with JSON-encoded arguments."""

    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    """A tool call made by the assistant."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    """One message of a conversation, any role."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # extension: reasoning text some backends return and accept back
    reasoning_content: str | None = None

    def text(self) -> str:
        """The message's text, with text parts joined; other parts must not be present."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            part.text if isinstance(part, TextPart) else part.refusal
            for part in self.content
            if isinstance(part, TextPart | RefusalPart)
        )

    def has_images(self) -> bool:
        """Whether any content part is an image."""
        return isinstance(self.content, list) and any(
            isinstance(part, ImagePart) for part in self.content
        )


class FunctionDefinition(Struct, kw_only=True, omit_defaults=True):
    """A function the model may call."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_\-.]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, kw_only=True):
    """A tool definition."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Struct):
    """The function named by a forced tool choice."""

    name: str


class NamedToolChoice(Struct, kw_only=True):
    """`tool_choice` forcing one function."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Struct, kw_only=True, omit_defaults=True):
    """A named JSON schema for structured output."""

    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True, omit_defaults=True):
    """`response_format`: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str
    store: bool | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # extensions understood by llama.cpp-style servers
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Probability | None = None
    repeat_penalty: Annotated[float, Meta(ge=0.0)] | None = None


class CompletionRequest(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/completions."""

    model: str
    prompt: str | list[Any]
    best_of: Annotated[int, Meta(ge=1)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: str | None = None
    # extensions understood by llama.cpp-style servers
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Probability | None = None
    repeat_penalty: Annotated[float, Meta(ge=0.0)] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each completed on its own: a string, or a list of token ids (a flat
        list of ids is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        return list(prompt)


class EmbeddingRequest(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/embeddings."""

    input: str | list[Any]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class PromptTokensDetails(Struct, kw_only=True):
    """Where the prompt's tokens came from."""

    cached_tokens: int = 0
    """Prompt tokens whose KV cache was reused from an earlier request (not evaluated again)."""


class Usage(Struct, kw_only=True):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET


class TopLogprob(Struct, kw_only=True):
    """One alternative token and its log probability."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    """A sampled token, its log probability and the top alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    """Log probabilities of a chat choice."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(Struct, kw_only=True):
    """The assistant message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    # extension: reasoning text, for backends that produce it
    reasoning_content: str | UnsetType = UNSET


class ChatChoice(Struct, kw_only=True):
    """One choice of a chat completion."""

    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(Struct, kw_only=True):
    """Response of POST /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | UnsetType = UNSET
    system_fingerprint: str | UnsetType = UNSET


class ToolCallDelta(Struct, kw_only=True):
    """A fragment of a streamed tool call; id, type and name come in its first fragment."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: dict[str, str] | UnsetType = UNSET


class ChunkDelta(Struct, kw_only=True):
    """What one stream chunk adds to the message."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    refusal: str | UnsetType | None = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    # extension: reasoning text, for backends that produce it
    reasoning_content: str | UnsetType = UNSET


class ChunkChoice(Struct, kw_only=True):
    """One choice of a stream chunk."""

    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | UnsetType | None = UNSET
    system_fingerprint: str | UnsetType = UNSET


class CompletionLogprobs(Struct, kw_only=True):
    """Legacy per-token log probabilities of a completion choice."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(Struct, kw_only=True):
    """One choice of a text completion (or of one of its stream events)."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: CompletionFinishReason | None


class Completion(Struct, kw_only=True):
    """Response of POST /v1/completions, and each of its stream events."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType | None = UNSET
    system_fingerprint: str | UnsetType = UNSET


class Embedding(Struct, kw_only=True):
    """One embedding vector (floats, or base64 of little-endian float32)."""

    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(Struct, kw_only=True):
    """Token counts of an embeddings request."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct, kw_only=True):
    """Response of POST /v1/embeddings."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCapabilities(Struct, kw_only=True):
    """What a model serves (extension: IDE assistants read it to enable features)."""

    chat: bool
    completions: bool
    embeddings: bool
    tools: bool
    vision: bool
    json_schema: bool
    fim: bool
    rerank: bool


class Model(Struct, kw_only=True):
    """A model, as listed by /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extensions read by IDE assistants: context window in tokens, capabilities
    context_length: int | UnsetType = UNSET
    capabilities: ModelCapabilities | UnsetType = UNSET
    loaded: bool | UnsetType = UNSET
    """In-process models: whether the weights are in memory now (else they load on demand)."""


class ModelList(Struct, kw_only=True):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(Struct, kw_only=True):
    """The `error` object of an error response."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct, kw_only=True):
    """Every error the gateway answers with."""

    error: ErrorBody


StreamItem = ChatCompletionChunk | Completion | Raw
"""What a backend stream yields: a chunk Struct, or an upstream's chunk JSON passed through."""

__all__ = [
    "UNSET",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceLogprobs",
    "ChunkChoice",
    "ChunkDelta",
    "Completion",
    "CompletionChoice",
    "CompletionFinishReason",
    "CompletionLogprobs",
    "CompletionRequest",
    "Embedding",
    "EmbeddingList",
    "EmbeddingRequest",
    "EmbeddingUsage",
    "ErrorBody",
    "ErrorResponse",
    "FinishReason",
    "Model",
    "ModelCapabilities",
    "ModelList",
    "ResponseMessage",
    "StreamItem",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "field",
]


# Rerank (Cohere and Jina style) and FIM (Mistral style) are extensions, not OpenAI APIs.


class RerankDocument(Struct, kw_only=True):
    """A document given as an object (Cohere, Jina); only its `text` is read."""

    text: Annotated[str, Meta(min_length=1)]


class RerankRequest(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/rerank, as Cohere, Jina, vLLM and llama.cpp's server take it."""

    model: str
    query: Annotated[str, Meta(min_length=1)]
    documents: Annotated[
        list[Annotated[str, Meta(min_length=1)] | RerankDocument], Meta(min_length=1)
    ]
    top_n: TokenCount | None = None
    return_documents: bool | None = None
    # Continue's name for top_n
    top_k: TokenCount | None = None

    def texts(self) -> list[str]:
        """The documents' text, in request order."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(Struct, kw_only=True):
    """One document's score; `document` only when `return_documents` was true."""

    index: int
    relevance_score: float
    document: RerankDocument | UnsetType = UNSET


class RerankUsage(Struct, kw_only=True):
    """Token counts of a rerank request."""

    prompt_tokens: int
    total_tokens: int


class RerankResponse(Struct, kw_only=True):
    """Response of POST /v1/rerank: the results, most relevant first, twice over.

    `results` is what Cohere, Jina, vLLM and Open WebUI read; `data` (the same list) is what
    Voyage-style clients such as Continue read.
    """

    id: str
    object: Literal["list"] = "list"
    model: str
    results: list[RerankResult]
    data: list[RerankResult]
    usage: RerankUsage


class FimCompletionRequest(Struct, kw_only=True, omit_defaults=True):
    """POST /v1/fim/completions (Mistral's fill-in-the-middle API); answered chat-shaped."""

    model: str
    prompt: str
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    stream: bool | None = None
    stop: Stop | None = None
    random_seed: int | None = None
    # what Continue's OpenAI-style FIM client sends as well
    max_completion_tokens: TokenCount | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None


__all__ += [
    "FimCompletionRequest",
    "RerankDocument",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "RerankUsage",
]
