"""Full text in memory: each store's postings, scored by BM25 in numpy.

SQLite's FTS5 and PostgreSQL's `ts_rank` find matches quickly but score them one row at a
time: FTS5's bm25 looks up each match's length in a B-tree, PostgreSQL reads its tsvector, so
a query whose words occur in 10k of 100k chunks took 17 ms on SQLite and 50 ms on PostgreSQL
(bench/knowledge.py, this 2-core machine), most of a search. Here every chunk carries its
`lexicon` (term hashes and counts, written at ingestion like its vector), a store's are kept
in memory beside its vectors, and a query's postings are scored at once: the same ranking on
either database, in about a millisecond.

Terms are `app.knowledge.text.terms` (words lower-cased and stemmed, CJK as bigrams), hashed
with CRC-32 (stable across processes and versions; at a million distinct terms about a
hundred pairs share a hash, each costing a stray partial match). Postings live in segments
sorted by hash: chunks added since a store was read form a new segment, and segments of
similar size are merged (a log-structured merge), so indexing a file never re-sorts the
store.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.knowledge.text import query_terms, terms

K1 = 1.2
B = 0.75
"""BM25's term-frequency saturation and length normalization (Lucene's and FTS5's defaults)."""

ENTRY = np.dtype([("term", "<u4"), ("count", "<u2")])
"""One term of a chunk's lexicon, as stored."""


def term_hash(term: str) -> int:
    """A term's 32-bit id."""
    return zlib.crc32(term.encode())


def lexicon_bytes(text: str) -> bytes:
    """A chunk's lexicon as stored: each distinct term's hash and count."""
    counts = Counter(term_hash(t) for t in terms(text))
    entries = np.array([(h, min(c, 0xFFFF)) for h, c in sorted(counts.items())], dtype=ENTRY)
    return entries.tobytes()


@dataclass(frozen=True, slots=True)
class Segment:
    """Postings of a run of rows, sorted by term hash."""

    terms: np.ndarray  # uint32, sorted
    rows: np.ndarray  # int32: the row of the store's matrix
    counts: np.ndarray  # uint16: the term's count in that row

    @property
    def nbytes(self) -> int:
        return int(self.terms.nbytes + self.rows.nbytes + self.counts.nbytes)


def segment(lexicons: Sequence[bytes], first_row: int) -> tuple[Segment, np.ndarray]:
    """The postings of consecutive rows from `first_row`, and each row's length in terms."""
    entries = np.frombuffer(b"".join(lexicons), dtype=ENTRY)
    sizes = np.fromiter((len(x) // ENTRY.itemsize for x in lexicons), np.int64, len(lexicons))
    rows = np.repeat(np.arange(first_row, first_row + len(lexicons), dtype=np.int32), sizes)
    counts = entries["count"]
    lengths = np.bincount(rows - first_row, weights=counts, minlength=len(lexicons))
    order = np.argsort(entries["term"], kind="stable")
    return (
        Segment(entries["term"][order].copy(), rows[order], counts[order]),
        lengths.astype(np.float32),
    )


def merged(older: Segment, newer: Segment) -> Segment:
    """Two segments as one (a stable sort of two sorted runs is a linear merge)."""
    terms_ = np.concatenate([older.terms, newer.terms])
    order = np.argsort(terms_, kind="stable")
    return Segment(
        terms_[order],
        np.concatenate([older.rows, newer.rows])[order],
        np.concatenate([older.counts, newer.counts])[order],
    )


def appended(segments: Sequence[Segment], new: Segment) -> list[Segment]:
    """`segments` with `new` added, neighbours merged while the newer is at least half the
    size of the older: O(log n) segments, each posting merged O(log n) times."""
    out = [*segments, new]
    while len(out) > 1 and 2 * len(out[-1].terms) >= len(out[-2].terms):
        newer = out.pop()
        out[-1] = merged(out[-1], newer)
    return out


def bm25(
    segments: Sequence[Segment], lengths: np.ndarray, query: str, allowed: np.ndarray | None
) -> np.ndarray:
    """Every row's BM25 score for `query`, 0 where no term matches and outside `allowed` (a
    mask of rows; document frequencies stay the whole store's)."""
    rows_n = len(lengths)
    scores = np.zeros(rows_n, dtype=np.float32)
    if not rows_n:
        return scores
    average = float(lengths.mean()) or 1.0
    norm = K1 * (1.0 - B + B * lengths / average)
    for h in {np.uint32(term_hash(t)) for t in query_terms(query)}:
        # The needle has the haystack's dtype: any other makes numpy convert the whole array.
        found = [
            (s.rows[a:b], s.counts[a:b])
            for s in segments
            for a, b in [(s.terms.searchsorted(h, "left"), s.terms.searchsorted(h, "right"))]
            if b > a
        ]
        if not found:
            continue
        rows = np.concatenate([r for r, _ in found])
        tf = np.concatenate([c for _, c in found]).astype(np.float32)
        df = len(rows)
        idf = np.log1p((rows_n - df + 0.5) / (df + 0.5))
        scores[rows] += idf * tf * (K1 + 1.0) / (tf + norm[rows])
    if allowed is not None:
        scores[~allowed] = 0.0
    return scores
