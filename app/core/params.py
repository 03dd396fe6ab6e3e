"""Request checks and defaults that hold for every backend, applied before dispatch."""

from __future__ import annotations

from typing import Any

import msgspec

from app.config import ModelConfig
from app.errors import InvalidRequest, UnsupportedParameter
from app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    NamedToolChoice,
)
from app.tokens import decode_token_ids
from backends.base import Capabilities

_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})
DEFAULT_COMPLETION_MAX_TOKENS = 16


def _defaults(model: ModelConfig, set_fields: dict[str, Any]) -> dict[str, Any]:
    """Model defaults for the sampling fields the request left unset."""
    out: dict[str, Any] = {}
    params = model.params
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed"):
        value = getattr(params, name)
        if value is not None and set_fields.get(name) is None:
            out[name] = value
    if params.stop is not None and set_fields.get("stop") is None:
        out["stop"] = list(params.stop)
    return out


def _check_n(n: int | None, caps: Capabilities) -> None:
    if n is not None and n > caps.max_n:
        raise UnsupportedParameter(
            f"n={n} is not supported by this model (at most {caps.max_n}); "
            "send several requests instead",
            param="n",
        )


def _check_tools(req: ChatCompletionRequest) -> None:
    """Malformed tool definitions and choices are the client's to fix: 400 naming them."""
    names: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        function = tool.function
        if function.name in names:
            raise InvalidRequest(
                f"tools[{i}]: the function name {function.name!r} is used twice",
                param=f"tools[{i}].function.name",
            )
        names.add(function.name)
        parameters = function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise InvalidRequest(
                f"tools[{i}]: function parameters must be a JSON schema of type object",
                param=f"tools[{i}].function.parameters",
            )
    choice = req.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    if not req.tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names {choice.function.name!r}, which is not in tools",
            param="tool_choice.function.name",
        )


def prepare_chat(
    req: ChatCompletionRequest, model: ModelConfig, caps: Capabilities
) -> ChatCompletionRequest:
    """Validate a chat request against the model and fill in its defaults."""
    if not caps.chat:
        raise UnsupportedParameter(
            f"model {model.id!r} does not support chat completions", param="model"
        )
    _check_n(req.n, caps)
    for i, message in enumerate(req.messages):
        if message.role in _CONTENT_REQUIRED and message.content is None:
            raise InvalidRequest(
                f"messages[{i}]: a {message.role} message needs content",
                param=f"messages[{i}].content",
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                f"messages[{i}]: a tool message needs tool_call_id",
                param=f"messages[{i}].tool_call_id",
            )
        if not caps.vision and message.has_images():
            raise UnsupportedParameter(
                f"model {model.id!r} does not accept images",
                param=f"messages[{i}].content",
            )
    if req.tools and not caps.tools:
        raise UnsupportedParameter(
            f"model {model.id!r} does not support tool calling", param="tools"
        )
    _check_tools(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    fmt = req.response_format
    if fmt and fmt.type != "text" and not caps.json_schema:
        raise UnsupportedParameter(
            f"model {model.id!r} does not support response_format {fmt.type}",
            param="response_format",
        )
    if fmt and fmt.type == "json_schema" and fmt.json_schema is None:
        raise InvalidRequest(
            "response_format.json_schema is required when type is json_schema",
            param="response_format.json_schema",
        )
    changes = _defaults(model, {f: getattr(req, f) for f in req.__struct_fields__})
    max_tokens = req.max_completion_tokens or req.max_tokens or model.params.max_tokens
    changes.update(model=model.id, max_tokens=max_tokens, max_completion_tokens=None)
    return msgspec.structs.replace(req, **changes)


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def prepare_completion(
    req: CompletionRequest, model: ModelConfig, caps: Capabilities
) -> CompletionRequest:
    """Validate a completion request and fill in its defaults."""
    if not caps.completions:
        raise UnsupportedParameter(
            f"model {model.id!r} does not support text completions", param="model"
        )
    _check_n(req.n, caps)
    if req.best_of is not None and req.best_of > max(req.n or 1, caps.max_n):
        raise UnsupportedParameter("best_of greater than n is not supported", param="best_of")
    prompt = req.prompt
    if isinstance(prompt, list):
        if not prompt:
            raise InvalidRequest("prompt must not be an empty list", param="prompt")
        if not (
            all(isinstance(p, str) for p in prompt)
            or _is_token_list(prompt)
            or all(_is_token_list(p) and p for p in prompt)
        ):
            raise InvalidRequest(
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of token-id lists",
                param="prompt",
            )
        if req.stream and not _is_token_list(prompt) and len(prompt) > 1:
            raise UnsupportedParameter(
                "streaming supports a single prompt; send one request per prompt",
                param="prompt",
            )
    if req.echo and req.logprobs is not None and req.stream:
        raise UnsupportedParameter(
            "echo with logprobs is not supported when streaming", param="echo"
        )
    changes = _defaults(model, {f: getattr(req, f) for f in req.__struct_fields__})
    max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = model.params.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    changes.update(model=model.id, max_tokens=max_tokens)
    return msgspec.structs.replace(req, **changes)


def prepare_embedding(
    req: EmbeddingRequest, model: ModelConfig, caps: Capabilities
) -> EmbeddingRequest:
    """Validate embedding input; token-id arrays become text for backends that need text."""
    if not caps.embeddings:
        raise UnsupportedParameter(f"model {model.id!r} does not support embeddings", param="model")
    value = req.input
    inputs: list[Any] = [value] if isinstance(value, str) or _is_token_list(value) else value
    if not inputs:
        raise InvalidRequest("input must not be empty", param="input")
    if len({isinstance(item, str) for item in inputs}) > 1:
        raise InvalidRequest(
            "input must be all strings or all token-id lists, not a mix", param="input"
        )
    texts: list[Any] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input[{i}] must not be an empty string", param="input")
            texts.append(item)
        elif _is_token_list(item) and item:
            texts.append(item if caps.token_inputs else decode_token_ids(item, param="input"))
        else:
            raise InvalidRequest(
                "input must be a string, a list of strings, a list of token ids "
                "or a list of token-id lists",
                param="input",
            )
    if caps.token_inputs:
        return msgspec.structs.replace(req, model=model.id)
    return msgspec.structs.replace(req, model=model.id, input=texts)
