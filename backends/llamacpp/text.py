"""From sampled tokens to text: UTF-8 across token boundaries, stop sequences, log probabilities."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from backends.common import first_stop


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's bytes and log probability, with the top alternatives."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]]
    offset: int
    """Characters of output text before this token."""

    @property
    def text(self) -> str:
        """The token as text; a token holding part of a character shows its bytes escaped."""
        return self.token.decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class StopScanner:
    """Turns token bytes into releasable text, holding back what may start a stop sequence.

    A character split over several tokens is released once complete; text that could be the
    beginning of a stop sequence waits until it is known not to be one.
    """

    stops: list[str]
    decoded_chars: int = 0
    """Characters decoded so far, released or held."""
    _held: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Text safe to release now, and whether a stop sequence was reached (cut before it)."""
        text = self._decoder.decode(data)
        self.decoded_chars += len(text)
        self._held += text
        cut = first_stop(self._held, self.stops)
        if cut >= 0:
            released, self._held = self._held[:cut], ""
            return released, True
        keep = self._prefix_overlap()
        released = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return released, False

    def flush(self) -> str:
        """Whatever is still held, at the end of generation.

        A character cut off by the token limit is dropped rather than shown as U+FFFD.
        """
        rest, self._held = self._held, ""
        self._decoder.reset()
        return rest

    def _prefix_overlap(self) -> int:
        """Length of the longest end of the held text that begins some stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best


def log_softmax_at(
    logits: npt.NDArray[np.float32], token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """Log probability of `token` under raw `logits`, and the `top` most likely tokens."""
    values = logits.astype(np.float64)
    peak = values.max()
    log_total = peak + np.log(np.exp(values - peak).sum())
    chosen = float(values[token] - log_total)
    if top <= 0:
        return chosen, []
    best = np.argpartition(values, -top)[-top:]
    best = best[np.argsort(-values[best])]
    return chosen, [(int(i), float(values[i] - log_total)) for i in best]
