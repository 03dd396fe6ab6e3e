"""Token bytes to text: characters split over tokens, stop sequences, log-softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.llamacpp.text import StopScanner, TokenLogprob, log_softmax_at


def feed_all(scanner: StopScanner, pieces: list[bytes]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


def test_character_split_over_tokens_is_released_whole() -> None:
    star = "🌟".encode()
    scanner = StopScanner([])
    assert scanner.feed(star[:2]) == ("", False)
    assert scanner.feed(star[2:3]) == ("", False)
    assert scanner.feed(star[3:] + b"!") == ("🌟!", False)
    assert scanner.decoded_chars == 2


def test_cut_off_character_is_dropped_at_the_end() -> None:
    scanner = StopScanner([])
    assert feed_all(scanner, [b"ok ", "🌟".encode()[:2]]) == ("ok ", False)


def test_invalid_bytes_become_replacement_characters() -> None:
    assert feed_all(StopScanner([]), [b"a\xffb"]) == ("a\ufffdb", False)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        ([b"Hello", b" wor", b"ld"], ["world"], ("Hello ", True)),
        ([b"Hel", b"lo"], ["lo"], ("Hel", True)),
        ([b"a", b"b", b"c"], ["bd"], ("abc", False)),
        ([b"x\n", b"\nUser:"], ["\n\n"], ("x", True)),
        ([b"no stops here"], [], ("no stops here", False)),
        ([b"ab"], ["", "b"], ("a", True)),
    ],
)
def test_stop_sequences(pieces: list[bytes], stops: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all(StopScanner(stops), pieces) == expected


def test_text_that_may_start_a_stop_is_held_back() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed(b"value E") == ("value ", False)
    assert scanner.feed(b"N") == ("", False)
    assert scanner.feed(b"D") == ("", True)
    scanner = StopScanner(["END"])
    scanner.feed(b"value E")
    assert scanner.feed(b"ND? no, Ex") == ("", True)


def test_held_text_is_released_when_it_turns_out_harmless() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed(b"E") == ("", False)
    assert scanner.feed(b"x") == ("Ex", False)


def test_log_softmax_at() -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    chosen, top = log_softmax_at(logits, 2, 2)
    norm = math.log(sum(math.exp(x) for x in (1.0, 3.0, 2.0, -1.0)))
    assert chosen == pytest.approx(2.0 - norm)
    assert [i for i, _ in top] == [1, 2]
    assert top[0][1] == pytest.approx(3.0 - norm)
    assert log_softmax_at(logits, 0, 0) == (pytest.approx(1.0 - norm), [])


def test_log_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([1000.0, 999.0], dtype=np.float32)
    chosen, _ = log_softmax_at(logits, 0, 0)
    assert chosen == pytest.approx(-math.log1p(math.exp(-1.0)))


def test_token_text_escapes_partial_characters() -> None:
    entry = TokenLogprob(token=b"\xf0\x9f", logprob=-0.1, top=[], offset=0)
    assert entry.text == "\\xf0\\x9f"
    assert TokenLogprob(token=b"hi", logprob=0.0, top=[], offset=0).text == "hi"
