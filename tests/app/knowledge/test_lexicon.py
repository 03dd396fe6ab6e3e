"""BM25 over in-memory postings, against a plain Python BM25 of the same terms."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from app.knowledge.lexicon import K1, B, Segment, appended, bm25, lexicon_bytes, segment
from app.knowledge.text import query_terms, terms

WORDS = ["refund", "ship", "order", "warranty", "battery", "退款", "发货", "x200", "error"]


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]


def reference(docs: list[str], query: str) -> list[float]:
    """BM25 as the textbook writes it (Lucene's idf), over the same terms."""
    bags = [Counter(terms(d)) for d in docs]
    average = sum(sum(b.values()) for b in bags) / len(bags)
    scores = [0.0] * len(docs)
    for term in query_terms(query):
        df = sum(1 for b in bags if term in b)
        if not df:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, bag in enumerate(bags):
            tf = bag.get(term, 0)
            length = sum(bag.values())
            if tf:
                scores[i] += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average))
    return scores


def built(docs: list[str], cuts: list[int]) -> tuple[list[Segment], np.ndarray]:
    """The docs indexed in runs split at `cuts`, as a store grows."""
    segments: list[Segment] = []
    lengths = []
    bounds = [0, *cuts, len(docs)]
    for start, end in itertools.pairwise(bounds):
        seg, lens = segment([lexicon_bytes(d) for d in docs[start:end]], start)
        segments = appended(segments, seg)
        lengths.append(lens)
    return segments, np.concatenate(lengths)


@pytest.mark.parametrize("cuts", [[], [1], [10, 11, 12, 40], list(range(1, 60, 3))])
def test_scores_match_textbook_bm25_however_the_store_grew(cuts: list[int]) -> None:
    docs = corpus(60, seed=len(cuts))
    segments, lengths = built(docs, cuts)
    assert len(segments) <= 1 + math.ceil(math.log2(len(docs)))
    for query in ["refund", "battery warranty", "x200 error", "退款 发货", "order orders"]:
        got = bm25(segments, lengths, query, None)
        assert got == pytest.approx(reference(docs, query), rel=1e-5, abs=1e-6)


def test_a_mask_zeroes_other_rows_and_keeps_the_stores_frequencies() -> None:
    docs = corpus(20, seed=3)
    segments, lengths = built(docs, [7])
    mask = np.zeros(len(docs), dtype=bool)
    mask[::2] = True
    got = bm25(segments, lengths, "battery", mask)
    want = reference(docs, "battery")
    assert got[~mask].tolist() == [0.0] * int((~mask).sum())
    assert got[mask] == pytest.approx([w for i, w in enumerate(want) if i % 2 == 0], rel=1e-5)


def test_a_rarer_word_weighs_more_and_repeats_saturate() -> None:
    docs = ["refund refund refund refund", "refund", "refund error", "order"]
    segments, lengths = built(docs, [])
    scores = bm25(segments, lengths, "refund error", None)
    assert scores.argmax() == 2  # the only chunk with the rare word
    assert scores[0] < 2 * scores[1]  # four times the word is not four times the score
    assert scores[3] == 0.0


def test_forms_of_a_word_match_through_the_stemmer() -> None:
    segments, lengths = built(["Refunds are processed weekly", "Shipping is free"], [])
    assert bm25(segments, lengths, "refund process", None)[0] > 0
    assert bm25(segments, lengths, "shipped", None).tolist()[1] > 0
