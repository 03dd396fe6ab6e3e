"""What the full-text index reads: words, and Chinese, Japanese and Korean text as bigrams.

Word tokenizers (FTS5's unicode61, PostgreSQL's parser) split on spaces and punctuation, so a
run of Chinese characters would be one token and a query word inside it would never match.
Text is indexed as its words, lower-cased, with every CJK run written as its
overlapping character bigrams (a single character stays alone): 客服中心 -> 客服 服中 中心.
A query goes through the same transform, so the two-character words Chinese is mostly made of
match wherever they occur, without a dictionary; Lucene's CJKAnalyzer does the same. Other
words are stemmed with Snowball's English stemmer (PyStemmer), so "refunds" finds "refund".
"""

from __future__ import annotations

import re

import Stemmer

_CJK = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
)
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)
"""English words left out of queries: they match nearly every chunk and say little."""


def _words(text: str) -> list[tuple[str, bool]]:
    """Lower-cased words and CJK bigrams of `text`, in order, each with whether it is CJK."""
    out: list[tuple[str, bool]] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if _IS_CJK.match(token):
            if len(token) == 1:
                out.append((token, True))
            else:
                out.extend((token[i : i + 2], True) for i in range(len(token) - 1))
        else:
            out.append((token.lower(), False))
    return out


def _stemmed(words: list[tuple[str, bool]]) -> list[str]:
    # A stemmer per call: PyStemmer's are not thread-safe, and one costs under a microsecond.
    stem = Stemmer.Stemmer("english").stemWord
    return [w if cjk else stem(w) for w, cjk in words]


def terms(text: str) -> list[str]:
    """Index terms of `text`, in order: stemmed lower-cased words and CJK bigrams."""
    return _stemmed(_words(text))


def query_terms(text: str) -> list[str]:
    """A query's distinct terms, stop words left out (all of them, if that is all there is)."""
    found = list(dict.fromkeys(_words(text)))
    kept = [w for w in found if w[0] not in STOPWORDS]
    return list(dict.fromkeys(_stemmed(kept or found)))
