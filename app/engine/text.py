"""Tokens to text for streaming: UTF-8 split across tokens, and stop strings that must never leak.

Text that could still be the start of a stop string is held back until it can't be.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, piece: Callable[[int], bytes], stop: Sequence[str] = ()):
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._released = 0
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add a token's text. Returns True when a stop string completed (the text is cut before it)."""
        before = len(self.text)
        self.text += self._decoder.decode(self._piece(token))
        if self._stops:
            start = max(0, before - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        return self.stopped

    def release(self) -> str:
        """Text that is safe to show now: everything that cannot turn into a stop string."""
        safe = len(self.text)
        if self._stops and not self.stopped:
            safe -= self._held_back()
        delta = self.text[self._released : max(safe, self._released)]
        self._released += len(delta)
        return delta

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        delta = self.text[self._released :]
        self._released = len(self.text)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
