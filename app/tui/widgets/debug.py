"""The debug pane: one line per round, drafted tokens colored by fate (KoboldCpp's PASS/FAIL log,
LM Studio's accepted-token view), and any round expanded on demand (Enter on the selected round, or a click).

A round is always exactly one line, whatever the pane's width: the token run is cut (with "…"), never the
verdict, the counts or the main model's token. Consecutive tokens are told apart by alternating background
shades, not by spaces the model never produced; drafted tokens the main model threw away are struck.

It is a Line API widget: rounds are kept as events (bounded) and only the lines on screen are formatted, at the
pane's width, when painted; so a hidden pane costs generation nothing, and a resize re-lays every round out."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from app.engine import controller as codes
from app.engine.controller import Decision
from app.engine.events import RoundEvent

MAX_ENTRIES = 1000  # rounds and notes kept (the oldest go first)
TRIM = 100  # dropped at once when the pane is over MAX_ENTRIES: the row index is rebuilt once per TRIM entries
FALLBACK_WIDTH = 80  # before the pane has been laid out

# token shades: two per fate, alternating from one token to the next so their boundaries show without spaces
ACCEPTED = (Style.parse("black on #5fd787"), Style.parse("black on #afffaf"))
UNUSED = (Style.parse("#1c1c1c on #8a8a8a"), Style.parse("#1c1c1c on #b2b2b2"))  # accepted after the reply's end
REJECTED = Style.parse("bold white on #d70000 strike")
DISCARDED = (Style.parse("#ffd7d7 on #5f0000 strike"), Style.parse("#ffd7d7 on #870000 strike"))
BONUS = Style.parse("black on #5fd7ff")
CORRECTION = Style.parse("black on #ffd75f")
PLAIN = Style.parse("bold")
VERDICT_STYLES = {"PASS": "bold green", "FAIL": "bold red"}
SOURCE_WORDS = {"model": "draft", "mtp": "mtp", "lookup": "lookup", "none": "plain"}
SOURCE_NAMES = {"model": "the draft model", "mtp": "the MTP head", "lookup": "prompt lookup", "none": "no draft"}

_VISIBLE = {i: chr(0x2400 + i) for i in range(32)} | {0x0A: "⏎", 0x09: "⇥", 0x0D: "␍", 0x7F: "␡"}


def token_label(piece: bytes) -> str:
    """A token's text as it shows in one line: control characters as visible symbols, nothing as ∅, and a
    piece of a character (a token can end mid-UTF-8) as its bytes (\\xe4), not as �."""
    text = piece.decode("utf-8", errors="backslashreplace").translate(_VISIBLE)
    if not text:
        return "∅"
    return text if cell_len(text) else "◌" + text  # a lone combining mark would be invisible


_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x7F: "\\x7f"}


def quoted(text: str) -> str:
    """Text in quotes, every character visible: a leading space shows, a newline is \\n."""
    return "'" + text.translate(_ESCAPES) + "'"


def token_repr(piece: bytes) -> str:
    """A token exactly, quoted: spaces, newlines and bytes that are not whole UTF-8 characters spelled out."""
    return quoted(piece.decode("utf-8", errors="backslashreplace")) if piece else "∅ (special)"


# ---- what a round did ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fates:
    """What became of a round's drafted tokens, in order: `accepted` kept in the reply, then `unused` (the main
    model agreed, but the reply had ended: counted as ignored), then at most one `rejected`, then `discarded`
    (after a rejection: never checked)."""

    accepted: int
    unused: int
    rejected: int
    discarded: int
    ended: bool  # the reply ended in this round: the main model's token was not added to it

    @property
    def verdict(self) -> str:
        if self.rejected:
            return "FAIL"
        return "PASS" if self.accepted + self.unused else "----"

    def fate(self, i: int) -> str:
        if i < self.accepted:
            return "accepted"
        if i < self.accepted + self.unused:
            return "unused"
        return "rejected" if i == self.accepted + self.unused and self.rejected else "discarded"


def fates(event: RoundEvent) -> Fates:
    """The engine counts accepted drafts after the reply's end (an end-of-generation token, a stop string) as
    ignored, not accepted (`n_past_end`): a round that ended inside its accepted drafts is not a rejection."""
    n, a = len(event.drafted), event.n_accepted
    gap = n - a
    ended = len(event.tokens) <= a
    unused = min(gap, event.n_past_end)
    rejected = 1 if gap > unused else 0
    return Fates(a, unused, rejected, gap - unused - rejected, ended)


@dataclass(frozen=True)
class Reason:
    line: str  # in the round's line, when there is room
    short: str  # when the line is tight
    full: str  # in the expanded view


# the engine's reasons (controller.Decision's codes) -> (in the line, when tight, in full); {who}: the source's name
_REASONS: dict[str, tuple[str, str, str]] = {
    codes.PAYS: (
        "pays: {x}x plain, {a}% accepted",
        "pays {x}x",
        "drafting should pay: {a}% of {who}'s drafts are expected to be accepted, which runs {x}x as fast as plain decoding",
    ),
    codes.PLAIN: (
        "plain: drafting would not pay",
        "no gain",
        "plain decoding: no draft length was expected to beat plain decoding ({rate} tok/s here)",
    ),
    codes.UNMEASURED: ("plain: nothing measured yet", "measuring", "plain decoding: nothing measured yet to judge drafting by"),
    codes.PROBE: (
        "probe: trying {who} again",
        "probe",
        "a probe: {who} was left unused for a while ({a}% of its drafts accepted lately); it is tried again since it could "
        "run up to {x}x plain decoding",
    ),
    codes.EXPLORE: (
        "explore: {who} may pay",
        "explore",
        "{who} drafts on while its evidence is thin: {a}% of its drafts accepted so far, but {p}% is still plausible, "
        "which would run {x}x plain decoding",
    ),
    codes.FIRST_TOKEN: (
        "first token: always plain",
        "1st token",
        "the first token is decoded plainly: time to first token is plain decoding's, whatever drafting costs",
    ),
    codes.FIXED: ("fixed k={k} (adaptive off)", "fixed", "a fixed draft length of {k}: the adaptive controller is off (settings)"),
    codes.FIXED_LOOKUP: (
        "fixed: lookup matched {k}",
        "lookup",
        "adaptive drafting is off; prompt lookup matched {k} tokens of earlier text",
    ),
    codes.NO_MATCH: ("plain: no lookup match", "no match", "plain decoding: prompt lookup found no earlier text like the last tokens"),
    codes.NO_SOURCE: ("plain: no draft source", "plain", "plain decoding: no draft model or lookup"),
    codes.NEAR_END: ("plain: too near the end", "near end", "plain decoding: at most {left} tokens are left to draft, under draft-min {m}"),
    codes.OFF: ("plain: drafting off here", "draft off", "{detail}"),
}


def explain(why: Decision | None, source: str = "none") -> Reason:
    """The controller's reason (a code and its figures) for a user: why this round drafted what it did."""
    if why is None:
        return Reason("", "", "")
    texts = _REASONS.get(why.why)
    if texts is None:  # a code this pane does not know yet: the engine's own words
        words = why.reason
        return Reason(words, words[:12].rstrip() + ("…" if len(words) > 12 else ""), words)
    values = {"a": f"{why.acceptance * 100:.0f}", "x": f"{why.speedup:.2f}", "p": f"{why.plausible * 100:.0f}",
              "rate": f"{why.rate:.0f}", "k": why.k,
              "left": why.left, "m": why.draft_min, "detail": why.detail, "who": SOURCE_NAMES.get(source, source)}  # fmt: skip
    line, short, full = (text.format(**values) for text in texts)
    return Reason(line, short, full)


# ---- one round, one line ---------------------------------------------------------------------------------


def _run(event: RoundEvent, fate: Fates) -> list[tuple[str, Style]]:
    out = []
    for i in range(len(event.drafted)):
        kind = fate.fate(i)
        label = token_label(event.drafted_piece(i))
        if kind == "accepted":
            out.append((label, ACCEPTED[i % 2]))
        elif kind == "unused":
            out.append((label, UNUSED[i % 2]))
        elif kind == "rejected":
            out.append((label, REJECTED))
        else:
            out.append((label, DISCARDED[i % 2]))
    return out


def _crop(label: str, width: int) -> str:
    """The first cells of a label that fit in `width`."""
    if cell_len(label) <= width:
        return label
    out, used = [], 0
    for ch in label:
        w = cell_len(ch)
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "".join(out)


def _fit_run(run: list[tuple[str, Style]], pivot: int, budget: int) -> Text:
    """The tokens around `pivot` (the rejected one, else the last) that fit in `budget` cells, "…" where cut."""
    text = Text()
    if not run or budget <= 0:
        return text
    widths = [cell_len(label) for label, _ in run]
    if sum(widths) <= budget:
        for label, style in run:
            text.append(label, style)
        return text
    n = len(run)

    def need(i: int, j: int, used: int) -> int:
        return used + (i > 0) + (j < n)

    i, j, used = pivot, pivot + 1, widths[pivot]
    if need(i, j, used) > budget:  # the pivot alone is too wide: its first cells
        room = budget - (i > 0) - (j < n)
        if i > 0:
            text.append("…", "dim")
        if room > 0:
            text.append(_crop(run[pivot][0], room), run[pivot][1])
        if j < n and budget - cell_len(text.plain) > 0:
            text.append("…", "dim")
        return text
    moved = True
    while moved:
        moved = False
        if i > 0 and need(i - 1, j, used + widths[i - 1]) <= budget:
            i, used, moved = i - 1, used + widths[i - 1], True
        if j < n and need(i, j + 1, used + widths[j]) <= budget:
            j, used, moved = j + 1, used + widths[j], True
    if i > 0:
        text.append("…", "dim")
    for label, style in run[i:j]:
        text.append(label, style)
    if j < n:
        text.append("…", "dim")
    return text


def format_round(number: int, event: RoundEvent, width: int = 1000, selected: bool = False) -> Text:
    """One round in exactly one line of `width` cells: number, verdict, counts and source, the drafted tokens
    (cut to fit), the main model's token, then the reason and timings where there is room (the expanded view,
    round_details, always has them)."""
    fate = fates(event)
    n = len(event.drafted)
    verdict = fate.verdict
    line = Text(no_wrap=True, overflow="crop", end="")
    line.append(f"#{number:<3}", "reverse bold" if selected else "dim")
    line.append(" ")
    line.append(verdict, VERDICT_STYLES.get(verdict, "dim"))
    counts = f"{fate.accepted}/{n}" if n else "-"
    line.append(f" k={n:<2} {counts:<4} {SOURCE_WORDS.get(event.draft_source, event.draft_source):<6} ", "cyan")

    tail = Text(" → ", "dim")
    if not n:  # nothing drafted: plain decoding, neither bonus nor fix
        tail.append(token_label(event.main_piece), "dim" if fate.ended else PLAIN)
    else:
        bonus = not fate.rejected and fate.accepted == n
        tail.append(token_label(event.main_piece), "dim" if fate.ended else (BONUS if bonus else CORRECTION))
        if not fate.ended:
            tail.append(" bonus" if bonus else " fix", "dim")
    if fate.ended:
        tail.append(" end", "dim")
    if cell_len(tail.plain) > 14:  # a very long main token (a run of spaces, a code indent) gives way to the run
        tail = Text(" → ", "dim").append(_crop(tail.plain[3:], 10) + "…", "dim")

    reason = explain(event.why, event.draft_source)
    timing = f"  {event.draft_seconds * 1000:.1f}+{event.verify_seconds * 1000:.1f} ms"
    run = _run(event, fate)
    run_width = sum(cell_len(label) for label, _ in run)
    avail = width - cell_len(line.plain) - cell_len(tail.plain)
    extra = ""  # the reason and timings only where the whole token run fits too: the tokens come first
    candidates = (f"  {reason.line}{timing}" if reason.line else timing, f"  {reason.line}" if reason.line else "", f"  {reason.short}")
    for candidate in candidates:
        if candidate.strip() and run_width + cell_len(candidate) <= avail:
            extra = candidate
            break
    pivot = fate.accepted + fate.unused if fate.rejected else len(run) - 1
    line.append_text(_fit_run(run, pivot, avail - cell_len(extra)))
    line.append_text(tail)
    if extra:
        line.append(extra, "italic dim")
    if cell_len(line.plain) > width:
        line.truncate(width, overflow="crop")
    return line


def round_details(number: int, event: RoundEvent) -> list[Text]:
    """The expanded view of one round: every drafted token and its fate, the main model's token, the reason, timings."""
    fate = fates(event)
    n = len(event.drafted)
    who = SOURCE_NAMES.get(event.draft_source, event.draft_source)
    out: list[Text] = []
    if n:
        parts = [f"round {number}: {who} drafted {n} token{'s' * (n != 1)}; the main model accepted {fate.accepted}"]
        if fate.unused:
            parts.append(f"{fate.unused} more agreed after the reply had ended (ignored)")
        if fate.rejected:
            parts.append("rejected 1")
        if fate.discarded:
            parts.append(f"{fate.discarded} after it discarded unchecked")
        out.append(Text(", ".join(parts), "bold"))
        tokens = Text()
        marks = {"accepted": "✓", "unused": "·", "rejected": "✗", "discarded": "✗"}
        for i, (_, style) in enumerate(_run(event, fate)):
            kind = fate.fate(i)
            if i:
                tokens.append("  ")
            tokens.append(f"{i + 1}{marks[kind]} ", "dim")
            tokens.append(token_repr(event.drafted_piece(i)), style)
        out.append(tokens)
    else:
        out.append(Text(f"round {number}: nothing drafted, the main model decoded one token plainly", "bold"))
    ignored = event.n_ignored - fate.unused
    if ignored > 0:
        out.append(Text(f"{ignored} more drafted but not sent (unsure, or fewer than draft-min)", "dim"))
    main = Text("main model's token: ")
    if not n:
        main.append(token_repr(event.main_piece), PLAIN)
    elif fate.rejected:
        main.append(token_repr(event.main_piece), CORRECTION)
        main.append(f", its own choice in place of {token_repr(event.drafted_piece(fate.accepted + fate.unused))}")
    else:
        main.append(token_repr(event.main_piece), BONUS)
        main.append(", a bonus: every draft was right, one more token for free")
    if fate.ended:
        main.append(" (the reply ended this round)", "dim")
    out.append(main)
    reason = explain(event.why, event.draft_source)
    if reason.full:
        why = Text("why: ", "bold").append(reason.full, "italic")
        if event.why is not None and reason.full != event.why.reason:
            why.append(f"  [engine: {event.why.reason}]", "dim")
        out.append(why)
    total = event.draft_seconds + event.verify_seconds
    emitted = len(event.tokens)
    per = f", {total * 1000 / emitted:.2f} ms a token" if emitted else ""
    out.append(Text(f"time: draft {event.draft_seconds * 1000:.2f} ms + verify {event.verify_seconds * 1000:.2f} ms"
                    f" for {emitted} token{'s' * (emitted != 1)}{per}", "dim"))  # fmt: skip
    if event.text:
        out.append(Text("text: ", "dim").append(quoted(event.text)))
    return out


# ---- the pane ----------------------------------------------------------------------------------------------


class _Note:
    __slots__ = ("text",)

    def __init__(self, text: Text):
        self.text = text


class _Round:
    __slots__ = ("event", "expanded", "number")

    def __init__(self, number: int, event: RoundEvent):
        self.number, self.event, self.expanded = number, event, False


GUTTER = Text("  │ ", "dim")


class DebugPane(ScrollView, can_focus=True):
    """Rounds and notes (reply headers, summaries), bounded; focus it (Tab, or a click) to select a round with
    ↑/↓ and expand it with Enter."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Previous round", show=False),
        Binding("down", "cursor(1)", "Next round", show=False),
        Binding("home", "cursor_to(0)", "First round", show=False),
        Binding("end", "cursor_to(-1)", "Last round", show=False),
        Binding("enter,space", "expand", "Expand the round", show=False),
    ]

    DEFAULT_CSS = """
    DebugPane { overflow-x: hidden; overflow-y: scroll; scrollbar-size-vertical: 1; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.border_title = "Debug: draft vs accepted"
        self.border_subtitle = "Tab here, ↑↓ Enter: a round in full"
        self._entries: list[_Note | _Round] = []
        self._starts: list[int] = []  # the first row of each entry, at self._layout_width
        self._rows = 0
        self._layout_width = 0  # 0: the row index must be rebuilt
        self._cache: dict[tuple[object, int, bool, bool], list[Strip]] = {}
        self.cursor: int | None = None  # the selected entry (a round), shown while the pane has focus
        self.rounds_seen = 0

    # ---- what the app calls --------------------------------------------------------------------------------
    def note(self, text: str, style: str = "bold") -> None:
        self._append(_Note(Text(text, style)))

    def add_rounds(self, events: list[RoundEvent]) -> None:
        for event in events:
            self.rounds_seen += 1
            self._append(_Round(self.rounds_seen, event), refresh=False)
        if events:
            self._appended()

    def show(self) -> None:
        """The pane was just made visible: lay the kept rounds out at its width and follow the newest."""
        self._layout_width = 0
        self._cache.clear()
        self._relayout()
        self.scroll_end(animate=False, immediate=False, x_axis=False)

    @property
    def lines(self) -> list[Strip]:
        """Every row as painted at the pane's width (the expanded rounds' details included)."""
        width = self._width()
        return [strip for index in range(len(self._entries)) for strip in self._entry_strips(index, width)]

    # ---- entries and rows ----------------------------------------------------------------------------------
    def _width(self) -> int:
        return self.scrollable_content_region.width or self._layout_width or FALLBACK_WIDTH

    def _append(self, entry: _Note | _Round, refresh: bool = True) -> None:
        self._entries.append(entry)
        if self._layout_width:  # the index is current: extend it (a round is one row; a note wraps)
            self._starts.append(self._rows)
            self._rows += self._entry_rows(len(self._entries) - 1, self._layout_width)
        if refresh:
            self._appended()

    def _appended(self) -> None:
        if len(self._entries) > MAX_ENTRIES:
            self._drop_oldest(len(self._entries) - MAX_ENTRIES + TRIM)
        if not self.display or not self._layout_width:
            return  # laid out when shown
        follow = self.scroll_offset.y >= self.max_scroll_y - 1
        self.virtual_size = Size(self._layout_width, self._rows)
        if follow:
            self.scroll_end(animate=False, immediate=False, x_axis=False)
        self.refresh()

    def _drop_oldest(self, count: int) -> None:
        rows = self._starts[count] if self._layout_width and count < len(self._starts) else 0
        dropped = set(map(id, self._entries[:count]))
        del self._entries[:count]
        self._cache = {key: value for key, value in self._cache.items() if id(key[0]) not in dropped}
        if self.cursor is not None:
            self.cursor = self.cursor - count if self.cursor >= count else None
        self._layout_width = 0
        if self.display:
            self._relayout()
            self.scroll_to(y=max(0, self.scroll_offset.y - rows), animate=False)

    def _relayout(self) -> None:
        width = self._width()
        self._starts, row = [], 0
        for index in range(len(self._entries)):
            self._starts.append(row)
            row += self._entry_rows(index, width)
        self._rows, self._layout_width = row, width
        self.virtual_size = Size(width, row)
        self.refresh()

    def _entry_rows(self, index: int, width: int) -> int:
        entry = self._entries[index]
        if isinstance(entry, _Round) and not entry.expanded:
            return 1
        return len(self._entry_strips(index, width))

    def _entry_strips(self, index: int, width: int) -> list[Strip]:
        entry = self._entries[index]
        selected = index == self.cursor and self.has_focus
        key = (entry, width, selected, isinstance(entry, _Round) and entry.expanded)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        console = self.app.console
        options = console.options.update(width=width, height=None, highlight=False)
        if isinstance(entry, _Note):
            lines = console.render_lines(entry.text, options, pad=True)
        else:
            line = format_round(entry.number, entry.event, width, selected)
            lines = console.render_lines(line, options.update(no_wrap=True), pad=True)[:1]
            if entry.expanded:
                inner = options.update_width(max(width - GUTTER.cell_len, 10))
                gutter = list(GUTTER.render(console))
                for text in round_details(entry.number, entry.event):
                    for row in console.render_lines(text, inner, pad=True):
                        lines.append(Segment.adjust_line_length([*gutter, *row], width))
        strips = [Strip(line, width) for line in lines]
        if len(self._cache) > 4 * MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = strips
        return strips

    def _entry_at(self, row: int) -> int | None:
        if not self._entries or row < 0 or row >= self._rows:
            return None
        return bisect_right(self._starts, row) - 1

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if width and width != self._layout_width:
            self._cache.clear()
            self._relayout()
        row = self.scroll_offset.y + y
        index = self._entry_at(row)
        if index is None:
            return Strip.blank(width, self.rich_style)
        strips = self._entry_strips(index, self._layout_width)
        offset = row - self._starts[index]
        strip = strips[offset] if offset < len(strips) else Strip.blank(width)
        return strip.crop_extend(0, width, self.rich_style).apply_style(self.rich_style)

    def on_resize(self, event: events.Resize) -> None:
        if self.scrollable_content_region.width != self._layout_width:
            follow = self.scroll_offset.y >= self.max_scroll_y - 1
            self._cache.clear()
            self._relayout()
            if follow:
                self.scroll_end(animate=False, immediate=False, x_axis=False)

    # ---- selecting and expanding a round -----------------------------------------------------------------
    def _rounds(self) -> list[int]:
        return [i for i, entry in enumerate(self._entries) if isinstance(entry, _Round)]

    def on_focus(self) -> None:
        if self.cursor is None:
            rounds = self._rounds()
            if rounds:
                # the newest round on screen, else the newest
                bottom = self._entry_at(self.scroll_offset.y + self.scrollable_content_region.height - 1)
                shown = [i for i in rounds if bottom is None or i <= bottom]
                self.cursor = shown[-1] if shown else rounds[-1]
        self._refresh_cursor()

    def on_blur(self) -> None:
        self._refresh_cursor()

    def _refresh_cursor(self) -> None:
        self.refresh()

    def action_cursor(self, step: int) -> None:
        rounds = self._rounds()
        if not rounds:
            return
        if self.cursor is None or self.cursor not in rounds:
            self.cursor = rounds[-1]
        else:
            at = rounds.index(self.cursor)
            self.cursor = rounds[max(0, min(len(rounds) - 1, at + step))]
        self._scroll_to_cursor()
        self.refresh()

    def action_cursor_to(self, index: int) -> None:
        rounds = self._rounds()
        if rounds:
            self.cursor = rounds[index]
            self._scroll_to_cursor()
            self.refresh()

    def action_expand(self) -> None:
        if self.cursor is None:
            self.action_cursor(0)
        if self.cursor is not None:
            self.toggle(self.cursor)

    def toggle(self, index: int) -> None:
        """Expand a round into its full view, or fold it back into one line."""
        entry = self._entries[index]
        if not isinstance(entry, _Round):
            return
        entry.expanded = not entry.expanded
        self.cursor = index
        if self._layout_width:
            self._relayout()
        self._scroll_to_cursor()

    def _scroll_to_cursor(self) -> None:
        if self.cursor is None or not self._layout_width:
            return
        start = self._starts[self.cursor]
        rows = self._entry_rows(self.cursor, self._layout_width)
        height = self.scrollable_content_region.height or 1
        top = self.scroll_offset.y
        if start < top:
            self.scroll_to(y=start, animate=False)
        elif start + rows > top + height:
            self.scroll_to(y=min(start, start + rows - height), animate=False)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        index = self._entry_at(self.scroll_offset.y + offset.y)
        if index is not None and isinstance(self._entries[index], _Round):
            self.focus()
            self.toggle(index)

    def expanded_rounds(self) -> list[int]:
        """The numbers of the rounds shown in full."""
        return [e.number for e in self._entries if isinstance(e, _Round) and e.expanded]
