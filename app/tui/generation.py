"""One reply generated on a worker thread; the UI drains its events on a timer.

The engine loop must not wait for the UI: it only puts events on a queue (no UI call per token or
per round). The UI picks them up in batches, 20 times a second. The conversation file is appended
here, on the worker thread, so a kill loses at most the round in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from app.engine.chat import ChatSession
from app.engine.errors import TandemError
from app.engine.events import Event, RoundEvent
from app.engine.speculative import CANCELLED, GenerationConfig
from app.history import ConversationLog


@dataclass(frozen=True)
class Failed:
    message: str


class Generation:
    def __init__(self, session: ChatSession, user_text: str, config: GenerationConfig, log: ConversationLog):
        self.session, self.user_text, self.config, self.log = session, user_text, config, log
        self.events: queue.SimpleQueue[Event | Failed] = queue.SimpleQueue()
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="tandem-generate", daemon=True)

    def start(self) -> None:
        self.log.user(self.user_text)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.session.send(self.user_text, self.config, self.cancel):
                if isinstance(event, RoundEvent):
                    self.log.assistant(event.text)
                else:
                    self.log.assistant(event.tail)
                    self.log.end(event.stats.as_dict(), cancelled=event.stats.stop_reason == CANCELLED)
                self.events.put(event)
        except TandemError as exc:
            self.log.failed()
            self.events.put(Failed(str(exc)))
        except Exception as exc:  # never a traceback in the UI: say what failed, keep the conversation
            self.log.failed()
            self.events.put(Failed(f"generation failed: {type(exc).__name__}: {exc}"))

    def drain(self) -> list[Event | Failed]:
        out: list[Event | Failed] = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


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

    def add(self, event: RoundEvent) -> None:
        self.rounds += 1
        self.tokens += len(event.tokens)
        self.accepted += event.n_accepted
        self.sent += len(event.drafted)
        self.last_k = len(event.drafted)
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
