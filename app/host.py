"""One engine, one worker thread, jobs in arrival order: what the HTTP server submits to (and what resolves
which files to load, for the CLI, the benchmark and the server alike).

llama.cpp contexts are not thread-safe, so one thread owns the loaded pair. A job names its main model
and draft (or takes the loaded ones); the worker switches pairs between jobs, never during one. Each job
has its own event queue and cancel flag, so a client that goes away stops its generation within a round
and the next job starts. The engine lives as long as its pair: a conversation that continues reuses both
contexts' KV prefix, and the adaptive controller's measurements carry from one request to the next.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.config import Config
from app.engine.chat import Message, tokenize_chat, tokenize_prompt
from app.engine.errors import TandemError
from app.engine.events import Event, Finished
from app.engine.loading import LOOKUP, NO_DRAFT, EngineSpec, describe_draft, load_engine
from app.engine.speculative import GenerationConfig, SpeculativeEngine


def resolve_spec(config: Config, main: str | None = None, draft: str | None = None) -> EngineSpec:
    """What to load: `main`/`draft` when given (a request, a picker), else the configuration's choice, the
    main model's default draft, or the demo pair (fetched on first use). A draft path is checked before
    anything is fetched, so a typo is said at once, not after a download."""
    from app.engine.gguf_info import read_gguf_info

    if draft is None:  # the configuration's draft belongs to the configuration's main model
        draft = config.draft if not main or main == config.main else ""
    main = main or config.main
    chosen = draft
    if main:
        draft_choice = chosen or config.default_drafts.get(main) or LOOKUP
        main_path = Path(main)
    else:
        from app.engine.demo import ensure_demo_pair

        if chosen not in ("", LOOKUP, NO_DRAFT):
            read_gguf_info(chosen)
        main_path, demo_draft = ensure_demo_pair()
        draft_choice = chosen or str(demo_draft)
    s = config.settings
    return EngineSpec(main=main_path, draft=draft_choice, gpu_layers=s.gpu_layers, draft_on_gpu=s.draft_on_gpu,
                      ctx_size=s.ctx_size, threads=s.threads, exact=s.exact)  # fmt: skip


class QueueFull(TandemError):
    pass


@dataclass(frozen=True)
class JobFailed:
    """A job ended without a reply: the error says why (a TandemError subclass: the server maps it to a status)."""

    error: TandemError


DONE = object()  # the last item of every job's queue


@dataclass
class Job:
    config: GenerationConfig
    messages: list[Message] | None = None  # a chat turn (rendered through the model's template)
    prompt: str | None = None  # or raw text (a completion)
    main: str | None = None  # a main model path; None: the loaded one
    draft: str | None = None  # a draft choice (path, "lookup", "none"); None: the main model's default
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Event | JobFailed, then DONE
    wake: Callable[[], None] | None = None  # called (on the worker thread) after each item: e.g. an asyncio wake-up

    def put(self, item: object) -> None:
        self.events.put(item)
        if self.wake is not None:
            self.wake()


class EngineHost:
    def __init__(self, config: Config, max_queue: int = 16, on_ready: Callable[[SpeculativeEngine], None] | None = None):
        self.config = config
        self.max_queue = max_queue
        self.engine: SpeculativeEngine | None = None
        self.spec: EngineSpec | None = None
        self.state = "loading"  # loading -> ready, or failed (with load_error)
        self.load_error = ""
        self.served = 0
        self._on_ready = on_ready
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0  # jobs queued, not yet started
        self._lock = threading.Lock()
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._work, name="tandem-host", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting += 1
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        if self.running is not None:
            self.running.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()

    def describe(self) -> str:
        if self.spec is None or self.engine is None:
            return "no model loaded"
        return f"{self.engine.main.name} with {describe_draft(self.spec.draft)}"

    # ---- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._switch(resolve_spec(self.config))
            self.state = "ready"
            if self._on_ready is not None:
                self._on_ready(self.engine)
        except TandemError as exc:  # the server keeps answering (health says why); requests may name another model
            self.state, self.load_error = "failed", str(exc)
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            self.running = job
            try:
                if not job.cancel.is_set():  # a client that left while queued costs nothing
                    self._run(job)
            finally:
                self.running = None
                job.put(DONE)

    def _run(self, job: Job) -> None:
        try:
            engine = self._engine_for(job)
            if job.messages is not None:
                tokens = tokenize_chat(engine.main, job.messages)
            else:
                tokens = tokenize_prompt(engine.main, job.prompt or "")
            for event in engine.generate(tokens, job.config, job.cancel):
                job.put(event)
                if isinstance(event, Finished):
                    self.served += 1
        except TandemError as exc:
            job.put(JobFailed(exc))
        except Exception as exc:  # never a dead worker: the job fails, the next one runs
            job.put(JobFailed(TandemError(f"generation failed: {type(exc).__name__}: {exc}")))

    def _engine_for(self, job: Job) -> SpeculativeEngine:
        current = self.spec
        main = job.main or (str(current.main) if current else None)
        draft = job.draft
        if draft is None and current is not None and main == str(current.main):
            draft = current.draft  # the loaded pair, as launched
        spec = resolve_spec(self.config, main, draft)
        if self.engine is None or spec != current:
            self._switch(spec)
        assert self.engine is not None
        return self.engine

    def _switch(self, spec: EngineSpec) -> None:
        """Load `spec`, keeping the current main model when only the draft changes (no weights re-read)."""
        same_main = self.spec is not None and replace(self.spec, draft=spec.draft) == spec
        keep = self.engine.main if self.engine is not None and same_main else None
        engine = load_engine(spec, reuse_main=keep, main_profile=self.engine.main_profile if keep else None)
        if self.engine is not None:
            self.engine.close()
        self.engine, self.spec = engine, spec
        if self.state == "failed":
            self.state, self.load_error = "ready", ""


def events_of(job: Job, timeout: float | None = None) -> list[Event | JobFailed]:
    """Everything a finished job produced (for callers that wait, such as tests)."""
    out: list[Event | JobFailed] = []
    while (item := job.events.get(timeout=timeout)) is not DONE:
        out.append(item)
    return out
