"""The status bar: models, speed, acceptance, draft length, context, memory."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
from rich.text import Text
from textual.widget import Widget


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
    draft_off: bool = False  # the draft model cannot pay on this machine (why: the debug pane, F4)
    serving: str = ""  # the API's URL and requests served and queued, while F9 serves


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class StatusBar(Widget):
    """One line, fixed height: it repaints without asking for a layout pass (Static.update would
    re-layout the whole screen on every refresh while a reply streams)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._process = psutil.Process()
        self._text = Text()

    def render(self) -> Text:
        return self._text

    def show(self, info: StatusInfo) -> None:
        text = Text()
        if info.state:
            text.append(f" {info.state} ", "reverse")
            text.append(" ")
        if info.serving:  # early in the line: it must show on an 80-column terminal
            text.append(info.serving, "bold magenta")
            text.append("  ")
        text.append("main ", "dim")
        text.append(info.main, "bold")
        text.append("  draft ", "dim")
        text.append(info.draft, "bold")
        if info.draft_off:
            text.append(" (off: cannot pay here, F4)", "yellow")
        text.append(f"  {info.tokens_per_second:5.1f} tok/s", "green")
        text.append("  accept ", "dim")
        text.append("—" if info.acceptance is None else f"{info.acceptance:.0%}")
        text.append("  k ", "dim")
        text.append("—" if info.draft_length is None else str(info.draft_length))
        if info.exact is not None:
            text.append("  exact" if info.exact else "  ≈plain", "green" if info.exact else "yellow")
        text.append("  ctx ", "dim")
        text.append(f"{info.ctx_used}/{info.ctx_size}")
        text.append("  RAM ", "dim")
        text.append(_gib(self._process.memory_info().rss))
        if info.vram is not None:
            text.append("  VRAM ", "dim")
            text.append(f"{_gib(info.vram[0])}/{_gib(info.vram[1])}")
        if text != self._text:
            self._text = text
            self.refresh()


class KeyHints(Widget):
    """The bottom line of key hints. Textual's Footer is a dozen child widgets, and every layout
    pass while a reply streams paid for them (about 8 ms a pass here); this is one line of text."""

    DEFAULT_CSS = "KeyHints { height: 1; background: $panel; }"

    def __init__(self, hints: list[tuple[str, str]], **kwargs):
        super().__init__(**kwargs)
        self._text = Text(no_wrap=True, overflow="ellipsis")
        for key, description in hints:
            self._text.append(f" {key} ", "bold reverse")
            self._text.append(f" {description}  ")

    def render(self) -> Text:
        return self._text
