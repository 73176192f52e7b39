"""The conversation: user messages, and replies that stream in as Markdown or as accepted-token text."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import RenderableType
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Markdown, Static

from app.engine.chat import Message
from app.engine.transcript import DRAFT, ReplyTranscript

DRAFT_STYLE = "bold #5fd787"  # text from accepted draft tokens
MAIN_STYLE = ""  # text the main model produced itself


# A reopened conversation shows its last messages, as many as a screen's worth of scrolling needs: each is a
# Markdown widget, and thousands of them took minutes to lay out. The file keeps every message.
SHOWN_MESSAGES = 60
SHOWN_CHARACTERS = 100_000


def first_shown(messages: Sequence[Message]) -> int:
    """The index of the first message shown of a reopened conversation: the last SHOWN_MESSAGES, fewer when
    they hold more than SHOWN_CHARACTERS (the last one always)."""
    start, characters = len(messages), 0
    while start > 0 and len(messages) - start < SHOWN_MESSAGES:
        characters += len(messages[start - 1].content)
        if characters > SHOWN_CHARACTERS and start < len(messages):
            break
        start -= 1
    return start


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Text(text), classes="user-message")
        self.border_title = "You"


# A streaming reply grows in steps of this many lines: one layout pass per step, and never more than a step's
# worth of blank lines under the text (16 left up to 15 blank lines: on an 80x24 terminal, most of the screen).
HEIGHT_STEP = 4


class LiveReply(Widget):
    """The reply while it streams, rendered as Markdown (or accepted-token text) by Rich into cached
    lines. Its height only grows in steps, so a new token repaints this widget alone instead of
    re-laying-out the whole screen (Textual's Markdown widget re-lays-out on every append, which
    took CPU from the engine: see bench/tui_bench.py)."""

    # sized before the engine starts, so the first tokens repaint lines instead of re-laying-out the screen
    DEFAULT_CSS = f"LiveReply {{ height: {HEIGHT_STEP}; }}"

    def __init__(self) -> None:
        super().__init__()
        self._strips: list[Strip] = []
        self._height = HEIGHT_STEP

    def show(self, renderable: RenderableType) -> None:
        width = self.size.width or max(20, self.app.size.width - 20)
        options = self.app.console.options.update_width(width)
        lines = self.app.console.render_lines(renderable, options, pad=False)
        old = self._strips
        self._strips = [Strip(line, Segment.get_line_length(line)) for line in lines]
        if len(self._strips) > self._height:
            while len(self._strips) > self._height:
                self._height += HEIGHT_STEP
            self.styles.height = self._height  # the only layout pass: once per HEIGHT_STEP lines
            self.refresh()
            return
        # repaint only the lines that changed (usually the last one or two), not the whole reply
        pairs = zip(old, self._strips, strict=False)
        first = next((i for i, (a, b) in enumerate(pairs) if a.text != b.text), min(len(old), len(self._strips)))
        last = max(len(old), len(self._strips))
        if first < last:
            self.refresh(Region(0, first, self.size.width, last - first))

    def render_line(self, y: int) -> Strip:
        return self._strips[y] if y < len(self._strips) else Strip.blank(self.size.width)


class AssistantMessage(Vertical):
    """A reply: streamed through LiveReply, then settled into a Markdown widget (or the
    accepted-token view, rebuilt from the transcript) when it is complete."""

    def __init__(self, title: str, text: str = "", transcript: ReplyTranscript | None = None, colored: bool = False):
        super().__init__(classes="assistant-message")
        self.border_title = title
        self.text = text
        self.transcript = transcript
        self.colored = colored
        self.streaming = transcript is not None and not text
        self.live = LiveReply()
        self.markdown = Markdown(text)
        self.plain = Static(Text(text), classes="accepted-view")

    def compose(self):
        yield self.live
        yield self.markdown
        yield self.plain

    def on_mount(self) -> None:
        self._apply_view()

    def append(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        self.live.show(self.colored_text() if self.colored else RichMarkdown(self.text))

    async def finish(self, text: str, note: str, cancelled: bool) -> None:
        """The reply is complete (or stopped): settle into the Markdown widget (one layout pass)."""
        self.text = text
        self.streaming = False
        await self.markdown.update(text)
        self.plain.update(self.colored_text())
        self.border_subtitle = note
        self.set_class(cancelled, "cancelled")
        self._apply_view()

    def colored_text(self) -> Text:
        if self.transcript is None:
            return Text(self.text)
        rendered = Text()
        for source, chunk in self.transcript.runs():
            rendered.append(chunk, DRAFT_STYLE if source == DRAFT else MAIN_STYLE)
        return rendered

    async def set_colored(self, colored: bool) -> None:
        if colored == self.colored:
            return
        self.colored = colored
        if self.streaming:
            self.live.show(self.colored_text() if colored else RichMarkdown(self.text))
        elif colored:
            self.plain.update(self.colored_text())
        self._apply_view()

    def _apply_view(self) -> None:
        self.live.display = self.streaming
        self.markdown.display = not self.streaming and not self.colored
        self.plain.display = not self.streaming and self.colored


class ChatLog(VerticalScroll):
    """Scrolls with the reply while the user is at the bottom; leaves them be when they scroll up."""

    def follow(self) -> None:
        if self.max_scroll_y - self.scroll_y <= 3:
            self.scroll_end(animate=False, immediate=False)
