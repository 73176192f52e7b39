"""Every key binding, read from the app itself so the list never goes stale."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]):
        super().__init__()
        self.key_rows = bindings

    def compose(self) -> ComposeResult:
        table = Table(title="Tandem keys", expand=True, show_edge=False)
        table.add_column("Key", style="bold cyan", no_wrap=True)
        table.add_column("Action")
        for keys, description in self.key_rows:
            table.add_row(keys, description)
        table.add_row("Ctrl+P", "Command palette (every action by name)")
        table.add_row("Enter", "Send the message")
        with VerticalScroll(id="help"):
            yield Static(table)
            yield Static("Esc, F1 or q closes this screen.", classes="dim")
