"""Splitting extracted text into chunks of a bounded number of tokens, with overlap.

Token counts are cl100k_base's, as OpenAI's `max_chunk_size_tokens` are. A chunk boundary
prefers the end of a paragraph or sentence near the limit over the middle of a word.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from app.tokens import cl100k

_BREAKS = (
    "\n\n",
    "\n",
    "\u3002",
    "\uff01",
    "\uff1f",
    ". ",
    "! ",
    "? ",
    "\uff1b",
    "; ",
    "\uff0c",
    ", ",
    " ",
)
"""Chunk ends, best first: paragraphs, lines, sentences (full-width Chinese ones too),
clauses, words."""


@dataclass(frozen=True, slots=True)
class Page:
    """Text of one page (or the whole file, for formats without pages)."""

    number: int | None
    text: str


@dataclass(frozen=True, slots=True)
class TextChunk:
    """A chunk: its text, its size in tokens, and the page it starts on."""

    text: str
    tokens: int
    page: int | None


def chunk_pages(pages: Sequence[Page], size: int, overlap: int) -> list[TextChunk]:
    """Chunks of at most `size` tokens; consecutive chunks of a page share `overlap` tokens."""
    chunks: list[TextChunk] = []
    for page in pages:
        chunks.extend(_chunk(page, size, overlap))
    return chunks


def _chunk(page: Page, size: int, overlap: int) -> Iterator[TextChunk]:
    text = page.text
    tokens = cl100k().encode_ordinary(text)
    # Where each token starts in `text`: chunks are cut from the text itself, so a character
    # that spans two tokens (most Chinese ones in cl100k) is never split in half.
    _, offsets = cl100k().decode_with_offsets(tokens)
    start = 0
    while start < len(tokens):
        end = min(start + size, len(tokens))
        begin = offsets[start]
        stop = offsets[end] if end < len(tokens) else len(text)
        if end < len(tokens):
            cut = _break_point(text[begin:stop])
            if cut is not None:
                stop = begin + cut
                end = max(start + 1, bisect_right(offsets, stop, lo=start) - 1)
                stop = offsets[end] if end < len(tokens) else len(text)
        piece = text[begin:stop].strip()
        if piece:
            yield TextChunk(text=piece, tokens=end - start, page=page.number)
        if end >= len(tokens):
            return
        start = max(end - overlap, start + 1)


def _break_point(text: str) -> int | None:
    """Where to end a chunk: after the last break in its final quarter, if there is one."""
    floor = len(text) * 3 // 4
    for mark in _BREAKS:
        at = text.rfind(mark, floor)
        if at != -1:
            return at + len(mark)
    return None
