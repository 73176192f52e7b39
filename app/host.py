"""One engine, one worker thread, jobs in arrival order: what the HTTP server submits to (and what resolves
which files to load, for the CLI, the benchmark and the server alike).

llama.cpp contexts are not thread-safe, so one thread owns the loaded pair. A job names its main model
and draft (or takes the loaded ones); the worker switches pairs between jobs, never during one. Each job
has its own event queue and cancel flag, so a client that goes away stops its generation within a round
and the next job starts. The engine lives as long as its pair: a conversation that continues reuses both
contexts' KV prefix, and the adaptive controller's measurements carry from one request to the next.

A host may also adopt a pair someone else loaded and keeps (the chat app serving its models): it is ready at
once, never switches that pair, and leaves it open when it stops. An observer (`on_event`) sees every job's
items as they are put, on the worker thread, once per round: a front-end enqueues them there and shows them
on its own thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.config import Config
from app.engine import rpc
from app.engine.chat import ChatWindow, Message, fit_chat, read_chat, reply_reserve, tokenize_prompt
from app.engine.errors import TandemError
from app.engine.events import Finished, RoundEvent
from app.engine.loading import MTP, SOURCES, EngineSpec, describe_draft, load_engine, own_draft
from app.engine.rounds import Rounds
from app.engine.rpc import WorkerLost, parse_endpoints, parse_split
from app.engine.sources import within
from app.engine.speculative import GenerationConfig, SpeculativeEngine


def resolve_spec(config: Config, main: str | None = None, draft: str | None = None) -> EngineSpec:
    """What to load: `main`/`draft` when given (a request, a picker), else the configuration's choice, the
    main model's default draft, or the demo pair (fetched on first use). A draft path is checked before
    anything is fetched, so a typo is said at once, not after a download."""
    from app.engine.gguf_info import read_gguf_info

    if draft is None:  # the configuration's draft belongs to the configuration's main model
        draft = config.draft if not main or main == config.main else ""
    main = main or config.main
    if main:
        main_path = Path(main)
        draft_choice = draft or config.default_drafts.get(main) or _demo_draft_for(main) or own_draft(main_path)
    else:
        from app.engine.demo import ensure_demo_pair

        if draft not in ("", *SOURCES):
            read_gguf_info(draft)
        main_path, demo_draft = ensure_demo_pair()
        draft_choice = draft or str(demo_draft)
    s = config.settings
    return EngineSpec(main=main_path, draft=draft_choice, gpu_layers=s.gpu_layers, draft_on_gpu=s.draft_on_gpu,
                      ctx_size=s.ctx_size, threads=s.threads, exact=s.exact, rpc=parse_endpoints(s.rpc),
                      tensor_split=parse_split(s.tensor_split))  # fmt: skip


def _demo_draft_for(main: str) -> str | None:
    """The demo main model, named by its path (a request after a switch back), keeps the demo's own draft."""
    from app.engine.demo import demo_paths

    demo_main, demo_draft = demo_paths()
    try:
        return str(demo_draft) if Path(main).resolve() == demo_main.resolve() else None
    except (OSError, RuntimeError):  # a symbolic link that loops (RuntimeError before Python 3.13): not the demo's
        return None


class QueueFull(TandemError):
    pass


class PairLocked(TandemError):
    """A request for another pair on a host that serves an adopted one (the chat app's)."""


@dataclass(frozen=True)
class JobFailed:
    """A job ended without a reply: the error says why (a TandemError subclass: the server maps it to a status)."""

    error: TandemError


@dataclass
class Counters:
    """What the host's requests did, since it started (the front-ends' own chat turns are not counted):
    GET /metrics reports them. Updated on the worker thread once per round and per reply; read anywhere."""

    requests: int = 0  # ended with a reply (a stopped one too)
    failed: int = 0  # ended without one (JobFailed)
    stalled: int = 0  # streams ended because their reader stopped reading
    prompt_tokens: int = 0  # prompt tokens evaluated (a reused KV prefix is not)
    predicted_tokens: int = 0
    generation_seconds: float = 0.0
    drafts: int = 0  # rounds that drafted (llama.cpp's n_draft: draft calls)
    draft_tokens: int = 0  # draft tokens sent to the main model for verification
    draft_accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [i]: rounds whose draft token i+1 was accepted
    # per draft source ("model", "mtp", "lookup"): [rounds that drafted, tokens sent, tokens accepted]
    by_source: dict[str, list[int]] = field(default_factory=dict)
    # the worker's time starting replies and running rounds (events handed out included), and the part of it spent
    # inside llama.cpp's decodes: the rest is Python's share of a round (bench/server_bench.py reports it)
    worker_seconds: float = 0.0
    llama_seconds: float = 0.0

    def count(self, item: object) -> None:
        if isinstance(item, RoundEvent) and item.drafted:
            self.drafts += 1
            self.draft_tokens += len(item.drafted)
            self.draft_accepted += item.n_accepted
            counts = self.by_source.setdefault(item.draft_source, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + len(item.drafted), counts[2] + item.n_accepted
            self.accepted_at += [0] * (item.n_accepted - len(self.accepted_at))
            for position in range(item.n_accepted):
                self.accepted_at[position] += 1
        elif isinstance(item, Finished):
            self.requests += 1
            self.prompt_tokens += item.stats.prompt_tokens_evaluated
            self.predicted_tokens += item.stats.predicted_tokens_count
            self.generation_seconds += item.stats.generation_time
        elif isinstance(item, JobFailed):
            self.failed += 1


DONE = object()  # the last item of every job's queue
# A streaming client that stops reading must not hold the one engine: generation waits while this many rounds
# are unread, and ends the job once the client has read nothing for its `reader_timeout`.
READER_BACKLOG = 16


@dataclass
class Job:
    config: GenerationConfig
    messages: list[Message] | None = None  # a chat turn (rendered through the model's template)
    prompt: str | None = None  # or raw text (a completion)
    main: str | None = None  # a main model path; None: the loaded one
    draft: str | None = None  # a draft choice (path, "mtp", "lookup", "none"); None: the main model's default
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Event | JobFailed, then DONE
    wake: Callable[[], None] | None = None  # called (on the worker thread) after each item: e.g. an asyncio wake-up
    counted: bool = True  # a request: `served` counts it (a front-end's own chat turn is not)
    window: ChatWindow | None = None  # a front-end's conversation: read from the latest turns that fit (fit_chat)
    reader_timeout: float | None = None  # seconds a reader may take nothing while READER_BACKLOG rounds wait
    last_read: float = field(default_factory=time.monotonic)
    stalled: bool = False  # ended because its reader stopped reading

    def put(self, item: object) -> None:
        self.events.put(item)
        if self.wake is not None:
            with contextlib.suppress(Exception):  # a reader's loop that has closed (a server stopping) is no reader
                self.wake()

    def take(self) -> object:
        """The next item, for the job's reader (queue.Empty when none): reading, or finding nothing left to read,
        is what keeps the job going."""
        self.last_read = time.monotonic()
        return self.events.get_nowait()

    def ready(self) -> bool:
        """Whether generation may go on: not while the reader is READER_BACKLOG rounds behind. A reader that has
        taken nothing for `reader_timeout` seconds meanwhile ends the job (cancelled: its sequence is freed)."""
        if self.reader_timeout is None or self.cancel.is_set() or self.events.qsize() <= READER_BACKLOG:
            return True
        if time.monotonic() - self.last_read >= self.reader_timeout:
            self.stalled = True
            self.cancel.set()
            return True
        return False


class EngineHost:
    def __init__(
        self,
        config: Config,
        max_queue: int = 16,
        on_ready: Callable[[SpeculativeEngine], None] | None = None,
        on_event: Callable[[Job, object], None] | None = None,
        parallel: int = 1,  # replies generated together (--parallel): one main-model batch per round carries them
        on_failed: Callable[[str], None] | None = None,  # the first load failed: why, in one line
    ):
        self.config = config
        self._on_failed = on_failed
        self.max_queue = max_queue
        self.parallel = parallel
        self.engine: SpeculativeEngine | None = None
        self.spec: EngineSpec | None = None
        self.state = "loading"  # loading -> ready, or failed (with load_error)
        self.load_error = ""
        self.counters = Counters()
        self.adopted = False  # the engine belongs to someone else: never switched, never closed here
        self._on_ready = on_ready
        # called on the worker thread with each item a job gets (events, JobFailed, DONE): it must only enqueue
        self.on_event = on_event
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._queued: list[Job] = []  # submitted, not yet started
        self._closed = False
        self._lock = threading.Lock()
        self.active: list[Job] = []  # being generated (one sequence each)
        self._rounds: Rounds | None = None  # over the current engine
        self._held: Job | None = None  # the next job, waiting for the active ones to end (it needs another pair)
        self.lost: WorkerLost | None = None  # the main model's RPC worker stopped answering: this host is over
        self._thread = threading.Thread(target=self._work, name="tandem-host", daemon=True)

    @classmethod
    def adopt(
        cls,
        config: Config,
        engine: SpeculativeEngine,
        spec: EngineSpec,
        max_queue: int = 16,
        on_event: Callable[[Job, object], None] | None = None,
    ) -> EngineHost:
        """A host over a loaded pair that its owner keeps using after `stop()` (which leaves it open).
        `start()` loads nothing; a job naming another pair fails (switching would close the owner's engine)."""
        host = cls(config, max_queue=max_queue, on_event=on_event, parallel=engine.n_seq)
        host.engine, host.spec, host.state, host.adopted = engine, spec, "ready", True
        return host

    def start(self) -> None:
        """Start the worker (once: the chat app's host is started at load, and F9 then only adds the server)."""
        if self._thread.ident is None:
            rpc.add_lost_handler(self._worker_lost)
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def cancel_requests(self) -> None:
        """Cancel the requests queued or running (counted jobs), not a front-end's own turn: the server going
        away while the chat app keeps its host. Each ends within a round and gets its DONE."""
        with self._lock:
            for job in [*self._queued, *self.active, *([self._held] if self._held else [])]:
                if job.counted:
                    job.cancel.set()

    def requests_pending(self) -> bool:
        with self._lock:
            return any(job.counted for job in [*self._queued, *self.active, *([self._held] if self._held else [])])

    @property
    def served(self) -> int:
        """Requests answered (the front-ends' own chat turns are not counted)."""
        return self.counters.requests

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> Job | None:
        """The first job being generated (None: idle)."""
        active = self.active
        return active[0] if active else None

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self.lost is not None:  # a new exception each time: re-raising one would grow its traceback forever
                raise WorkerLost(str(self.lost), self.lost.endpoints)
            if self._closed:
                raise QueueFull("the server is stopping")
            if len(self._queued) >= self.max_queue:
                raise QueueFull(f"{len(self._queued)} requests are already waiting (--max-queue {self.max_queue})")
            self._queued.append(job)
        self._jobs.put(job)
        return job

    def stop(self, timeout: float | None = 30) -> None:
        """Cancel the running job and every queued one (each still gets its DONE), end the worker, and close
        the engine unless it was adopted. New submissions are refused from here on."""
        with self._lock:
            self._closed = True
            for job in [*self._queued, *self.active, *([self._held] if self._held else [])]:
                job.cancel.set()
        rpc.remove_lost_handler(self._worker_lost)
        if self.lost is not None:
            return  # its worker thread is stuck in llama.cpp for good; the jobs have had their DONE
        self._jobs.put(None)
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout)
        else:  # never started: no worker will tell the queued jobs they are over
            with self._lock:
                never_run, self._queued = self._queued, []
            for job in never_run:
                self._put(job, DONE)
        if self.engine is not None and not self.adopted and not self._thread.is_alive():
            self.engine.close()

    @property
    def stopped(self) -> bool:
        """The worker has ended (or never started, or is stuck on a lost RPC worker): nothing touches the engine."""
        return self.lost is not None or not self._thread.is_alive()

    def describe(self) -> str:
        if self.spec is None or self.engine is None:
            return "no model loaded"
        return f"{self.engine.main.name} with {describe_draft(self.spec.draft)}"

    def _put(self, job: Job, item: object) -> None:
        if job.counted:
            self.counters.count(item)
        job.put(item)
        if self.on_event is not None:
            with contextlib.suppress(Exception):  # an observer's fault must not kill the worker or fail the job
                self.on_event(job, item)

    def _worker_lost(self, lost: WorkerLost) -> bool:
        """rpc.py's fault hook, on llama.cpp's thread for that worker, while this host's thread is stuck in a decode
        (or a load) that will never return: end every job with the worker's name, refuse new ones, leave the pair
        unfreed. True: contained (the app or server lives on); a host not on RPC workers has nothing to do."""
        on_workers = self.spec.rpc if self.spec is not None else parse_endpoints(self.config.settings.rpc)
        if self.lost is not None:
            return True  # a second worker of the same pair failing: already contained
        if not set(on_workers) & set(lost.endpoints):
            return False
        with self._lock:
            self.lost, self.state, self.load_error = lost, "failed", str(lost)
            jobs = [*self.active, *([self._held] if self._held else []), *self._queued]
            self.active, self._held, self._queued = [], None, []
        if self.engine is not None:
            self.engine.abandon()
        for job in jobs:
            self._fail(job, lost)
            self._end(job)
        return True

    # ---- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        if self.engine is None:
            try:
                self._switch(self._resolve(None, None))
                self.state = "ready"
                if self._on_ready is not None:
                    self._on_ready(self.engine)
            except TandemError as exc:  # the server keeps answering (health says why); requests may name another model
                self.state, self.load_error = "failed", str(exc)
                if self._on_failed is not None:
                    self._on_failed(self.load_error)
        stopping = False
        while not stopping or self.active:
            try:
                stopping = self._admit(block=not self.active) or stopping
                if self.active:
                    self._round()
            except Exception as exc:  # never a dead worker (the chat app's turns go through it too): end what ran
                self._fail_all(exc)
        if self._held is not None:  # it waited for another pair: stop() cancelled it, it never started
            held, self._held = self._held, None
            self._end(held)
        if self._rounds is not None:
            self._rounds.close()

    def _admit(self, block: bool) -> bool:
        """Start queued jobs while sequences are free, in arrival order; True once stop() has been called. A job
        that needs another pair waits (and everything after it) until the active jobs end."""
        while True:
            job = self._held
            if job is None:
                try:
                    job = self._jobs.get(block=block and not self.active)
                except queue.Empty:
                    return False
                if job is None:
                    return True
                with self._lock:
                    at = next((i for i, queued in enumerate(self._queued) if queued is job), None)
                    if at is None:  # already ended by a stop() that came before this worker started
                        continue
                    del self._queued[at]
                    self._held = job  # in the same step: stop() and cancel_requests() always see it
            if job.cancel.is_set():  # a client that left while queued costs nothing
                self._held = None
                self._end(job)
                continue
            if self.active and (self._needs_switch(job) or (self._rounds is not None and self._rounds.full)):
                return False  # it stays held
            with self._lock:
                self._held = None
                self.active.append(job)
            self._begin(job)

    def _needs_switch(self, job: Job) -> bool:
        if self.adopted or self.engine is None:
            return self.engine is None
        try:
            return self._runs_on_loaded(self._wanted(job)) is False
        except TandemError:
            return True  # it fails when it starts, once nothing else runs (never a switch under active jobs)

    def _begin(self, job: Job) -> None:
        """Read the job's prompt into tokens and start it on a sequence (a failure ends it here)."""
        job.last_read = time.monotonic()  # time spent queued is not the reader's stall
        try:
            engine, sources = self._engine_for(job)
            if job.messages is not None:
                if job.window is not None:  # a front-end's conversation: read from its latest turns that fit
                    reserve = reply_reserve(job.config, engine.n_ctx)
                    fitted = fit_chat(engine.main, job.messages, engine.n_ctx, reserve, job.window)
                else:  # a request's messages, as sent (too long: ContextOverflowError, a 400)
                    fitted = read_chat(engine.main, job.messages)
                for notice in fitted.notices(len(job.messages)):
                    self._put(job, notice)
                tokens = fitted.tokens
            else:
                tokens = tokenize_prompt(engine.main, job.prompt or "")
            if self._rounds is None or self._rounds.engine is not engine:
                self._rounds = Rounds(engine)
            with self._timed(engine):
                outcomes = self._rounds.start(job, tokens, replace(job.config, sources=sources), job.cancel)
        except Exception as exc:
            self._fail(job, exc)
            self._end(job)
            return
        self._deliver(outcomes)

    def _round(self) -> None:
        assert self._rounds is not None
        with self._timed(self._rounds.engine):
            outcomes = self._rounds.round(ready=lambda job: job.ready())
            self._deliver(outcomes)
        if not outcomes and not any(job.ready() for job in self.active):
            time.sleep(0.02)  # every reader is behind: wait for one to read (or to time out)

    @contextlib.contextmanager
    def _timed(self, engine: SpeculativeEngine) -> Iterator[None]:
        """Count the worker's time in the block, and llama.cpp's part of it (Counters)."""
        started, inside = time.perf_counter(), engine.llama_seconds
        try:
            yield
        finally:
            self.counters.llama_seconds += engine.llama_seconds - inside
            self.counters.worker_seconds += time.perf_counter() - started

    def _deliver(self, outcomes: list) -> None:
        for job, item in outcomes:
            if item is None:
                self._end(job)
            elif isinstance(item, BaseException):
                self._fail(job, item)
                self._end(job)
            else:
                self._put(job, item)  # counted (Counters) before it goes out: whoever reads it sees the count include it

    def _fail_all(self, exc: Exception) -> None:
        if self._rounds is not None:
            self._rounds.close()
        for job in list(self.active):
            self._fail(job, exc)
            self._end(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not isinstance(exc, TandemError):  # never a dead worker: the job fails, the others go on
            exc = TandemError(f"generation failed: {type(exc).__name__}: {exc}")
        self._put(job, JobFailed(exc))

    def _end(self, job: Job) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self.active.remove(job)
        self.counters.stalled += job.stalled
        self._put(job, DONE)

    def _resolve(self, main: str | None, draft: str | None) -> EngineSpec:
        return replace(resolve_spec(self.config, main, draft), parallel=self.parallel)

    def _wanted(self, job: Job) -> EngineSpec:
        """The pair a job asks for (the loaded one when it names none)."""
        current = self.spec
        main = job.main or (str(current.main) if current else None)
        draft = job.draft
        if draft is None and current is not None and main == str(current.main):
            draft = current.draft  # the loaded pair, as launched
        return self._resolve(main, draft)

    def _engine_for(self, job: Job) -> tuple[SpeculativeEngine, frozenset[str] | None]:
        """The engine a job runs on, and the draft sources it may use there (None: all the engine's)."""
        if self.adopted:
            return self._adopted_engine(job)
        spec = self._wanted(job)
        sources = self._runs_on_loaded(spec) if self.engine is not None else False
        if sources is False:
            self._switch(spec)
            sources = None
        assert self.engine is not None
        return self.engine, sources

    def _runs_on_loaded(self, spec: EngineSpec) -> frozenset[str] | bool | None:
        """How the loaded pair runs replies of `spec`: None when it is that pair; the sources to draft from when only
        the draft choice differs and the loaded pair has all it draws on (plain decoding, prompt lookup, the loaded draft
        model alone...: one more sequence in the batch, no reload, no waiting for the others); False: it cannot."""
        loaded = self.spec
        if loaded is None:
            return False
        if spec == loaded:
            return None
        if replace(spec, draft=loaded.draft) != loaded:
            return False
        sources = within(spec.draft, loaded.draft)
        return sources if sources is not None else False

    def _adopted_engine(self, job: Job) -> tuple[SpeculativeEngine, frozenset[str] | None]:
        """The adopted pair (with the sources a job's draft choice draws on, where the pair has them), or a clear
        failure for a job that names another one."""
        assert self.engine is not None and self.spec is not None
        same_main = job.main is None or same_file(job.main, str(self.spec.main))
        same_draft = job.draft is None or job.draft == self.spec.draft or same_file(job.draft, self.spec.draft)
        if same_main and not same_draft and (sources := within(job.draft, self.spec.draft)) is not None:
            return self.engine, sources
        if not (same_main and same_draft):
            wanted = f"{Path(job.main).name if job.main else self.engine.main.name} with {describe_draft(job.draft or self.spec.draft)}"
            raise PairLocked(f"this server serves only the pair loaded in the Tandem app ({self.describe()}), "
                              f"not {wanted}: pick that pair in the app")  # fmt: skip
        return self.engine, None

    def _switch(self, spec: EngineSpec) -> None:
        """Load `spec`, keeping the current main model when only the draft changes (no weights re-read)."""
        # (the MTP head is loaded with the main model only to draft with it: a switch to or from it reloads)
        same_main = (self.spec is not None and replace(self.spec, draft=spec.draft) == spec
                     and (spec.draft == MTP) == (self.spec.draft == MTP))  # fmt: skip
        keep = self.engine.main if self.engine is not None and same_main else None
        engine = load_engine(spec, reuse_main=keep, main_profile=self.engine.main_profile if keep else None)
        if self.engine is not None:
            self.engine.close()
        self.engine, self.spec, self._rounds = engine, spec, None
        if self.state == "failed":
            self.state, self.load_error = "ready", ""


def same_file(a: str, b: str) -> bool:
    """Two paths to one file, however written (relative, through a link)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link that loops (before Python 3.13)
        return a == b

