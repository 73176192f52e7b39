"""Every key, once, with what it does. The app's own bindings are read from the app, so the list never goes
stale; the keys of the prompt, the chat and the debug pane are listed with them."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

# what each of the app's actions does, in a few words (an action not listed here shows its binding's description)
EXPLAIN = {
    "cancel_reply": "Stop the reply being written (what came so far stays in the chat)",
    "scroll_chat": "Scroll the chat, also while typing (the debug pane, when it has focus)",
    "new_chat": "Start a new conversation (the last one stays in the history, F7)",
    "pick_model": "Pick the main model (GGUF files in the model folders)",
    "pick_draft": "Pick the draft: the model's own MTP head, a small model of the same family, prompt lookup, or none",
    "settings": "Settings: sampling, draft length, context, threads, GPU layers",
    "toggle_serving": "Serve the loaded pair over HTTP (OpenAI and LM Studio API); again to stop",
    "toggle_debug": "Show or hide the debug pane: each round's drafted tokens, accepted or rejected",
    "toggle_accepted": "Replies as Markdown, or as plain text with accepted draft tokens in green",
    "history": "Reopen a saved conversation",
    "command_palette": "Command palette: every action by name",
    "help": "This list of keys (Esc, F1 or Q closes it)",
    "quit": "Quit (a reply being written is stopped; the chat is already saved)",
}
# what the status bar's words mean (a new user asked)
STATUS_WORDS = [
    ("reading / generating", "Reading the conversation (the prompt) into the context, then writing the reply"),
    ("tok/s", "Reply tokens per second, counted from the first token"),
    ("accept 62% of 40", "Of the 40 draft tokens the main model checked, it kept 62%: a rate over few tokens says little"),
    ("k 4", "The draft length of the last round: tokens proposed before the main model checks them in one batch"),
    ("off / idle", "Off: the draft cannot pay on this machine (F4 says why). Idle: it is on, but the last round "
                   "drafted nothing because drafting would not have paid there"),
    ("exact / ≈plain", "Exact: the reply is token for token what plain decoding gives. ≈plain: this CPU's fastest "
                       "kernels add up a batch slightly differently, so a near-tie may go the other way (same "
                       "quality; --exact or Settings make it exact)"),
    ("ctx 812/4096", "Tokens of the context in use, of its size"),
]

# the app's actions by group, in this order; any other binding goes under "More"
GROUPS = [
    ("Chat", ["cancel_reply", "scroll_chat", "new_chat", "history"]),
    ("Models and drafting", ["pick_model", "pick_draft", "settings", "toggle_serving"]),
    ("Views", ["toggle_debug", "toggle_accepted"]),
    ("App", ["command_palette", "help", "quit"]),
]
KEY_NAMES = {
    "escape": "Esc", "enter": "Enter", "space": "Space", "tab": "Tab", "up": "↑", "down": "↓", "left": "←", "right": "→",
    "pageup": "PageUp", "pagedown": "PageDown", "home": "Home", "end": "End", "delete": "Del", "backspace": "Backspace",
}  # fmt: skip
SCROLL_KEYS = {"pageup", "pagedown"}


def key_name(key: str) -> str:
    """Textual's key name as a keyboard shows it: ctrl+o is Ctrl+O, f2 is F2, escape is Esc."""
    *mods, last = key.split("+")
    last = KEY_NAMES.get(last, last.upper() if len(last) <= 3 else last.capitalize())
    return "+".join([*(m.capitalize() for m in mods), last])


def keys_label(keys: str) -> str:
    return " / ".join(key_name(k.strip()) for k in keys.split(","))


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]):
        super().__init__()
        self.key_rows = bindings  # (keys, description) of the app's bindings, as the app gave them

    def sections(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """(title, [(keys, what they do)]): every key once."""
        app_bindings: list[Binding] = [b for b in getattr(self.app, "BINDINGS", []) if isinstance(b, Binding)]
        by_action: dict[str, list[Binding]] = {}
        for binding in app_bindings:  # scroll_chat(-1) and scroll_chat(1) are one action
            by_action.setdefault(binding.action.split("(")[0], []).append(binding)
        seen: set[str] = set()

        def rows_for(action: str) -> list[tuple[str, str]]:
            bindings = by_action.get(action, [])
            if action in EXPLAIN:  # one row for all of the action's keys
                keys = [k.strip() for b in bindings for k in b.key.split(",") if k.strip() not in seen]
                seen.update(keys)
                return [(keys_label(",".join(keys)), EXPLAIN[action])] if keys else []
            out = []
            for binding in bindings:
                keys = [k.strip() for k in binding.key.split(",") if k.strip() not in seen]
                if keys:
                    seen.update(keys)
                    out.append((keys_label(",".join(keys)), binding.description))
            return out

        sections: list[tuple[str, list[tuple[str, str]]]] = []
        for title, actions in GROUPS:
            rows = [row for action in actions for row in rows_for(action)]
            if title == "Chat":
                rows.insert(0, ("Enter", "Send the message typed in the prompt"))
                seen.add("enter")
            sections.append((title, rows))
        grouped = {a for _, actions in GROUPS for a in actions}
        more = [row for action in by_action if action not in grouped for row in rows_for(action)]
        chat = sections[0][1]
        if not SCROLL_KEYS & seen:  # the app does not bind them itself: they scroll what has focus
            chat.append(("PageUp / PageDown", "Scroll the chat, or the debug pane when it has focus (the mouse wheel scrolls too)"))
        chat.append(("Tab / Shift+Tab", "Move the focus: prompt, chat, debug pane"))
        if more:
            sections.append(("More", more))
        sections.append((
            "Debug pane",
            [
                ("", "F4 shows it; Tab to it, or click a round, then:"),
                ("↑ / ↓", "Select a round"),
                ("Enter / Space", "Expand the selected round, or fold it: every drafted token, accepted or rejected, why, timings"),
                ("Click", "Expand or fold the round clicked"),
                ("Home / End", "First or last round"),
            ],
        ))  # fmt: skip
        sections.append(("The status bar", STATUS_WORDS))
        return sections

    def compose(self) -> ComposeResult:
        table = Table(title="Tandem keys", expand=True, box=None, show_header=False, pad_edge=False)
        table.add_column("Key", style="bold cyan", no_wrap=True)
        table.add_column("What it does", ratio=1)
        for number, (title, rows) in enumerate(self.sections()):
            if number:
                table.add_row("", "")
            table.add_row(Text(title, "bold underline"), "")
            for keys, what in rows:
                table.add_row(keys, what)
        with VerticalScroll(id="help") as scroll:
            scroll.border_subtitle = "↑↓ PageUp PageDown scroll · Esc closes"
            yield Static(table)
