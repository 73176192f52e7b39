"""A keyboard picker: type to filter, arrows to move, Enter to choose, Esc to leave.
Used for the main model, the draft and reopening a saved conversation."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from app.tui.choices import Choice


class PickerScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("down", "move(1)", "Down", show=False),
        Binding("up", "move(-1)", "Up", show=False),
        Binding("pagedown", "move(10)", show=False),
        Binding("pageup", "move(-10)", show=False),
    ]

    def __init__(self, title: str, choices: list[Choice], current: str | None = None, empty_hint: str = ""):
        super().__init__()
        self.title_text = title
        self.choices = choices
        self.current = current
        self.empty_hint = empty_hint

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label(self.title_text, id="picker-title")
            yield Input(placeholder="type to filter", id="picker-filter")
            yield OptionList(id="picker-options")
            yield Label("↑↓ move · Enter choose · Esc close", id="picker-help")

    def on_mount(self) -> None:
        self._fill("")
        self.query_one(Input).focus()

    def _fill(self, needle: str) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        words = needle.lower().split()
        shown = [c for c in self.choices if all(w in f"{c.label} {c.detail}".lower() for w in words)]
        for choice in shown:
            prompt = Text(choice.label, style="bold" if choice.enabled else "dim")
            if choice.value == self.current:
                prompt.append("  (current)", "green")
            if choice.detail:
                prompt.append("\n  " + choice.detail, "dim" if choice.enabled else "red")
            options.add_option(Option(prompt, id=choice.value, disabled=not choice.enabled))
        if not shown:
            options.add_option(Option(Text(self.empty_hint or "nothing matches", "italic dim"), disabled=True))
        first = next((i for i, c in enumerate(shown) if c.enabled and c.value == self.current), None)
        if first is None:
            first = next((i for i, c in enumerate(shown) if c.enabled), None)
        options.highlighted = first

    def on_input_changed(self, event: Input.Changed) -> None:
        self._fill(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is not None:
            option = options.get_option_at_index(options.highlighted)
            if not option.disabled and option.id is not None:
                self.dismiss(option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None and not event.option.disabled:
            self.dismiss(event.option.id)

    def action_move(self, step: int) -> None:
        options = self.query_one(OptionList)
        for _ in range(abs(step)):
            options.action_cursor_down() if step > 0 else options.action_cursor_up()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
