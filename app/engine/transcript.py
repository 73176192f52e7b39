"""Which characters of a reply came from accepted draft tokens and which the main model wrote itself.

The chat view colors the two (LM Studio's "visualize accepted draft tokens"). Token pieces are
decoded incrementally (a character can span tokens) and credited to the token that completed it.
The released text can lag the decoded text (a possible stop string is held back), so the runs are
cut to the released length when shown.
"""

from __future__ import annotations

import codecs

from app.engine.events import Finished, RoundEvent

DRAFT, MAIN = "draft", "main"


class ReplyTranscript:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._runs: list[list[str]] = []  # [source, text], neighbouring runs of one source merged
        self.text = ""  # released text: what the user may see
        self.draft_chars = 0
        self.decoded_chars = 0

    def add(self, event: RoundEvent | Finished) -> None:
        if isinstance(event, Finished):
            self.text = event.text  # authoritative: includes the held-back tail, cut at a stop string
            return
        for i, piece in enumerate(event.emitted_pieces()):
            source = DRAFT if i < event.n_accepted else MAIN
            chunk = self._decoder.decode(piece)
            if not chunk:
                continue
            self.decoded_chars += len(chunk)
            if source == DRAFT:
                self.draft_chars += len(chunk)
            if self._runs and self._runs[-1][0] == source:
                self._runs[-1][1] += chunk
            else:
                self._runs.append([source, chunk])
        self.text += event.text

    def runs(self) -> list[tuple[str, str]]:
        """(source, text) runs covering exactly the released text."""
        out: list[tuple[str, str]] = []
        left = len(self.text)
        for source, chunk in self._runs:
            if left <= 0:
                break
            out.append((source, chunk[:left]))
            left -= len(chunk)
        if left > 0:  # text released at the very end (a final partial character): the main model's
            out.append((MAIN, self.text[-left:]))
        return out
