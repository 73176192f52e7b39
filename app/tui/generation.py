"""One reply generated on a worker thread; the UI drains its events on a timer.

The engine loop must not wait for the UI: it only puts events on a queue (no UI call per token or
per round). The UI picks them up in batches, 20 times a second. The conversation file is appended
here, on the worker thread, so a kill loses at most the round in flight.

`Generation` runs a reply on a thread of its own; `HostGeneration` (while the app serves its pair over
HTTP) submits it to the EngineHost, whose one worker runs it between API requests, so two threads never
use the engine at once. Both have the same face: start, drain, cancel, running, wait.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from app.engine.chat import ChatSession, Message
from app.engine.errors import TandemError
from app.engine.events import EarlierMessagesLeftOut, Event, Finished, PromptProgress, RoundEvent, TemplateFallback
from app.engine.speculative import CANCELLED, GenerationConfig
from app.history import ConversationLog
from app.host import DONE, EngineHost, Job, JobFailed


@dataclass(frozen=True)
class Failed:
    message: str


def drain(events: queue.SimpleQueue) -> list[Event | Failed]:
    """Everything queued so far (the UI timer takes a batch per tick, never one event per call)."""
    out: list[Event | Failed] = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


class Generation:
    debug_from_host = False  # the app feeds the debug pane from this reply's own events

    def __init__(self, session: ChatSession, user_text: str, config: GenerationConfig, log: ConversationLog):
        self.session, self.user_text, self.config, self.log = session, user_text, config, log
        self.events: queue.SimpleQueue[Event | Failed] = queue.SimpleQueue()
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="tandem-generate", daemon=True)
        self.ctx_tokens: int | None = None  # the main context's length when the turn ended (read on the engine thread)

    def start(self) -> None:
        self.log.user(self.user_text)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.session.send(self.user_text, self.config, self.cancel):
                if isinstance(event, RoundEvent):
                    self.log.assistant(event.text)
                elif isinstance(event, Finished):
                    self.ctx_tokens = len(self.session.engine.main_ctx.tokens)
                    self.log.assistant(event.tail)
                    self.log.end(event.stats.as_dict(), cancelled=event.stats.stop_reason == CANCELLED)
                self.events.put(event)  # PromptProgress too: the app shows the prompt being read
        except TandemError as exc:
            self._failed(str(exc))
        except Exception as exc:  # never a traceback in the UI: say what failed, keep the conversation
            self._failed(f"generation failed: {type(exc).__name__}: {exc}")

    def _failed(self, message: str) -> None:
        self.ctx_tokens = len(self.session.engine.main_ctx.tokens)
        self.log.failed()
        self.events.put(Failed(message))

    def drain(self) -> list[Event | Failed]:
        return drain(self.events)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float) -> None:
        if self.thread.ident is not None:  # started (a quit can come before the start, queued after a repaint)
            self.thread.join(timeout=timeout)


@dataclass
class ChatJob(Job):
    """A host job that tells its reply each item as it is put (on the host's worker thread)."""

    turn: HostGeneration | None = None

    def put(self, item: object) -> None:
        if self.turn is not None:
            self.turn.record(item)
        super().put(item)


class HostGeneration:
    """One reply as an EngineHost job (the app is serving). The conversation and its file are updated on
    the worker thread, as Generation and ChatSession.send do: the user's message joins the chat when the
    turn starts, the assistant's on Finished (a stopped reply too), and a failed turn leaves the chat as
    it was. The host's observer feeds the debug pane, in the order the worker ran the jobs."""

    debug_from_host = True

    def __init__(self, host: EngineHost, session: ChatSession, user_text: str, config: GenerationConfig, log: ConversationLog):
        self.host, self.session, self.user_text, self.config, self.log = host, session, user_text, config, log
        self.events: queue.SimpleQueue[Event | Failed] = queue.SimpleQueue()
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        self.job = ChatJob(config, cancel=self.cancel, counted=False, turn=self, window=session.window)
        self._ended = False  # a Finished or a failure was passed on
        self._done = threading.Event()  # the host put the job's last item
        self._started = False
        self.header = f"── reply: {user_text[:60]}"  # the debug pane's line above its rounds (the app numbers it)
        self.ctx_tokens: int | None = None  # the main context's length when the turn ended (read on the worker)

    def start(self) -> None:
        self._started = True
        self.log.user(self.user_text)
        self.session.messages.append(Message("user", self.user_text))
        self.job.messages = list(self.session.messages)
        try:
            self.host.submit(self.job)
        except TandemError as exc:  # the queue is full, or the server is stopping
            self._fail(str(exc))
            self._done.set()

    def record(self, item: object) -> None:
        """Called on the host's worker thread with each item of the job, before the host's observer sees it."""
        if isinstance(item, RoundEvent):
            self.log.assistant(item.text)
            self.events.put(item)
        elif isinstance(item, PromptProgress | TemplateFallback | EarlierMessagesLeftOut):
            self.events.put(item)
        elif isinstance(item, Finished):
            self.ctx_tokens = len(self.session.engine.main_ctx.tokens)
            self.session.messages.append(Message("assistant", item.text))
            self.log.assistant(item.tail)
            self.log.end(item.stats.as_dict(), cancelled=item.stats.stop_reason == CANCELLED)
            self._ended = True
            self.events.put(item)
        elif isinstance(item, JobFailed):
            self.ctx_tokens = len(self.session.engine.main_ctx.tokens)
            self._fail(str(item.error))
        elif item is DONE:
            if not self._ended:  # stopped while it waited behind an API request: it never started
                self._fail("stopped before the reply started")
            self._done.set()

    def _fail(self, message: str) -> None:
        self._ended = True
        self.log.failed()
        if self.session.messages and self.session.messages[-1].role == "user":
            self.session.messages.pop()  # the turn failed: the conversation stays as it was
        self.events.put(Failed(message))

    def drain(self) -> list[Event | Failed]:
        return drain(self.events)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float) -> None:
        if self._started:
            self._done.wait(timeout)


class LiveStats:
    """tok/s and acceptance while a reply streams (the final figures come from GenerationStats)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first_at = 0.0
        self.tokens_at_first = 0
        self.accepted = 0
        self.sent = 0
        self.last_k = 0
        self.rounds = 0
        self.last_source = ""  # the last round's draft source ("model", "lookup"; "none": it drafted nothing)

    def add(self, event: RoundEvent) -> None:
        self.rounds += 1
        self.tokens += len(event.tokens)
        self.accepted += event.n_accepted
        self.sent += len(event.drafted)
        self.last_k = len(event.drafted)
        self.last_source = event.draft_source
        if not self.first_at:
            self.first_at = time.perf_counter()
            self.tokens_at_first = self.tokens

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.first_at if self.first_at else 0.0
        return (self.tokens - self.tokens_at_first) / elapsed if elapsed > 0.05 else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.sent if self.sent else 0.0
