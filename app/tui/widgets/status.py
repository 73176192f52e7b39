"""The status bar (models, speed, acceptance, draft state, context, memory) and the line of key hints.

Both fit the terminal's width: the status bar gives up its least important parts first (long model names are
shortened, then memory, then labels, the draft length, the main model's name) and never its figures: tok/s,
acceptance, the draft's state and the context in use stay on an 80- or 60-column terminal. The key hints show
the keys that fit, F1 (every key) first."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import psutil
from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.widget import Widget

NARROW = 120  # below this many columns the screen gets the "-narrow" class (tandem.tcss: the debug pane goes under the chat)


@dataclass
class StatusInfo:
    main: str = "—"
    draft: str = "—"
    tokens_per_second: float = 0.0
    acceptance: float | None = None
    draft_length: int | None = None
    ctx_used: int = 0
    ctx_size: int = 0
    state: str = ""
    vram: tuple[int, int] | None = None
    exact: bool | None = None  # output identical to plain decoding (the kernels' self-check)
    # what drafting does: "off" (closed: it cannot pay on this machine), "idle" (open, but the last round drafted
    # nothing: it would not pay there), "drafting", or "" (no draft); why: the debug pane, F4
    draft_state: str = ""
    drafted: int | None = None  # draft tokens the main model checked (what the acceptance rate is of)
    speedup: float | None = None  # the last reply's estimated speed against plain decoding (GenerationStats)

    @property
    def draft_off(self) -> bool:
        return self.draft_state == "off"
    serving: str = ""  # the API's URL and requests served and queued, while F9 serves


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


NOISE = re.compile(r"(?i)([-_. ]?\bgguf\b|[-_ ]?\binstruct\b)")


def shorten(name: str, width: int | None) -> str:
    """A model's name in at most `width` cells: words that say little dropped first (GGUF, Instruct), then cut with "…"."""
    if width is None or cell_len(name) <= width:
        return name
    name = re.sub(r"\s{2,}", " ", NOISE.sub("", name)).strip(" -_") or name
    if cell_len(name) <= width:
        return name
    out = ""
    for ch in name:
        if cell_len(out + ch) > width - 1:
            break
        out += ch
    return out.rstrip(" -_.") + "…"


SERVING = re.compile(r"https?://[^/\s]*?(:\d+)/v1 served (\d+) queued (\d+)")


@dataclass(frozen=True)
class Shape:
    """How much of the status line to show."""

    main: int | None = None  # the main model's name: None whole, 0 left out, else at most this many cells
    draft: int | None = None  # likewise; 0: left out when the draft is off, else 6 cells
    state_words: int = 0  # how the draft's state is said: DRAFT_STATE's longest (0) to shortest (2)
    speedup: bool = True
    drafted: bool = True
    vram: bool = True
    ram: bool = True
    k: bool = True
    exact: bool = True
    gap: str = "  "
    accept: str = "accept "
    serving: str = "long"  # long, short, compact
    state: str = "long"  # long, short


# applied one after another until the line fits: the least important parts go first
STEPS: list[Callable[[Shape], Shape]] = [
    lambda s: replace(s, speedup=False),  # an estimate about the last reply: the first to go
    lambda s: replace(s, main=34, draft=28),
    lambda s: replace(s, vram=False),
    lambda s: replace(s, ram=False),
    lambda s: replace(s, main=24, draft=18),
    lambda s: replace(s, state_words=1, serving="short"),
    lambda s: replace(s, gap=" ", accept="acc "),
    lambda s: replace(s, main=16, draft=14),
    lambda s: replace(s, k=False),
    lambda s: replace(s, main=0),  # each reply's title names the main model
    lambda s: replace(s, exact=False),
    lambda s: replace(s, draft=10, state_words=2),
    lambda s: replace(s, state="short", draft=8),
    lambda s: replace(s, draft=0),  # the draft's name goes when it is off; else its first letters stay
    lambda s: replace(s, serving="compact"),
    lambda s: replace(s, drafted=False),  # on the narrowest lines the rate stands alone
]
STATE_SHORT = {"generating": "gen", "loading": "load", "no model": "none"}
DRAFT_STATE = {
    "off": (" (off: cannot pay here, F4)", " off (F4)", " off"),
    "idle": (" (idle: would not pay this round)", " idle (F4)", " idle"),
}


def status_line(info: StatusInfo, ram: int | None, shape: Shape) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis", end="")
    gap = shape.gap
    if info.state:
        state = STATE_SHORT.get(info.state, info.state) if shape.state == "short" else info.state
        text.append(f" {state} ", "reverse")
        text.append(" ")
    if info.serving:  # early in the line: it must show on an 80-column terminal
        serving = info.serving
        found = SERVING.fullmatch(serving)
        if shape.serving == "short" and found:
            serving = f"API {found[1]} served {found[2]} queued {found[3]}"
        elif shape.serving == "compact" and found:
            serving = f"API{found[1]} {found[2]}/{found[3]}"
        text.append(serving, "bold magenta")
        text.append(gap)
    if shape.main != 0:
        text.append("main ", "dim")
        text.append(shorten(info.main, shape.main), "bold")
        text.append(gap)
    text.append("draft", "dim")
    if not (shape.draft == 0 and info.draft_off):
        text.append(" ")
        text.append(shorten(info.draft, 6 if shape.draft == 0 else shape.draft), "bold")
    if info.draft_state in DRAFT_STATE:
        text.append(DRAFT_STATE[info.draft_state][shape.state_words], "yellow")
    text.append(f"{gap}{info.tokens_per_second:5.1f} tok/s" if gap == "  " else f"{gap}{info.tokens_per_second:.1f} tok/s", "green")
    if shape.speedup and info.speedup is not None:
        text.append(f" ({info.speedup:.2f}x plain)", "dim")
    text.append(f"{gap}{shape.accept}", "dim")
    text.append("—" if info.acceptance is None else f"{info.acceptance:.0%}")
    if shape.drafted and info.acceptance is not None and info.drafted is not None:  # a rate of how much: 95% of 3 is not 95% of 300
        text.append(f" of {info.drafted:,}" if shape.accept == "accept " else f"/{info.drafted:,}", "dim")
    if shape.k:
        text.append(f"{gap}k ", "dim")
        text.append("—" if info.draft_length is None else str(info.draft_length))
    if shape.exact and info.exact is not None:
        text.append(f"{gap}exact" if info.exact else f"{gap}≈plain", "green" if info.exact else "yellow")
    text.append(f"{gap}ctx ", "dim")
    text.append(f"{info.ctx_used}/{info.ctx_size}")
    if shape.ram and ram is not None:
        text.append(f"{gap}RAM ", "dim")
        text.append(_gib(ram))
    if shape.vram and info.vram is not None:
        text.append(f"{gap}VRAM ", "dim")
        text.append(f"{_gib(info.vram[0])}/{_gib(info.vram[1])}")
    return text


def fit_status(info: StatusInfo, ram: int | None, width: int) -> Text:
    """The fullest status line that fits in `width` cells (cut at the end only if even the tightest does not)."""
    shape = Shape()
    text = status_line(info, ram, shape)
    for step in STEPS:
        if text.cell_len <= width:
            break
        shape = step(shape)
        text = status_line(info, ram, shape)
    else:
        if text.cell_len > width:
            text.truncate(width, overflow="ellipsis")
        return text
    # a step can free more room than was needed: take back what fits of the draft length and the main model's name
    for more in (replace(shape, k=True), *(replace(shape, main=w) for w in (16, 12, 9) if shape.main == 0)):
        if more != shape:
            wider = status_line(info, ram, more)
            if wider.cell_len <= width:
                shape, text = more, wider
    return text


def process_memory() -> int:
    """This process's resident memory in bytes."""
    return _PROCESS.memory_info().rss


_PROCESS = psutil.Process()


class StatusBar(Widget):
    """One line, fixed height: it repaints without asking for a layout pass (Static.update would
    re-layout the whole screen on every refresh while a reply streams). What it shows is fitted to its
    width when painted, so a resized terminal gets a new fit without a new StatusInfo."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._info = StatusInfo()
        self._ram: int | None = None
        self._fitted: tuple[int, Text] | None = None

    def render(self) -> Text:
        width = self.size.width or 10_000
        if self._fitted is None or self._fitted[0] != width:
            self._fitted = (width, fit_status(self._info, self._ram, width))
        return self._fitted[1]

    def show(self, info: StatusInfo) -> None:
        ram = process_memory()
        if (info, _gib(ram)) != (self._info, _gib(self._ram or 0)):
            self._info, self._ram = replace(info), ram
            self._fitted = None
            self.refresh()

    def on_resize(self, event: events.Resize) -> None:
        # the status bar spans the terminal: it tells the screen when the layout should switch to narrow
        # (Textual's HORIZONTAL_BREAKPOINTS on the app would do the same with the same class)
        self.screen.set_class(event.size.width < NARROW, "-narrow")
        self._fitted = None


def _priority(key: str, index: int) -> tuple[int, int, int]:
    """F1 (every key) first, then Esc (stop a reply), then the function keys in order, then the rest as given."""
    if key == "F1":
        return (0, 0, index)
    if key == "Esc":
        return (1, 0, index)
    if re.fullmatch(r"F\d+", key):
        return (2, int(key[1:]), index)
    return (3, 0, index)


class KeyHints(Widget):
    """The bottom line of key hints. Textual's Footer is a dozen child widgets, and every layout
    pass while a reply streams paid for them (about 8 ms a pass here); this is one line of text,
    with the hints that fit the width (most useful first: F1 lists them all)."""

    DEFAULT_CSS = "KeyHints { height: 1; background: $panel; }"

    def __init__(self, hints: list[tuple[str, str]], **kwargs):
        super().__init__(**kwargs)
        self.hints = sorted(hints, key=lambda h: _priority(h[0], hints.index(h)))
        self._fitted: tuple[int, Text] | None = None

    def shown(self, width: int) -> list[tuple[str, str]]:
        """The hints that fit in `width` cells, most useful first (one that does not fit is skipped)."""
        out, used = [], 0
        for key, description in self.hints:
            cells = cell_len(f" {key}  {description} ")
            if used + cells <= width:
                out.append((key, description))
                used += cells
        return out

    def render(self) -> Text:
        width = self.size.width or 10_000
        if self._fitted is None or self._fitted[0] != width:
            text = Text(no_wrap=True, overflow="crop", end="")
            for key, description in self.shown(width):
                text.append(f" {key} ", "bold reverse")
                text.append(f" {description} ")
            self._fitted = (width, text)
        return self._fitted[1]
