"""The debug pane: one line per round, drafted tokens colored by fate (KoboldCpp's PASS/FAIL log,
LM Studio's accepted-token view). Bounded, and only rendered while visible: when hidden it keeps
the last rounds in a ring buffer, so it costs generation nothing."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.widgets import RichLog

from app.engine.events import RoundEvent

MAX_LINES = 1000
KEPT_WHILE_HIDDEN = 300


def token_label(piece: bytes) -> str:
    text = piece.decode("utf-8", errors="replace")
    return text.replace("\n", "⏎").replace("\t", "⇥") or "∅"


def format_round(number: int, event: RoundEvent) -> Text:
    line = Text()
    n_drafted = len(event.drafted)
    verdict = "PASS" if n_drafted and event.n_accepted == n_drafted else ("FAIL" if n_drafted else "----")
    line.append(f"#{number:<4} ", "dim")
    line.append(f"{verdict} ", {"PASS": "bold green", "FAIL": "bold red"}.get(verdict, "dim"))
    line.append(f"{event.draft_source:<6} k={n_drafted:<2} {event.n_accepted}/{n_drafted} ", "cyan")
    line.append(f"{event.draft_seconds * 1000:5.1f}+{event.verify_seconds * 1000:5.1f} ms  ", "dim")
    for i in range(n_drafted):
        label = token_label(event.drafted_piece(i))
        if i < event.n_accepted:
            line.append(label, "black on green")
        elif i == event.n_accepted:
            line.append(label, "white on red")
        else:  # after the first rejection: discarded unseen
            line.append(label, "dim red strike")
        line.append(" ")
    line.append("→ ", "dim")
    if not n_drafted:  # nothing drafted: the main model's token is plain decoding, neither bonus nor fix
        line.append(token_label(event.main_piece), "bold")
    else:
        bonus = event.n_accepted == n_drafted
        line.append(token_label(event.main_piece), "black on cyan" if bonus else "black on yellow")
        line.append(" bonus" if bonus else " correction", "dim")
    if event.n_ignored:
        line.append(f"  {event.n_ignored} ignored", "magenta")
    if event.decision:
        line.append(f"  · {event.decision}", "italic dim")
    return line


class DebugPane(RichLog):
    def __init__(self, **kwargs):
        super().__init__(max_lines=MAX_LINES, wrap=True, markup=False, highlight=False, **kwargs)
        self.border_title = "Debug: draft vs accepted"
        self._recent: deque[Text | tuple[int, RoundEvent]] = deque(maxlen=KEPT_WHILE_HIDDEN)
        self.rounds_seen = 0

    def note(self, text: str, style: str = "bold") -> None:
        line = Text(text, style)
        self._recent.append(line)
        if self.display:
            self.write(line)

    def add_rounds(self, events: list[RoundEvent]) -> None:
        for event in events:
            self.rounds_seen += 1
            entry = (self.rounds_seen, event)
            self._recent.append(entry)
            if self.display:
                self.write(format_round(*entry))

    def show(self) -> None:
        """Render what happened while hidden (the last rounds), then follow live."""
        self.clear()
        for entry in self._recent:
            self.write(entry if isinstance(entry, Text) else format_round(*entry))
