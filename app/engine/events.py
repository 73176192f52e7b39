"""What the engine tells its consumers (CLI, TUI, benchmark): one event per round, one at the end, and
progress while a long prompt is read.

Stats use LM Studio's field names so numbers can be compared with its speculative-decoding stats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from app.engine.controller import Decision


@dataclass(frozen=True)
class RoundEvent:
    """One draft/verify round. `tokens` are what the round emitted, in order."""

    drafted: tuple[int, ...]  # sent to the main model for verification
    n_accepted: int  # leading drafted tokens the main model agreed with
    main_token: int  # the main model's own token: a correction (rejection) or a bonus (all accepted)
    n_ignored: int  # drafted but never sent (confidence stop, below --draft-min), or accepted after the reply ended
    tokens: tuple[int, ...]  # emitted this round (accepted drafts + main token, cut at a stop)
    text: str  # text released this round (held back while it could be part of a stop string)
    draft_seconds: float
    verify_seconds: float
    draft_source: str  # "model", "mtp", "lookup" or "none"
    # the bytes of each drafted token, then of main_token: consumers show tokens without calling llama.cpp
    # (its token-to-piece buffer is the engine thread's), and without keeping the model alive
    pieces: tuple[bytes, ...] = ()
    # of n_ignored, the drafts right after the n_accepted ones that the main model agreed with but the reply had
    # ended before (an end-of-generation token, a stop string): neither accepted nor rejected
    n_past_end: int = 0
    context: int = 0  # tokens of this reply's sequence in the main context after the round (a front-end's "ctx")
    why: Decision | None = None  # the same as data: a code and its figures, for front-ends to word

    @property
    def decision(self) -> str:
        """Why this draft length, in the engine's terse words (worded when asked: a round is not formatted for nobody)."""
        return self.why.reason if self.why is not None else ""

    def drafted_piece(self, i: int) -> bytes:
        return self.pieces[i] if i < len(self.pieces) else b""

    @property
    def main_piece(self) -> bytes:
        return self.pieces[-1] if self.pieces else b""

    def emitted_pieces(self) -> list[bytes]:
        """Pieces of `tokens`: the accepted drafts', then the main model's token (unless the reply ended first)."""
        return [self.drafted_piece(i) if i < self.n_accepted else self.main_piece for i in range(len(self.tokens))]


@dataclass
class GenerationStats:
    tokens_per_second: float = 0.0
    time_to_first_token: float = 0.0
    generation_time: float = 0.0
    stop_reason: str = ""
    draft_model: str | None = None
    total_draft_tokens_count: int = 0
    accepted_draft_tokens_count: int = 0
    rejected_draft_tokens_count: int = 0
    ignored_draft_tokens_count: int = 0
    prompt_tokens_count: int = 0
    prompt_tokens_evaluated: int = 0  # less than prompt_tokens_count when a KV prefix was reused
    predicted_tokens_count: int = 0
    rounds: int = 0
    mean_draft_length: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    draft_length_histogram: dict[int, int] = field(default_factory=dict)
    # per draft source ("model", "mtp", "lookup"): rounds it drafted, tokens it sent, tokens accepted
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    overhead_time: float = 0.0  # generation_time spent outside llama_decode (Python: drafting logic, sampling, events)
    # True: these tokens are exactly plain decoding's (the main model's kernels passed the batch-invariance
    # self-check, or no batch was verified). False: they may differ at near-ties (see exact_check)
    exact: bool = True
    exact_check: str = ""  # the self-check's finding, in words
    speculation: str = ""  # what drafting did or could not do here, and why (e.g. a draft model that cannot pay)
    # what plain decoding would have taken for the same reply: the first token as it came (always plain), then each
    # later token at this machine's measured one-token cost (the probe, corrected by live one-token rounds); no
    # Python overhead counted, so the estimate leans low and the speedup with it. The speedup is plain / actual.
    plain_time_estimate: float = 0.0
    speedup_estimate: float = 1.0
    closed_sources: tuple[str, ...] = ()  # draft sources ("model", "mtp", "lookup") closed for this reply: they cannot pay here
    widest_batch: int = 1  # the widest main-model decode this reply's verify tokens were part of (other sequences' too)
    threads: int = 0  # the threads its last decode ran on: fewer than --threads while other processes keep cores busy
    backend: str = ""  # which llama.cpp build runs here and where each model's weights live (kernels.py)

    def count_source(self, source: str, drafted: int, accepted: int) -> None:
        counts = self.sources.setdefault(source, {"rounds": 0, "drafted": 0, "accepted": 0})
        counts["rounds"] += 1
        counts["drafted"] += drafted
        counts["accepted"] += accepted

    @property
    def acceptance_rate(self) -> float:
        sent = self.accepted_draft_tokens_count + self.rejected_draft_tokens_count
        return self.accepted_draft_tokens_count / sent if sent else 0.0

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["acceptance_rate"] = round(self.acceptance_rate, 4)
        out["draft_length_histogram"] = {str(k): v for k, v in sorted(self.draft_length_histogram.items())}
        timings = (
            "tokens_per_second", "time_to_first_token", "generation_time", "mean_draft_length", "draft_time", "verify_time",
            "overhead_time", "plain_time_estimate", "speedup_estimate",
        )  # fmt: skip
        for key in timings:
            out[key] = round(out[key], 4)
        return out

    def summary(self) -> str:
        line = (
            f"{self.predicted_tokens_count} tokens, {self.tokens_per_second:.1f} tok/s, "
            f"first token {self.time_to_first_token * 1000:.0f} ms, stop: {self.stop_reason}"
        )
        if self.draft_model:
            line += (
                f" | draft {self.draft_model}: {self.accepted_draft_tokens_count}/"
                f"{self.accepted_draft_tokens_count + self.rejected_draft_tokens_count} accepted "
                f"({self.acceptance_rate:.0%}), {self.ignored_draft_tokens_count} ignored, "
                f"mean draft {self.mean_draft_length:.2f}"
            )
            if self.total_draft_tokens_count:
                saved = self.plain_time_estimate - self.generation_time
                line += f", about {self.speedup_estimate:.2f}x plain ({abs(saved):.2f} s {'saved' if saved >= 0 else 'lost'})"
            if self.speculation:
                line += f" | {self.speculation}"
        if not self.exact:
            line += " | not exact: may differ from plain decoding at near-ties (--exact avoids it)"
        return line


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    text: str  # the whole reply
    tail: str  # text released only now: held back until the end (a partial stop string, split UTF-8)
    tokens: tuple[int, ...]
    stats: GenerationStats
    context: int = 0  # tokens of this reply's sequence left in the main context (the next turn goes on from them)


@dataclass(frozen=True)
class PromptProgress:
    """The prompt is being read before the first token. Sent between the batches of a long prompt only when
    reading it is expected to take a while (a reopened conversation, a model switch), so a UI can show it;
    the generation's cancel is checked between those batches. Consumers that only stream text ignore it."""

    done: int  # prompt tokens evaluated so far, of those that were not in the cache
    total: int  # prompt tokens to evaluate (the cached prefix is not counted)
    elapsed: float  # seconds spent reading so far
    cached: int = 0  # prompt tokens reused from the cache

    @property
    def seconds_left(self) -> float:
        return (self.total - self.done) * self.elapsed / self.done if self.done else 0.0


@dataclass(frozen=True)
class TemplateFallback:
    """The model's own chat template did not render the chat (before the reply's first event): what was
    used instead, and why. Front-ends say it (it can change what the model answers); `first` is True the
    first time a model falls back for this reason in this process, so a chat need not repeat it every turn."""

    model: str  # the model's file name
    reason: str  # "its chat template failed: ValueError: ...", "it has no chat template"
    used: str  # "llama.cpp's built-in template 'llama3'", "ChatML"
    first: bool = True

    def sentence(self) -> str:
        return f"{self.model}: {self.reason}; the chat is written with {self.used} instead"


@dataclass(frozen=True)
class EarlierMessagesLeftOut:
    """The conversation is longer than the context holds: the model reads only its latest turns (sent before
    the reply). The conversation itself keeps every message."""

    left_out: int  # the oldest messages not read
    total: int  # messages in the conversation

    def sentence(self) -> str:
        return (f"the model reads the last {self.total - self.left_out:,} of {self.total:,} messages: "
                "the earlier ones do not fit in its context")  # fmt: skip


Event = RoundEvent | Finished | PromptProgress
