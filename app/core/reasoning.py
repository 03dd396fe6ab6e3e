"""Splits a reply's leading `<think>…</think>` block into `reasoning_content` (`think_tags`).

Reasoning models served without a reasoning parser (llama.cpp without --reasoning-format,
most GGUFs in-process) write their thoughts into the content; clients such as Open WebUI and
the Responses/Messages bridges expect them apart. Streams are split as they pass: a partial
tag at a chunk boundary is held back until the next chunk tells what it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import msgspec

from app.protocol import UNSET, ChatCompletion, ChatCompletionChunk, ChunkDelta, StreamItem

OPEN, CLOSE = "<think>", "</think>"

_decode_chunk = msgspec.json.Decoder(ChatCompletionChunk).decode


@dataclass(slots=True)
class ThinkSplitter:
    """One reply's text → (reasoning, content) pieces."""

    state: Literal["start", "think", "answer"] = "start"
    held: str = ""
    after_block: bool = False
    """The block just closed: the newlines that separate it from the answer are dropped."""

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and content that `text` (after what came before) makes certain."""
        if self.state == "answer":
            if self.after_block:
                text = text.lstrip("\n")
                self.after_block = not text
            return "", text
        self.held += text
        if self.state == "start":
            lead = self.held.lstrip()
            if lead.startswith(OPEN):
                self.state, self.held = "think", lead[len(OPEN) :]
            elif OPEN.startswith(lead):
                return "", ""
            else:
                self.state, content, self.held = "answer", self.held, ""
                return "", content
        end = self.held.find(CLOSE)
        if end >= 0:
            reasoning, content = self.held[:end], self.held[end + len(CLOSE) :].lstrip("\n")
            self.state, self.held, self.after_block = "answer", "", not content
            return reasoning, content
        keep = _partial_suffix(self.held, CLOSE)
        reasoning = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return reasoning, ""

    def flush(self) -> tuple[str, str]:
        """What is still held at the end (an unclosed block counts as reasoning)."""
        held, self.held = self.held, ""
        if self.state == "think":
            return held, ""
        return "", held


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def split_answer(result: ChatCompletion) -> ChatCompletion:
    """A whole completion with each choice's leading think block moved to reasoning_content."""
    for choice in result.choices:
        message = choice.message
        if not message.content:
            continue
        splitter = ThinkSplitter()
        reasoning, content = splitter.feed(message.content)
        more_reasoning, more_content = splitter.flush()
        reasoning += more_reasoning
        if reasoning:
            message.reasoning_content = reasoning
            message.content = content + more_content
    return result


async def split_stream(items: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
    """A chat stream with think blocks moved to `reasoning_content` deltas, per choice."""
    splitters: dict[int, ThinkSplitter] = {}
    async for item in items:
        chunk = _decode_chunk(bytes(item)) if isinstance(item, msgspec.Raw) else item
        if not isinstance(chunk, ChatCompletionChunk):
            yield item
            continue
        for choice in chunk.choices:
            splitter = splitters.setdefault(choice.index, ThinkSplitter())
            delta = choice.delta
            text = delta.content if isinstance(delta.content, str) else ""
            reasoning, content = splitter.feed(text) if text else ("", "")
            if choice.finish_reason is not None:
                r, c = splitter.flush()
                reasoning, content = reasoning + r, content + c
            if text or choice.finish_reason is not None:
                _rewrite(delta, reasoning, content)
        yield chunk


def _rewrite(delta: ChunkDelta, reasoning: str, content: str) -> None:
    delta.content = content if content or delta.role is not UNSET else UNSET
    if reasoning:
        delta.reasoning_content = reasoning
