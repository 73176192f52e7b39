"""The conversation: user messages, and replies that stream in as Markdown or as accepted-token text."""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream

from app.engine.transcript import DRAFT, ReplyTranscript

DRAFT_STYLE = "bold #5fd787"  # text from accepted draft tokens
MAIN_STYLE = ""  # text the main model produced itself


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(Text(text), classes="user-message")
        self.border_title = "You"


class AssistantMessage(Vertical):
    """A reply. While streaming, the Markdown view is fed through a MarkdownStream (it coalesces
    fragments when rendering falls behind); the accepted-token view is rebuilt from the transcript."""

    def __init__(self, title: str, text: str = "", transcript: ReplyTranscript | None = None, colored: bool = False):
        super().__init__(classes="assistant-message")
        self.border_title = title
        self.text = text
        self.transcript = transcript
        self.colored = colored
        self._stream: MarkdownStream | None = None
        self.markdown = Markdown(text)
        self.plain = Static(Text(text), classes="accepted-view")

    def compose(self):
        yield self.markdown
        yield self.plain

    def on_mount(self) -> None:
        self._apply_view()

    async def append(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if self.colored:
            self.refresh_colored()
        else:
            if self._stream is None:
                self._stream = Markdown.get_stream(self.markdown)
            await self._stream.write(delta)

    async def finish(self, text: str, note: str, cancelled: bool) -> None:
        """The reply is complete (or stopped): settle both views on the final text."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text = text
        await self.markdown.update(text)
        self.refresh_colored()
        self.border_subtitle = note
        self.set_class(cancelled, "cancelled")

    def refresh_colored(self) -> None:
        if self.transcript is None:
            self.plain.update(Text(self.text))
            return
        rendered = Text()
        for source, chunk in self.transcript.runs():
            rendered.append(chunk, DRAFT_STYLE if source == DRAFT else MAIN_STYLE)
        self.plain.update(rendered)

    async def set_colored(self, colored: bool) -> None:
        if colored == self.colored:
            return
        self.colored = colored
        if colored:
            self.refresh_colored()
        else:
            if self._stream is not None:  # restart the stream from the full text
                await self._stream.stop()
                self._stream = None
            await self.markdown.update(self.text)
        self._apply_view()

    def _apply_view(self) -> None:
        self.markdown.display = not self.colored
        self.plain.display = self.colored


class ChatLog(VerticalScroll):
    """Scrolls with the reply while the user is at the bottom; leaves them be when they scroll up."""

    def follow(self) -> None:
        if self.max_scroll_y - self.scroll_y <= 3:
            self.scroll_end(animate=False, immediate=False)
