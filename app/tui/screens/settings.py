"""Settings form. Values are checked with the same rules as the config file; a bad value keeps the
form open with a notice naming it. Ctrl+S (or Enter in a field) saves, Esc leaves unchanged."""

from __future__ import annotations

import copy
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Switch

from app.config import ConfigError, Settings

# (setting, label); booleans become switches
FIELDS = [
    ("temperature", "Temperature (0 = greedy)"),
    ("top_p", "Top-p"),
    ("top_k", "Top-k (0 = off)"),
    ("min_p", "Min-p"),
    ("repeat_penalty", "Repeat penalty (1 = off)"),
    ("max_tokens", "Max tokens per reply"),
    ("seed", "Seed (-1 = random)"),
    ("draft_max", "Draft max (k)"),
    ("draft_min", "Draft min"),
    ("draft_p_min", "Draft p-min (confidence stop)"),
    ("adaptive", "Adaptive draft length"),
    ("exact", "Exact (output identical to plain)"),
    ("gpu_layers", "Main model GPU layers (-1 = all)"),
    ("draft_on_gpu", "Draft model on GPU (off = CPU)"),
    ("ctx_size", "Context size"),
    ("threads", "Threads"),
    ("system", "System message"),
]
RELOAD_FIELDS = {"gpu_layers", "draft_on_gpu", "ctx_size", "threads", "exact"}  # need the models reloaded


class SettingsScreen(ModalScreen[Settings | None]):
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(id="settings"):
            yield Label("Settings", id="settings-title")
            with VerticalScroll(id="settings-fields"):
                for name, label in FIELDS:
                    value = getattr(self.settings, name)
                    with Horizontal(classes="setting-row"):
                        yield Label(label, classes="setting-label")
                        if isinstance(value, bool):
                            yield Switch(value=value, id=f"set-{name}")
                        else:
                            yield Input(str(value), id=f"set-{name}", classes="setting-input")
            with Horizontal(id="settings-buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")

    def collect(self) -> Settings:
        updated = copy.deepcopy(self.settings)
        for name, _ in FIELDS:
            widget = self.query_one(f"#set-{name}")
            updated.set(name, widget.value)
        updated.check()
        return updated

    def action_save(self) -> None:
        try:
            updated = self.collect()
        except ConfigError as exc:
            self.notify(str(exc), title="Not saved", severity="error")
            return
        self.dismiss(updated)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()
