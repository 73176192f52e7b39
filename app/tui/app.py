"""The Textual chat app. It only consumes engine events: the engine runs on worker threads and
never learns a UI exists (tests/test_architecture.py holds both sides to that).

F9 serves the loaded pair over HTTP (app/server): an EngineHost adopts the app's engine, and while it
serves, the app's own chat turns are host jobs too, so one worker thread runs everything on the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Input, Label, ProgressBar, Static

from app.config import Config, ConfigError, Settings, load_config, save_config
from app.engine import rpc
from app.engine.catalog import ModelEntry, default_search_dirs, find_models
from app.engine.chat import ChatSession, ChatWindow, Message
from app.engine.errors import LoadCancelled, TandemError
from app.engine.events import EarlierMessagesLeftOut, Event, Finished, PromptProgress, RoundEvent, TemplateFallback
from app.engine.gguf_info import read_gguf_info
from app.engine.loading import LOOKUP, MTP, NO_DRAFT, EngineSpec, describe_draft, load_engine, own_draft
from app.engine.speculative import CANCELLED, SpeculativeEngine
from app.engine.transcript import ReplyTranscript
from app.history import Conversation, ConversationLog, HistoryStore, read_conversation
from app.host import DONE, EngineHost, Job, JobFailed
from app.server import DEFAULT_HOST, DEFAULT_PORT, ServerThread
from app.tui.choices import DEMO, conversation_choices, draft_choices, model_choices, model_label
from app.tui.generation import ChatJob, Failed, HostGeneration, LiveStats
from app.tui.pacing import BUDGET_SHARED, RefreshPacer, ui_budget
from app.tui.screens.help import HelpScreen
from app.tui.screens.picker import PickerScreen
from app.tui.screens.settings import RELOAD_FIELDS, SettingsScreen
from app.tui.widgets.chat import AssistantMessage, ChatLog, UserMessage, first_shown
from app.tui.widgets.debug import DebugPane
from app.tui.widgets.status import KeyHints, StatusBar, StatusInfo

LOAD_STOP_WAIT = 10.0  # seconds a quit waits for a load to stop at its next step
PUMP_INTERVAL = 0.1  # how often the worker's queue is checked; repaints are paced (pacing.py)


@dataclass
class LaunchOptions:
    config_path: Path
    main: str | None = None  # from the command line; overrides the config
    draft: str | None = None
    dirs: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # flags given on the command line
    history_dir: Path | None = None
    serve_port: int = DEFAULT_PORT  # F9 serves on 127.0.0.1 at this port (0: any free one)
    parallel: int = 1  # sequences the engine holds (--parallel): F9's requests and the app's turn share batches


def key_label(key: str) -> str:
    return "Esc" if key == "escape" else key.replace("ctrl+", "^").upper()


def prefer_engine_thread() -> None:
    """The engine thread drops the GIL inside every llama.cpp call and needs it back when the call
    returns; with Python's default 5 ms switch interval a busy UI thread could hold it that long on
    every draft token. 0.5 ms bounds that wait (in bench/tui_bench.py the difference was within noise)."""
    sys.setswitchinterval(0.0005)


def reply_note(tokens: int, tokens_per_second: float, acceptance: float | None, cancelled: bool) -> str:
    """A reply's stats line (under it, live or reopened): tokens, speed, accepted drafts."""
    note = f"{'stopped · ' if cancelled else ''}{tokens} tokens · {tokens_per_second:.1f} tok/s"
    if acceptance is not None:
        note += f" · {acceptance:.0%} accepted"
    return note


def saved_reply_note(stats: dict[str, Any]) -> str:
    """The stats line of a reply read back from the history file (its end record)."""
    try:
        acceptance = float(stats["acceptance_rate"]) if stats.get("draft_model") else None
        return reply_note(int(stats["predicted_tokens_count"]), float(stats["tokens_per_second"]), acceptance,
                          bool(stats.get("cancelled")))  # fmt: skip
    except (KeyError, TypeError, ValueError):  # an older or hand-edited file: no line rather than a wrong one
        return "stopped" if stats.get("cancelled") else ""


def duration(seconds: float) -> str:
    if seconds < 1.5:
        return "a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


class TandemApp(App[None]):
    CSS_PATH = "tandem.tcss"
    # toasts sit above the prompt box, status bar and key hints (5 lines), not over the status figures
    CSS = "ToastRack { margin-bottom: 5; }"
    TITLE = "Tandem"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+p", "command_palette", "Palette", show=True),
        Binding("escape", "cancel_reply", "Stop reply"),
        Binding("f2,ctrl+o", "pick_model", "Model", priority=True),
        Binding("f3,ctrl+l", "pick_draft", "Draft", priority=True),
        Binding("f4,ctrl+g", "toggle_debug", "Debug", priority=True),
        Binding("f5,ctrl+t", "toggle_accepted", "Accepted", priority=True),
        Binding("f6", "settings", "Settings"),
        Binding("f7,ctrl+r", "history", "History", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("f9", "toggle_serving", "Serve", priority=True),
        Binding("f1", "help", "Help"),
        Binding("pageup", "scroll_chat(-1)", "Scroll the chat up", show=False),  # also while typing a message
        Binding("pagedown", "scroll_chat(1)", "Scroll the chat down", show=False),
    ]

    def __init__(self, options: LaunchOptions):
        super().__init__()
        self.options = options
        self.config = Config()
        self.engine: SpeculativeEngine | None = None
        self.spec: EngineSpec | None = None
        self.main_choice = DEMO
        self.session: ChatSession | None = None
        self.generation: HostGeneration | None = None
        # the one path to the engine: every chat turn is a job of this host (adopting the loaded pair), and F9 serves
        # requests through it too; no UI thread ever touches the engine
        self.host: EngineHost | None = None
        self.load_thread: threading.Thread | None = None  # the last load's; it may be running
        self.history_busy = False  # F7's list is being read, or a saved conversation is being opened
        self.left_out_said = 0  # how many early messages the model was last said to leave out
        self.load_cancel = threading.Event()  # set on quit: that load stops at its next step
        self.reply: AssistantMessage | None = None
        self.transcript: ReplyTranscript | None = None
        self.live = LiveStats()
        self.reading: PromptProgress | None = None  # the reply's prompt being read (before its first token)
        self.turn_started = False  # an event of the reply in progress has come (its prompt is in the engine)
        self.ctx_used = 0  # tokens of this conversation in the main context, as the engine thread left them
        self.colored = False
        self.loading = False
        self.history = HistoryStore(options.history_dir)
        self.log_file: ConversationLog = self.history.new_log()
        self.history_warned = False  # an unwritable history is reported once, not on every reply
        self.config_unreadable = False  # the config file did not load: left untouched until the user saves
        self.pending: list[Event | Failed] = []  # drained but not yet shown (repaints are paced)
        self.pacer = RefreshPacer(BUDGET_SHARED)
        self.last_finished: Finished | None = None  # the last reply's engine stats (read by the benchmark)
        # serving over HTTP (F9): the server, and every host job's items as the worker put them, in order
        self.serve_port = options.serve_port
        self.serving: ServerThread | None = None  # set from F9 until the server has stopped
        self.serving_starting = False  # binding and scanning the model folders (on a thread)
        self.serving_stopping = False
        self.host_events: queue.SimpleQueue[tuple[Job, object]] = queue.SimpleQueue()
        self.api_requests = 0  # API requests seen since the app started (numbers them in the debug pane)
        self._jobs_shown: set[int] = set()  # id(job) of the jobs whose header is shown and whose DONE has not come
        self._serving_figures: tuple[int, int] | None = None  # (served, queued) as last shown

    # ---- layout -------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="loading"):
            yield Label("", id="loading-label")
            yield ProgressBar(total=100, show_eta=False, id="loading-bar")
        with Horizontal(id="body"):
            yield ChatLog(id="chat")
            yield DebugPane(id="debug")
        yield Input(placeholder="Message (Enter sends, Esc stops a reply, F1 help)", id="prompt")
        yield StatusBar(id="status")
        yield KeyHints([(key_label(b.key.split(",")[0]), b.description) for b in self.BINDINGS if b.show])

    def on_mount(self) -> None:
        # kept as attributes: while a modal screen is up, a query would search the modal instead
        self.chat_log = self.query_one("#chat", ChatLog)
        self.debug_pane = self.query_one("#debug", DebugPane)
        self.status_bar = self.query_one("#status", StatusBar)
        self.prompt_box = self.query_one("#prompt", Input)
        self.loading_row = self.query_one("#loading")
        self.debug_pane.display = False
        self.loading_row.display = False
        rpc.add_lost_handler(self._worker_lost)
        try:
            self.config = load_config(self.options.config_path)
        except ConfigError as exc:
            self.config_unreadable = True
            self.notify(f"{exc}. Using the defaults; the file is left as it is until you save a change "
                        "(a copy of it is kept then).", severity="warning", timeout=10)  # fmt: skip
        try:
            for name, value in self.options.settings.items():  # the flags typed on the command line
                self.config.settings.set(name, value)
            self.config.settings.check()
        except ConfigError as exc:  # e.g. a typed --draft-min above the saved draft_max
            self.config = Config(main=self.config.main, draft=self.config.draft, dirs=self.config.dirs,
                                 default_drafts=self.config.default_drafts)  # fmt: skip
            self.notify(f"{exc}; using the default settings", severity="warning", timeout=10)
        self.config.dirs = [*self.options.dirs, *[d for d in self.config.dirs if d not in self.options.dirs]]
        main = self.options.main if self.options.main is not None else self.config.main
        draft = self.options.draft if self.options.draft is not None else self.config.draft
        self.set_interval(PUMP_INTERVAL, self.pump)
        self.set_interval(2.0, self.refresh_status)
        self.prompt_box.focus()
        self.refresh_status()
        self.load_pair(main, draft or self.default_draft_for(main), by_user=False)

    def on_unmount(self) -> None:
        self.load_cancel.set()  # a load in progress stops at its next step and keeps nothing
        generation = self.generation
        if generation is not None:  # quitting mid-reply: stop the worker; what streamed is already saved
            generation.cancel.set()
        if self.serving is not None:  # quitting while serving: stop listening, cancel the requests
            self.serving.stop(timeout=5.0)
        if self.host is not None:  # the worker ends once the turn in flight has seen its cancel
            self.host.stop(timeout=5.0)
        if self.load_thread is not None:
            self.load_thread.join(timeout=LOAD_STOP_WAIT)
        self.log_file.close()

    @property
    def unfinished_load(self) -> bool:
        """A load still inside llama.cpp after the app ended (one step can outlast LOAD_STOP_WAIT)."""
        return self.load_thread is not None and self.load_thread.is_alive()

    # ---- loading models -----------------------------------------------------------------
    def default_draft_for(self, main: str) -> str:
        """The draft last used with this main model (LM Studio's per-model default draft), whichever way the
        model was named (the demo choice, a relative or a resolved path); else the demo draft for the demo
        main model, else prompt lookup."""
        from app.engine.demo import demo_paths

        demo_main, demo_draft = demo_paths()
        is_demo = main == DEMO or _same_file(main, demo_main)
        keys = [main, _resolved(main)] if main != DEMO else [DEMO]
        if is_demo:
            keys += [DEMO, _resolved(str(demo_main))]
        for key in keys:
            remembered = self.config.default_drafts.get(key)
            if remembered:
                return remembered
        return str(demo_draft) if is_demo else own_draft(Path(main))

    def load_pair(self, main: str, draft: str, by_user: bool = True) -> None:
        """Load on a thread; the current pair keeps working until the new one is ready. by_user:
        the user chose this pair (the launch's own load does not overwrite an unreadable config)."""
        if self.loading:
            self.notify("Models are already loading.", severity="warning")
            return
        if self.generation is not None:
            self.notify("A reply is streaming; press Esc to stop it first.", severity="warning")
            return
        if self._refuse_while_serving():
            return
        self.loading = True
        self._show_loading(f"Preparing {Path(main).name if main else 'the demo pair'}", 0.0)
        self.refresh_status()
        settings = self.config.settings
        args = (main, draft, settings, by_user)
        self.load_cancel = threading.Event()
        self.load_thread = threading.Thread(target=self._load_thread, args=args, name="tandem-load", daemon=True)
        self.load_thread.start()

    def _load_thread(self, main: str, draft: str, settings: Settings, by_user: bool) -> None:
        last = [-1.0]

        def progress(what: str, fraction: float) -> None:
            if abs(fraction - last[0]) >= 0.02 or fraction in (0.0, 1.0):  # dozens of UI updates per load, not thousands
                last[0] = fraction
                self._from_thread(self._show_loading, what, fraction)

        def loading(what: str, fraction: float) -> None:
            progress(f"Loading {what}", fraction)

        try:
            main_path = main
            if main == DEMO:
                from app.engine.demo import demo_paths, ensure_demo_pair

                demo_main, demo_draft = ensure_demo_pair(lambda what, done, total: loading(what, done / total if total else 0.0))
                main_path = str(demo_main)
                if draft and Path(draft) == demo_paths()[1]:
                    draft = str(demo_draft)
            from app.host import resolve_spec  # one place decides what a choice loads (CLI, server, app)

            spec = resolve_spec(dataclasses.replace(self.config, settings=settings), main_path, draft or LOOKUP)
            spec = dataclasses.replace(spec, parallel=self.options.parallel)
            # the first run of a model on this machine measures its kernels: say so, step by step
            engine = load_engine(spec, loading, measuring=lambda what, done, total: progress(f"{what}: {done}/{total}", done / total),
                                 cancel=self.load_cancel)  # fmt: skip
        except LoadCancelled:
            return  # the app is quitting: nothing to show, nothing kept
        except TandemError as exc:
            self._from_thread(self._load_failed, str(exc))
        except Exception as exc:  # never a traceback: the previous models stay loaded
            self._from_thread(self._load_failed, f"{type(exc).__name__}: {exc}")
        else:
            self._from_thread(self._loaded, main, engine, spec, by_user)

    def _worker_lost(self, lost: rpc.WorkerLost) -> bool:
        """rpc.py's fault hook (on llama.cpp's thread): a worker lost while a pair loads onto it ends that load
        (its thread never returns). A reply's loss is the host's to report (a failed turn, the chat kept)."""
        if not (self.loading and self.config.settings.rpc):
            return False
        self.load_cancel.set()
        self._from_thread(self._load_failed, str(lost))
        return True

    def _from_thread(self, callback, *args, **kwargs) -> None:
        """Hand a worker thread's result to the UI; dropped quietly if the app has already quit."""
        with contextlib.suppress(RuntimeError):  # the app stopped while the worker ran (quit mid-load)
            self.call_from_thread(callback, *args, **kwargs)

    def _show_loading(self, what: str, fraction: float) -> None:
        self.loading_row.display = True
        self.loading_row.query_one(Label).update(f"{what} ")
        self.loading_row.query_one(ProgressBar).update(progress=fraction * 100)

    def _load_failed(self, message: str) -> None:
        self.loading = False
        self.loading_row.display = False
        kept = f" Still using {self.engine.main.name}." if self.engine else " Pick a model with F2."
        self.notify(message + kept, title="Could not load", severity="error", timeout=12)
        self.refresh_status()

    def _loaded(self, main_choice: str, engine: SpeculativeEngine, spec: EngineSpec, by_user: bool) -> None:
        self.loading = False
        self.loading_row.display = False
        previous, messages = self.engine, (self.session.messages if self.session else [])
        self.engine, self.spec, self.main_choice = engine, spec, main_choice
        self.last_finished, self.live = None, LiveStats()  # the last pair's figures are not this one's
        self.ctx_used = 0  # a new context: the conversation is read on the next turn (with progress)
        self.session = ChatSession(engine, system=self.config.settings.system or None)
        # the conversation carries over to the new pair (its tokens are evaluated on the next turn)
        self.session.messages += [m for m in messages if m.role != "system"]
        if self.host is not None:  # idle (loading waits for the reply to end and refuses while serving)
            self.host.stop(timeout=None)
        self.host = EngineHost.adopt(self.config, engine, spec, on_event=self._host_event)
        self.host.start()
        if previous is not None:
            previous.close()
        self.config.main = main_choice
        self.config.draft = spec.draft
        # under the resolved path: a picker's path, a typed one and the demo's own file find it again
        self.config.default_drafts[main_choice if main_choice == DEMO else _resolved(main_choice)] = spec.draft
        if by_user or not self.config_unreadable:
            self._save_config()
        self.debug_pane.note(f"── llama.cpp {engine.backend}")
        self.notify(f"{model_label(engine.main.info)} with {describe_draft(spec.draft)}", title="Ready", timeout=3)
        self.refresh_status()

    def _save_config(self) -> bool:
        try:
            backup = save_config(self.config, self.options.config_path)
        except ConfigError as exc:
            self.notify(str(exc), severity="warning")
            return False
        self.config_unreadable = False
        if backup is not None:
            self.notify(f"The config file that could not be read was kept as {backup}.",
                        title="Config replaced", severity="warning", timeout=12)  # fmt: skip
        return True

    def _warn_history(self) -> None:
        """Saving the chat failed (read-only or full disk): say so once; the chat itself goes on."""
        problem = self.log_file.problem()
        if problem and not self.history_warned:
            self.history_warned = True
            self.notify(problem, title="History not saved", severity="warning", timeout=12)

    # ---- chatting -------------------------------------------------------------------------
    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt":
            return
        text = event.value.strip()
        if not text:
            return
        if self.generation is not None:
            self.notify("A reply is still streaming; Esc stops it.", severity="warning")
            return
        if self.serving_stopping:
            self.notify("The server is stopping; send again in a moment.", severity="warning")
            return
        if self.engine is None or self.session is None or self.loading:
            self.notify("The models are not loaded yet." if self.loading else "No model loaded: press F2 to pick one.",
                        severity="warning")  # fmt: skip
            return
        if self.history_busy:
            self.notify("A saved conversation is being opened; send again in a moment.", severity="warning")
            return
        if self.host is not None and self.host.lost is not None:  # the pair died with its RPC worker
            self.notify(f"{self.host.lost}. Pick a pair with F2 to go on here.", title="Worker lost", severity="error", timeout=15)
            return
        event.input.value = ""
        chat = self.chat_log
        await chat.mount(UserMessage(text))
        self.transcript = ReplyTranscript()
        self.reply = AssistantMessage(self.engine.main.name, transcript=self.transcript, colored=self.colored)
        await chat.mount(self.reply)
        chat.scroll_end(animate=False)
        self.live = LiveStats()
        self.reading, self.turn_started = None, False
        header = f"── reply {len(self.session.messages) // 2 + 1}: {text[:60]}"
        config = self.config.settings.generation_config()
        assert self.host is not None  # adopted with the engine
        # the host's worker runs it (beside API requests while serving); its header comes in order with theirs
        self.generation = HostGeneration(self.host, self.session, text, config, self.log_file)
        self.generation.header = header
        self.refresh_status()
        self.prompt_box.cursor_blink = False  # a blink is a repaint: none while the engine needs the CPU
        self.pending = []
        self.pacer.budget = ui_budget(self.config.settings.threads)
        self.pacer.restart()
        # paint the new messages first: that layout pass would otherwise compete with the first rounds
        self.call_after_refresh(self.generation.start)

    async def pump(self) -> None:
        """Drain the worker's queue: one batch of widget updates per tick, however many rounds arrived."""
        if not self.host_events.empty():
            self._show_host_events()
        generation = self.generation
        if generation is None or self.reply is None or self.transcript is None or self.engine is None:
            return
        self.pending += generation.drain()
        if not self.pending:
            return
        done = any(isinstance(e, Finished | Failed) for e in self.pending)
        if not (done or self.pacer.due()):
            return
        events, self.pending = self.pending, []
        self.turn_started = True
        rounds = [e for e in events if isinstance(e, RoundEvent)]
        progress = [e for e in events if isinstance(e, PromptProgress)]
        if progress and not rounds:
            self._show_reading(progress[-1])
        elif self.reading is not None and rounds:  # the first token: read (an end clears it in _reply_done)
            self._reading_done()
        for event in rounds:
            self.transcript.add(event)
            self.live.add(event)
        self.reply.append("".join(e.text for e in rounds))
        for event in events:
            if isinstance(event, Finished):
                await self._finished(event)
            elif isinstance(event, Failed):
                await self._failed(event)
            elif isinstance(event, TemplateFallback | EarlierMessagesLeftOut):
                self._say_notice(event)
        self.refresh_status()
        self.chat_log.follow()
        self.pacer.updated()
        self._warn_history()

    def _say_notice(self, notice: TemplateFallback | EarlierMessagesLeftOut) -> None:
        """A turn's notice as a toast when it is news (the debug pane has it every time, from the host's events)."""
        if isinstance(notice, TemplateFallback) and notice.first:
            self.notify(notice.sentence(), title="chat template", severity="warning", timeout=12)
        elif isinstance(notice, EarlierMessagesLeftOut) and notice.left_out != self.left_out_said:
            self.left_out_said = notice.left_out  # said when the reading moves, not every turn
            self.notify(notice.sentence().capitalize() + ".", title="long conversation", timeout=8)

    async def _finished(self, finished: Finished) -> None:
        assert self.transcript is not None and self.reply is not None
        self.transcript.add(finished)
        stats = finished.stats
        cancelled = stats.stop_reason == CANCELLED
        note = reply_note(stats.predicted_tokens_count, stats.tokens_per_second,
                          stats.acceptance_rate if stats.draft_model else None, cancelled)  # fmt: skip
        read = self.reading
        if cancelled and read is not None and not finished.tokens:  # stopped while the conversation was read
            note = (f"stopped while reading the conversation ({read.done:,}/{read.total:,} tokens read; "
                    "the next message goes on from there)")  # fmt: skip
        await self.reply.finish(finished.text, note, cancelled)
        self._reply_done()
        self.prompt_box.cursor_blink = True
        self.last_finished = finished

    async def _failed(self, failed: Failed) -> None:
        assert self.generation is not None and self.reply is not None
        text = self.generation.user_text
        self._reply_done()
        self.prompt_box.cursor_blink = True
        chat = self.chat_log
        # the engine dropped the turn; drop its widgets and give the text back so nothing typed is lost
        await self.reply.remove()
        user_messages = chat.query(UserMessage)
        if user_messages:
            await user_messages.last().remove()
        prompt = self.prompt_box
        if not prompt.value:
            prompt.value = text
        self.notify(failed.message, title="Reply failed", severity="error", timeout=12)

    def _reply_done(self) -> None:
        generation = self.generation
        self.generation = None
        if generation is not None and generation.ctx_tokens is not None:
            self.ctx_used = generation.ctx_tokens
        if self.reading is not None:
            self._reading_done()

    def action_cancel_reply(self) -> None:
        if self.generation is not None:
            self.generation.cancel.set()

    def _show_reading(self, progress: PromptProgress) -> None:
        """The reply's prompt is being read (a reopened chat, another model): how far, how long, how to stop."""
        first = self.reading is None
        self.reading = progress
        left = progress.seconds_left
        what = f"reading the conversation: {progress.done:,}/{progress.total:,} tokens"
        self.loading_row.display = True
        self.loading_row.query_one(Label).update(f"{what.capitalize()}, about {duration(left)} left · Esc stops ")
        self.loading_row.query_one(ProgressBar).update(progress=100 * progress.done / max(progress.total, 1))
        if self.reply is not None:
            self.reply.border_subtitle = what
        if first:
            self.refresh_status()

    def _reading_done(self) -> None:
        self.reading = None
        if not self.loading:
            self.loading_row.display = False
        if self.reply is not None and self.generation is not None:
            self.reply.border_subtitle = ""

    def action_scroll_chat(self, direction: int) -> None:
        """PageUp / PageDown scroll the chat wherever the focus is (typing a message included)."""
        if direction < 0:
            self.chat_log.scroll_page_up(animate=False)
        else:
            self.chat_log.scroll_page_down(animate=False)

    async def action_new_chat(self) -> None:
        if self.generation is not None:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return
        await self.chat_log.remove_children()
        if self.engine is not None:
            self.session = ChatSession(self.engine, system=self.config.settings.system or None)
            self.left_out_said = 0
        self.last_finished, self.live = None, LiveStats()  # the last chat's figures are not this one's
        self.ctx_used = 0  # nothing of the new chat is in the context yet (what it can reuse, its first turn keeps)
        self.log_file.close()
        self.log_file = self.history.new_log()
        self.debug_pane.note("── new chat")
        self.refresh_status()

    # ---- serving over HTTP (F9) -------------------------------------------------------------
    def action_toggle_serving(self) -> None:
        if self.serving is None:
            self._start_serving()
        elif self.serving_starting:
            self.notify("The server is starting.", severity="warning")
        else:
            self._stop_serving()

    def _refuse_while_serving(self) -> bool:
        """Loading a pair would replace the engine the server's worker uses: not while serving."""
        if self.serving is not None:  # starting, serving or stopping
            self.notify("The loaded pair is being served: stop serving first (F9).", severity="warning")
            return True
        return False

    def _start_serving(self) -> None:
        if self.loading or self.engine is None or self.spec is None:
            self.notify("The models are not loaded yet." if self.loading else "No model loaded: press F2 to pick one.",
                        severity="warning")  # fmt: skip
            return
        if self.generation is not None:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return
        assert self.host is not None
        # the app's host, its turns among the requests (one more sequence when loaded with --parallel N)
        server = ServerThread(self.host, DEFAULT_HOST, self.serve_port, dirs=list(self.config.dirs), owns_host=False)
        self.serving, self.serving_starting, self.serving_stopping = server, True, False
        self.refresh_status()
        threading.Thread(target=self._start_serving_thread, args=(server,), name="tandem-serve", daemon=True).start()

    def _start_serving_thread(self, server: ServerThread) -> None:
        """Bind the port and list the model folders (GGUF headers: not on the UI thread), then serve."""
        try:
            server.start()
        except OSError as exc:
            port = server.port
            reason = f"port {port} is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            self._from_thread(self._serving_failed, server, f"Could not serve on {server.host}:{port}: {reason}.")
        except Exception as exc:  # never a traceback in the UI
            self._from_thread(self._serving_failed, server, f"Could not serve: {type(exc).__name__}: {exc}")
        else:
            self._from_thread(self._serving_started, server)

    def _serving_failed(self, server: ServerThread, message: str) -> None:
        if self.serving is server:
            self.serving, self.serving_starting = None, False
        self.notify(message, title="Not serving", severity="error", timeout=12)
        self.refresh_status()

    def _serving_started(self, server: ServerThread) -> None:
        if self.serving is not server:
            return
        self.serving_starting = False
        host = server.engine_host
        self.debug_pane.note(f"── serving {host.describe()} at {server.url}/v1")
        self.notify(f"{host.describe()} at {server.url}/v1 (LM Studio API at {server.url}/api/v0). F9 stops.",
                    title="Serving", timeout=8)  # fmt: skip
        self.refresh_status()

    def _stop_serving(self) -> None:
        server = self.serving
        if server is None or self.serving_stopping:
            return
        self.serving_stopping = True  # a chat turn now waits; requests get 503 until the worker has ended
        self.refresh_status()
        threading.Thread(target=self._stop_serving_thread, args=(server,), name="tandem-stop-serving", daemon=True).start()

    def _stop_serving_thread(self, server: ServerThread) -> None:
        server.stop(timeout=None)  # returns once the requests have ended (the app's own turn goes on)
        self._from_thread(self._serving_stopped, server)

    def _serving_stopped(self, server: ServerThread) -> None:
        if self.serving is not server:
            return
        self.serving, self.serving_stopping = None, False
        self._show_host_events()
        self.debug_pane.note(f"── stopped serving ({server.engine_host.served} requests served)")
        self.notify(f"Stopped serving {server.url}", timeout=4)
        self.refresh_status()

    def _host_event(self, job: Job, item: object) -> None:
        """The host's observer, on its worker thread, once per round: only enqueue (no Textual call here)."""
        self.host_events.put((job, item))

    def _show_host_events(self) -> None:
        """Every host job's rounds in the debug pane, in the order the worker ran them: API requests under a
        header line of their own, the app's replies under theirs. One batch per tick."""
        pane = self.debug_pane
        rounds: list[RoundEvent] = []
        while True:
            try:
                job, item = self.host_events.get_nowait()
            except queue.Empty:
                break
            key = id(job)  # the job is alive (the queue holds it) until its DONE is read: its id is its own
            if key not in self._jobs_shown:
                pane.add_rounds(rounds)
                rounds = []
                if isinstance(job, ChatJob) and job.turn is not None:
                    header = job.turn.header
                else:
                    self.api_requests += 1
                    header = f"── API request {self.api_requests}: {_request_summary(job)}"
                pane.note(header)
                self._jobs_shown.add(key)
            if isinstance(item, RoundEvent):
                rounds.append(item)
                continue
            pane.add_rounds(rounds)
            rounds = []
            if isinstance(item, Finished):
                pane.note(item.stats.summary(), "bold cyan")
            elif isinstance(item, JobFailed):
                pane.note(f"failed: {item.error}", "bold red")
            elif isinstance(item, TemplateFallback | EarlierMessagesLeftOut):
                pane.note(item.sentence(), "yellow")
            elif item is DONE:
                self._jobs_shown.discard(key)
        pane.add_rounds(rounds)
        server = self.serving
        figures = (server.engine_host.served, server.engine_host.queued) if server is not None else None
        if figures != self._serving_figures:
            self.refresh_status()

    # ---- status ---------------------------------------------------------------------------
    def _status_info(self) -> StatusInfo:
        from app.engine.backend import gpu_memory

        info = StatusInfo()
        server = self.serving
        if server is not None:
            host = server.engine_host
            self._serving_figures = (host.served, host.queued)
            if self.serving_starting or self.serving_stopping:
                info.serving = f"{'starting' if self.serving_starting else 'stopping'} the server"
            else:
                info.serving = f"{server.url}/v1 served {host.served} queued {host.queued}"
        else:
            self._serving_figures = None
        if self.engine is not None and self.spec is not None:
            info.main = self.engine.main.path.name  # by the file picked, as the draft is (its metadata name can mislead)
            if self.spec.rpc:  # where it runs: on workers (the full list is in the debug pane's backend line)
                info.main += f" @ {len(self.spec.rpc)} RPC"
            info.draft = describe_draft(self.spec.draft) if self.spec.draft != NO_DRAFT else "none"
            info.ctx_size = self.engine.n_ctx
            # while a turn runs, the context as the engine fills it; between turns, as the last turn of this
            # conversation left it (a new or reopened chat: none of it until its first turn reads it)
            live = self.generation is not None and self.turn_started and self.live.context
            info.ctx_used = self.live.context if live else self.ctx_used
            info.vram = gpu_memory()
            info.exact = self.engine.exact_kernels or self.spec.draft == NO_DRAFT or bool(self.engine.blocked)
        if self.loading:
            info.state = "loading"
        elif self.generation is not None:
            info.state = "generating" if self.live.rounds else "reading"  # the prompt first, then tokens
            info.tokens_per_second = self.live.tokens_per_second
            info.acceptance = self.live.acceptance if self.live.sent else None
            info.drafted = self.live.sent
            info.draft_length = self.live.last_k if self.live.rounds else None
        elif self.engine is None:
            info.state = "no model"
        elif self.last_finished is not None:  # between replies the last reply's figures stay up
            stats = self.last_finished.stats
            info.tokens_per_second = stats.tokens_per_second
            info.drafted = stats.accepted_draft_tokens_count + stats.rejected_draft_tokens_count
            info.acceptance = stats.acceptance_rate if info.drafted else None
            info.draft_length = self.live.last_k if self.live.rounds else None
            info.speedup = stats.speedup_estimate if stats.total_draft_tokens_count else None
        info.draft_state = self._draft_state()
        return info

    def _draft_state(self) -> str:
        """Closed (the last reply could not use its draft source here), idle (open, but the last round drafted
        nothing), drafting, or "" with no draft at all: from the engine's figures, never from its sentences."""
        if self.spec is None or self.spec.draft == NO_DRAFT or self.engine is None:
            return ""
        source = {LOOKUP: "lookup", MTP: "mtp"}.get(self.spec.draft, "model")
        closed = self.last_finished.stats.closed_sources if self.last_finished is not None else ()
        if self.engine.blocked or source in closed:
            return "off"
        if self.live.rounds:
            return "idle" if self.live.last_source == "none" else "drafting"
        return ""

    def refresh_status(self) -> None:
        self.status_bar.show(self._status_info())

    # ---- views ----------------------------------------------------------------------------
    def action_toggle_debug(self) -> None:
        pane = self.debug_pane
        pane.display = not pane.display
        if pane.display:
            pane.show()

    async def action_toggle_accepted(self) -> None:
        self.colored = not self.colored
        for message in self.chat_log.query(AssistantMessage):
            await message.set_colored(self.colored)
        self.notify("Accepted draft tokens shown in green" if self.colored else "Markdown view", timeout=3)

    def action_help(self) -> None:
        keys = [(b.key.replace(",", " / ").upper(), b.description) for b in self.BINDINGS]
        self.push_screen(HelpScreen(keys))

    def get_system_commands(self, screen: Screen):
        """Tandem's own commands only (Textual's theme, screenshot and maximize ones mean nothing here)."""
        yield SystemCommand("New chat", "Start a new conversation (Ctrl+N)", self.action_new_chat)
        yield SystemCommand("Pick main model", "Choose the main model (F2)", self.action_pick_model)
        yield SystemCommand("Pick draft", "Choose the MTP head, a draft model, prompt lookup or none (F3)", self.action_pick_draft)
        yield SystemCommand("Toggle debug pane", "Drafted vs accepted tokens per round (F4)", self.action_toggle_debug)
        yield SystemCommand("Toggle accepted-token view", "Color text from accepted drafts (F5)", self.action_toggle_accepted)
        yield SystemCommand("Settings", "Sampling, draft and hardware settings (F6)", self.action_settings)
        yield SystemCommand("Reopen a conversation", "Saved chat history (F7)", self.action_history)
        yield SystemCommand("Serve the loaded pair", "Start or stop the OpenAI / LM Studio HTTP API (F9)", self.action_toggle_serving)
        yield SystemCommand("Stop the reply", "Cancel the reply being generated (Esc)", self.action_cancel_reply)
        yield SystemCommand("Key bindings", "Show every key (F1)", self.action_help)
        yield SystemCommand("Quit", "Quit Tandem (Ctrl+Q)", self.action_quit)

    # ---- pickers --------------------------------------------------------------------------
    def _scan(self) -> list[ModelEntry]:
        return find_models(default_search_dirs(self.config.dirs))

    def action_pick_model(self) -> None:
        if self._refuse_while_serving():
            return
        threading.Thread(target=self._model_choices_thread, name="tandem-scan", daemon=True).start()

    def _model_choices_thread(self) -> None:
        from app.engine.demo import demo_paths

        try:
            choices = model_choices(self._scan(), demo_fetched=demo_paths()[0].exists())
        except Exception as exc:  # a scan must never kill the app: say what failed
            self._from_thread(self.notify, f"could not list models: {exc}", severity="error")
            return
        current = str(self.spec.main) if self.spec else None
        hint = "no GGUF files found: put models in ./models or add a folder with --models-dir"
        self._from_thread(self.push_screen, PickerScreen("Main model", choices, current, hint), self._model_chosen)

    def _model_chosen(self, choice: str | None) -> None:
        if choice is None:
            return
        self.load_pair(choice, self.default_draft_for(choice))

    def action_pick_draft(self) -> None:
        if self._refuse_while_serving():
            return
        if self.spec is None:
            self.notify("Load a main model first (F2).", severity="warning")
            return
        threading.Thread(target=self._draft_choices_thread, args=(self.spec,), name="tandem-scan", daemon=True).start()

    def _draft_choices_thread(self, spec: EngineSpec) -> None:
        try:
            main_info = read_gguf_info(spec.main)
            choices = draft_choices(spec.main, main_info, self._scan())
        except Exception as exc:  # TandemError for a vanished file, OSError for a folder gone mid-scan
            self._from_thread(self.notify, f"could not list drafts: {exc}", severity="error")
            return
        screen = PickerScreen(f"Draft for {main_info.name}", choices, spec.draft)
        self._from_thread(self.push_screen, screen, self._draft_chosen)

    def _draft_chosen(self, choice: str | None) -> None:
        if choice is None or self.spec is None:
            return
        self.load_pair(self.main_choice, choice)

    # ---- settings and history --------------------------------------------------------------
    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.config.settings), self._settings_saved)

    def _settings_saved(self, settings: Settings | None) -> None:
        if settings is None:
            return
        old = self.config.settings
        needs_reload = any(getattr(old, name) != getattr(settings, name) for name in RELOAD_FIELDS)
        if needs_reload and self.spec is not None and self.serving is not None:
            self.notify("These settings reload the models: stop serving first (F9). Nothing was changed.", severity="warning")
            return
        self.config.settings = settings
        if self._save_config():
            self.notify("Settings saved", timeout=3)
        if self.session is not None:
            system = [Message("system", settings.system)] if settings.system else []
            self.session.messages = system + [m for m in self.session.messages if m.role != "system"]
        if needs_reload and self.spec is not None:
            self.load_pair(self.main_choice, self.spec.draft)

    def action_history(self) -> None:
        if self.history_busy:
            return
        self.history_busy = True  # until the picker is up: a second F7 meanwhile opens nothing more
        threading.Thread(target=self._list_history, name="tandem-history", daemon=True).start()

    def _list_history(self) -> None:
        """Scan the saved conversations off the UI thread (thousands of files, each read once per change)."""
        try:
            choices = conversation_choices(self.history.summaries())
        except Exception as exc:  # never a traceback: say it, keep the chat
            choices, problem = [], f"{type(exc).__name__}: {exc}"
            self._from_thread(self.notify, f"Saved conversations cannot be listed: {problem}", severity="error")
        self._from_thread(self._show_history, choices)

    def _show_history(self, choices: list) -> None:
        self.history_busy = False
        self.push_screen(PickerScreen("Reopen a conversation", choices, str(self.log_file.path), "no saved conversations yet"),
                         self._history_chosen)  # fmt: skip

    def _history_chosen(self, choice: str | None) -> None:
        if choice is None:
            return
        if self.generation is not None:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return
        self.history_busy = True  # a turn waits until the conversation is in: it would join the wrong one
        self._show_loading(f"Opening {Path(choice).name}", 0.0)
        threading.Thread(target=self._read_history, args=(Path(choice),), name="tandem-history", daemon=True).start()

    def _read_history(self, path: Path) -> None:
        try:
            conversation = read_conversation(path)  # a long one is tens of MB: read off the UI thread
        except Exception as exc:  # never a traceback, never a chat that refuses every message afterwards
            self._from_thread(self._reopen_failed, f"{path.name} could not be read: {type(exc).__name__}: {exc}")
            return
        self._from_thread(self._reopen, conversation)

    def _reopen_failed(self, message: str) -> None:
        self.history_busy = False
        self.loading_row.display = self.loading
        self.notify(message + " The current chat goes on.", title="Could not reopen", severity="error", timeout=12)

    async def _reopen(self, conversation: Conversation) -> None:
        """Show the end of a reopened conversation (what fits: the file keeps the rest) and make it the chat."""
        chat = self.chat_log
        await chat.remove_children()
        title = self.engine.main.name if self.engine else "Tandem"
        start = first_shown(conversation.messages)
        widgets: list[Widget] = []
        if start > 0:
            widgets.append(Static(f"… {start:,} earlier message{'s are' if start != 1 else ' is'} not shown here "
                                  f"(all are in {conversation.path})", classes="earlier-note"))  # fmt: skip
        for index in range(start, len(conversation.messages)):
            message = conversation.messages[index]
            if message.role == "user":
                widgets.append(UserMessage(message.content))
            elif message.role == "assistant":
                widgets.append(self._saved_reply(conversation, index, title))
        try:
            await chat.mount_all(widgets)  # one layout pass for the lot
        except Exception as exc:  # a widget that cannot show its text: say so, keep the app usable
            self._reopen_failed(f"{conversation.path.name} could not be shown: {type(exc).__name__}: {exc}")
            return
        chat.scroll_end(animate=False)
        if self.session is not None:
            system = [m for m in self.session.messages if m.role == "system"]
            self.session.messages = system + [m for m in conversation.messages if m.role != "system"]
            self.session.window, self.left_out_said = ChatWindow(), 0  # read from the start of what fits
        self.log_file.close()
        self.log_file = ConversationLog(conversation.path)  # new turns continue the same file
        self.ctx_used = 0  # read on its next turn (with progress), reusing what the context shares with it
        self.history_busy = False
        self.loading_row.display = self.loading  # the "Opening" line, unless models are loading too
        self.notify(f"Reopened: {conversation.title}", timeout=3)
        self.refresh_status()

    def _saved_reply(self, conversation: Conversation, index: int, title: str) -> AssistantMessage:
        widget = AssistantMessage(title, conversation.messages[index].content, colored=self.colored)
        stats = conversation.stats.get(index)
        widget.border_subtitle = saved_reply_note(stats) if stats else ""
        if index in conversation.cancelled:
            widget.border_subtitle = widget.border_subtitle or "stopped"
            widget.add_class("cancelled")
        elif index in conversation.interrupted:  # the app was killed while this reply streamed
            widget.border_subtitle = "interrupted: the app stopped before this reply ended"
            widget.add_class("cancelled")
        return widget


def _resolved(path: str) -> str:
    """A model path as one key whichever way it was written (relative, with ~, through a symlink)."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return path


def _same_file(a: str | Path, b: str | Path) -> bool:
    return bool(str(a)) and _resolved(str(a)) == _resolved(str(b))


def _request_summary(job: Job) -> str:
    if job.messages:
        text = next((m.content for m in reversed(job.messages) if m.role == "user"), job.messages[-1].content)
    else:
        text = job.prompt or ""
    return text.replace("\n", " ")[:60]


def run_tui(options: LaunchOptions) -> int:
    prefer_engine_thread()
    app = TandemApp(options)
    app.run()
    if app.unfinished_load:
        # llama.cpp is still loading on a thread that could not stop in time: ending the interpreter around it
        # (its atexit and finalizers) can crash the process. The conversation file is closed and complete.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
