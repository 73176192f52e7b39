"""One reply generated on a worker thread; the UI drains its events on a timer.

The engine loop must not wait for the UI: it only puts events on a queue (no UI call per token or
per round). The UI picks them up in batches, 20 times a second. The conversation file is appended
here, on the worker thread, so a kill loses at most the round in flight.

`HostGeneration` submits the reply to the app's EngineHost, whose one worker owns the engine (and runs API
requests beside it while the app serves): one path to the engine, never a second thread on it.
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


@dataclass
class ChatJob(Job):
    """A host job that tells its reply each item as it is put (on the host's worker thread)."""

    turn: HostGeneration | None = None

    def put(self, item: object) -> None:
        if self.turn is not None:
            self.turn.record(item)
        super().put(item)


class HostGeneration:
    """One reply as an EngineHost job. The conversation and its file are updated on
    the worker thread, as Generation and ChatSession.send do: the user's message joins the chat when the
    turn starts, the assistant's on Finished (a stopped reply too), and a failed turn leaves the chat as
    it was. The host's observer feeds the debug pane, in the order the worker ran the jobs."""

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
        self.ctx_tokens: int | None = None  # the sequence's length in the main context when the turn ended (events say)

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
            self.ctx_tokens = item.context
            self.events.put(item)
        elif isinstance(item, PromptProgress | TemplateFallback | EarlierMessagesLeftOut):
            self.events.put(item)
        elif isinstance(item, Finished):
            self.ctx_tokens = item.context
            self.session.messages.append(Message("assistant", item.text))
            self.log.assistant(item.tail)
            self.log.end(item.stats.as_dict(), cancelled=item.stats.stop_reason == CANCELLED)
            self._ended = True
            self.events.put(item)
        elif isinstance(item, JobFailed):
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
        self.context = 0  # the reply's sequence length in the main context, as of the last round

    def add(self, event: RoundEvent) -> None:
        self.rounds += 1
        self.tokens += len(event.tokens)
        self.accepted += event.n_accepted
        self.sent += len(event.drafted)
        self.last_k = len(event.drafted)
        self.last_source = event.draft_source
        self.context = event.context
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
