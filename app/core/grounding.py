"""Answers grounded in the knowledge base: retrieval for the question, passages in the prompt.

Two ways in: a knowledge-bound model (`models[].knowledge` in clawbot.json), which grounds
every chat on /v1/chat/completions, /v1/responses and /v1/messages alike, so unchanged clients
get retrieval; and the Responses API's `file_search` tool. Both retrieve for the last user
turn and put the passages, numbered with their sources, into a system message, as many as fit
the context window after the conversation and the answer's room.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from app.core.gateway import Call, Gateway
from app.errors import InvalidRequest
from app.knowledge.records import Principal
from app.knowledge.search import Query, Result
from app.protocol import ChatCompletionRequest, ChatMessage
from app.tokens import count_tokens, estimate_chat_prompt

SOURCES_HEADER = "x-clawbot-sources"
"""Names the files an answer was grounded in: `file_id;filename` pairs joined by `, `."""

ANSWER_ROOM = 512
"""Tokens kept free for the answer when the request sets no limit."""

_INSTRUCTION = (
    "Answer using the sources below. Cite a source by its number in brackets, like [1]. "
    "If the sources do not contain the answer, say that you do not know."
)


@dataclass(frozen=True, slots=True)
class Grounded:
    """A request with passages (and the model's system prompt) put in, and what was found."""

    req: ChatCompletionRequest
    results: list[Result]
    """The passages the model was given, in their numbered order."""


def question_of(messages: Sequence[ChatMessage]) -> str:
    """The last user turn's text."""
    for message in reversed(messages):
        if message.role == "user":
            return message.text().strip()
    return ""


def _passage(number: int, result: Result) -> str:
    page = f", page {result.page}" if result.page is not None else ""
    return f"[{number}] {result.filename}{page}:\n{result.text}"


def with_passages(
    req: ChatCompletionRequest,
    results: Sequence[Result],
    *,
    system_prompt: str = "",
    budget: int | None = None,
    first: int = 1,
) -> tuple[ChatCompletionRequest, list[Result]]:
    """`req` with a leading system message: the system prompt, then the passages that fit in
    `budget` tokens (best first), numbered from `first` (after passages the request already
    carries). Returns the request and the passages given."""
    parts = [system_prompt.strip()] if system_prompt.strip() else []
    given: list[Result] = []
    if results:
        used = count_tokens("\n\n".join([*parts, _INSTRUCTION]))
        passages = []
        for result in results:
            text = _passage(first + len(given), result)
            cost = count_tokens(text) + 2
            if budget is not None and used + cost > budget:
                break
            passages.append(text)
            given.append(result)
            used += cost
        if given:
            parts += [_INSTRUCTION, "\n\n".join(passages)]
    if not parts:
        return req, given
    system = ChatMessage(role="system", content="\n\n".join(parts))
    return msgspec.structs.replace(req, messages=[system, *req.messages]), given


def prompt_budget(call: Call, req: ChatCompletionRequest) -> int | None:
    """Tokens the passages may take: the window less the conversation and the answer's room."""
    window = call.model.context_length
    if window is None:
        return None
    answer = (
        req.max_completion_tokens
        or req.max_tokens
        or call.model.config.params.max_tokens
        or ANSWER_ROOM
    )
    return max(0, window - answer - estimate_chat_prompt(req) - 16)


async def search(
    gateway: Gateway,
    principal: Principal,
    store_ids: Sequence[str],
    query: str,
    *,
    max_results: int,
    filters: Mapping[str, Any] | None = None,
    score_threshold: float = 0.0,
    rerank: bool = True,
) -> list[Result]:
    """A knowledge-base search on behalf of a request."""
    if gateway.knowledge is None:
        raise InvalidRequest(
            "file search needs the knowledge base, which is turned off on this server "
            "(knowledge.enabled)"
        )
    return await gateway.knowledge.searcher.search(
        principal,
        store_ids,
        Query(
            text=query,
            max_num_results=max_results,
            filters=filters,
            score_threshold=score_threshold,
            rerank=rerank,
        ),
    )


async def ground(gateway: Gateway, call: Call, req: ChatCompletionRequest) -> Grounded | None:
    """For a knowledge-bound model (or one with a system prompt): the grounded request.
    None for any other model."""
    config = call.model.config
    binding = config.knowledge
    if binding is None and not config.system_prompt:
        return None
    question = question_of(req.messages)
    results: list[Result] = []
    if binding is not None and question:
        # The stores are the administrator's (clawbot.json names them): searched as such.
        results = await search(
            gateway,
            Principal(owner="", sees_all=True),
            binding.vector_store_ids,
            question,
            max_results=binding.max_results,
            score_threshold=binding.score_threshold,
        )
    grounded, given = with_passages(
        req, results, system_prompt=config.system_prompt, budget=prompt_budget(call, req)
    )
    if given:
        call.exchange.response_headers[SOURCES_HEADER] = sources_header(given)
    return Grounded(req=grounded, results=given)


def sources_header(results: Sequence[Result]) -> str:
    """The `x-clawbot-sources` value: each file once, in order."""
    seen: dict[str, str] = {}
    for r in results:
        seen.setdefault(r.file_id, r.filename)
    return ", ".join(f"{f};{_header_safe(n)}" for f, n in seen.items())


def _header_safe(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in ",;" else "_" for c in name)


def sources(results: Sequence[Result]) -> list[dict[str, Any]]:
    """The `sources` extension field of an answer: each passage given, numbered."""
    return [
        {
            "index": i,
            "file_id": r.file_id,
            "filename": r.filename,
            "vector_store_id": r.store_id,
            "score": r.score,
            "page": r.page,
            "text": r.text,
        }
        for i, r in enumerate(results, start=1)
    ]
