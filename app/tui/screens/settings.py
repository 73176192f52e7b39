"""Settings form. Values are checked with the same rules as the config file; a bad value keeps the form
open with the reason, in words, under its field. The first field has the focus when the form opens.
Ctrl+S (or Enter in a field) saves, Esc leaves unchanged."""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Switch

from app.config import ConfigError, Settings

# (setting, label, its name in a sentence); booleans become switches
FIELDS = [
    ("temperature", "Temperature (0 = greedy)", "Temperature"),
    ("top_p", "Top-p", "Top-p"),
    ("top_k", "Top-k (0 = off)", "Top-k"),
    ("min_p", "Min-p", "Min-p"),
    ("repeat_penalty", "Repeat penalty (1 = off)", "Repeat penalty"),
    ("max_tokens", "Max tokens per reply", "Max tokens"),
    ("seed", "Seed (-1 = random)", "Seed"),
    ("draft_max", "Draft max (k)", "Draft max"),
    ("draft_min", "Draft min", "Draft min"),
    ("draft_p_min", "Draft p-min (confidence stop)", "Draft p-min"),
    ("adaptive", "Adaptive draft length", "Adaptive draft length"),
    ("exact", "Exact (output identical to plain)", "Exact"),
    ("gpu_layers", "Main model GPU layers (-1 = all)", "GPU layers"),
    ("draft_on_gpu", "Draft model on GPU (off = CPU)", "Draft on GPU"),
    ("ctx_size", "Context size", "Context size"),
    ("threads", "Threads", "Threads"),
    ("rpc", "RPC workers for the main model", "RPC workers"),
    ("tensor_split", "Tensor split across workers", "Tensor split"),
    ("system", "System message", "System message"),
]
RELOAD_FIELDS = {"gpu_layers", "draft_on_gpu", "ctx_size", "threads", "exact", "rpc", "tensor_split"}  # need the models reloaded
_KINDS = {f.name: f.type for f in fields(Settings)}


def _number(value: float | None) -> str:
    return f"{value:g}"


def requirement(name: str) -> str:
    """What a setting's value must be, in words: "a whole number between 0 and 64"."""
    if name in Settings.FORMATS:
        return Settings.FORMATS[name][1]
    kind = {"int": "a whole number", "float": "a number", "bool": "on or off"}.get(str(_KINDS[name]), "text")
    low, high = Settings.LIMITS.get(name, (None, None))
    if low is not None and high is not None:
        return f"{kind} between {_number(low)} and {_number(high)}"
    if low is not None:
        return f"{kind}, at least {_number(low)}"
    return kind


def field_errors(settings: Settings, values: dict[str, object]) -> tuple[Settings, dict[str, str]]:
    """Apply the form's values to a copy of `settings`; each bad one's reason in words, by setting."""
    updated = copy.deepcopy(settings)
    errors: dict[str, str] = {}
    names = {name: said for name, _, said in FIELDS}
    for name, value in values.items():
        try:
            updated.set(name, value)
        except ConfigError:
            errors[name] = f"{names[name]} must be {requirement(name)}"
    if not errors and updated.draft_min > updated.draft_max:
        errors["draft_min"] = f"Draft min must not be more than draft max ({updated.draft_max})"
    return updated, errors


class SettingsScreen(ModalScreen[Settings | None]):
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]
    DEFAULT_CSS = """
    SettingsScreen .setting-error { color: $error; width: 100%; height: auto; padding: 0 0 0 36; display: none; }
    SettingsScreen .setting-error.-shown { display: block; }
    """

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.rejected: dict[str, object] = {}  # the values whose reasons are shown

    def compose(self) -> ComposeResult:
        with Vertical(id="settings"):
            yield Label("Settings", id="settings-title")
            with VerticalScroll(id="settings-fields"):
                for name, label, _ in FIELDS:
                    value = getattr(self.settings, name)
                    with Horizontal(classes="setting-row"):
                        yield Label(label, classes="setting-label")
                        if isinstance(value, bool):
                            yield Switch(value=value, id=f"set-{name}")
                        else:
                            yield Input(str(value), id=f"set-{name}", classes="setting-input")
                    yield Label("", id=f"error-{name}", classes="setting-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")

    def on_mount(self) -> None:
        # the first field, not the scrolling list around it: the first keystrokes go into a value
        self.query_one(f"#set-{FIELDS[0][0]}").focus()

    def values(self) -> dict[str, object]:
        return {name: self.query_one(f"#set-{name}").value for name, _, _ in FIELDS}

    def show_error(self, name: str, message: str) -> None:
        label = self.query_one(f"#error-{name}", Label)
        label.update(message)
        label.set_class(bool(message), "-shown")
        self.query_one(f"#set-{name}").set_class(bool(message), "-invalid")

    def action_save(self) -> None:
        values = self.values()
        updated, errors = field_errors(self.settings, values)
        self.rejected = {name: values[name] for name in errors}
        for name, _, _ in FIELDS:
            self.show_error(name, errors.get(name, ""))
        if errors:
            first = next(name for name, _, _ in FIELDS if name in errors)
            self.query_one(f"#set-{first}").focus()  # scrolls it into view, its reason under it
            return
        self.dismiss(updated)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_changed(self, event: Input.Changed) -> None:
        name = (event.input.id or "").removeprefix("set-")
        if name in self.rejected and event.value != self.rejected[name]:  # being corrected: its reason goes
            del self.rejected[name]
            self.show_error(name, "")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()
