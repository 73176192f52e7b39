"""The speculative loop: draft k tokens, verify them in one main-model batch, keep what agrees.

Invariant between rounds: `tokens` is the whole sequence (prompt + reply so far); the main context
caches every token but the last, which is the first token of the next verify batch. Plain decoding
is the same loop with k = 0, so plain and speculative numbers come from one code path.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from app.engine.backend import Context, Model, MtpContext, SingleTokenContext, draft_context, usable_context
from app.engine.backends import backends
from app.engine.compat import check_compatibility, require_compatible
from app.engine.controller import (
    DRAFT_P_MIN,
    FIRST_TOKEN,
    FIXED,
    FIXED_LOOKUP,
    MODEL_TRAITS,
    MTP_TRAITS,
    NEAR_END,
    NO_MATCH,
    NO_SOURCE,
    OFF,
    Batch,
    Decision,
    DraftController,
    VerifyCost,
)
from app.engine.cores import FreeCores, following
from app.engine.errors import ContextOverflowError, TandemError
from app.engine.events import Event, Finished, GenerationStats, PromptProgress, RoundEvent
from app.engine.lookup import LookupDrafter
from app.engine.probe import PLAIN_ONLY, DraftProfile, MainProfile, Progress, profile_draft, profile_main, retime_main
from app.engine.sampling import (
    Confidence,
    PenaltyWindow,
    PositionalUniforms,
    SamplerSettings,
    distribution,
    greedy_token,
)
from app.engine.sources import DRAFT_MODEL, LOOKUP, MTP
from app.engine.text import TextStream

# A long prompt (a reopened conversation, one carried over to another model) is read in batches of this many
# tokens on a CPU (where smaller batches cost no more per token), with the cancel checked between them; a GPU
# reads whole n_batch batches. The first batch is small, so how long the rest will take is known early. Fixed
# sizes, not timed ones: the same prompt is always split the same way (seeded runs repeat exactly).
PROMPT_FIRST_CHUNK, PROMPT_CHUNK = 16, 64
PROMPT_PROGRESS_AFTER = 0.5  # seconds: a prompt whose reading is expected to take longer sends PromptProgress
SHADOW_TOKENS = 8  # the longest unused lookup proposal checked against what came (controller.observe)
# the probe's verify curve is timed again when this many one-token rounds in a row ran well under its time
# (controller.STALE_RATIO): it was timed on a busy machine. (Slower live figures are a deep cache or a machine busy now: the
# controller scales the curve by them, VerifyCost.scale, and the curve's shape stays right.)
STALE_AFTER = 16
# An MTP head drafts from its own hidden state after its first token: one head reused (Qwen3.5/3.6's single block)
# is trained for one step ahead, so its drafts go no deeper than this (the controller picks less where it is unsure)
MTP_DEPTH = 8
# the main model's hidden states an idle MTP head has not been fed are fed in a batch once this many have gathered
# (a long prompt, a reply drafted by other sources): memory stays bounded, a batch costs little per token
MTP_FEED_AFTER = 256

# LM Studio's stop reasons, so its users read ours the same way
EOS, STOP_STRING, MAX_TOKENS, CONTEXT_FULL, CANCELLED = (
    "eosFound",
    "stopStringFound",
    "maxPredictedTokensReached",
    "contextLengthReached",
    "userStopped",
)


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 512
    draft_max: int = 16
    draft_min: int = 0
    draft_p_min: float = DRAFT_P_MIN
    stop: tuple[str, ...] = ()
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    adaptive: bool = True  # choose k per round from measured acceptance and costs; False: always draft_max
    # the round sources this reply may draft from, of the engine's ("model", "mtp", "lookup"; sources.draws_on): a
    # request's own mode on the loaded pair, one more sequence in its batch. None: every one the engine has
    sources: frozenset[str] | None = None


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    n_ignored: int = 0
    evaluated: int = 0  # tokens the draft model evaluated: its catch-up, then one per draft but the last
    caught_up: tuple[int, float] = (0, 0.0)  # (tokens, seconds) of the catch-up before drafting
    # the confidence stop (--draft-p-min): the unsure token it kept back, or the positions of unsure tokens sent
    # anyway (the controller lifted the stop); each is checked against the main model's own token there
    withheld: int | None = None
    unsure: list[int] = field(default_factory=list)


@dataclass
class Verify:
    """What one sequence needs from the main model this step: `tokens` appended to its cache, with logits for
    every one (a verify batch) or none (a prompt chunk). Whoever decodes (generate, or Rounds for several
    sequences in one batch) fills in the rows, the width of the decode they were part of, and its time."""

    seq: int
    tokens: list[int]
    logits: bool
    rows: np.ndarray | None = None
    width: int = 0
    seconds: float = 0.0
    # the sequences verifying in the whole round (Rounds), in one decode or several: the controller prices the
    # next draft against such a round (controller.Batch)
    round_sequences: int = 1

    @property
    def alone(self) -> bool:
        return self.width == len(self.tokens)


@dataclass
class SequenceState:
    """Per sequence: its prompt-lookup table and lookup's unused proposal (controller.observe)."""

    lookup: LookupDrafter | None = None
    shadow: tuple[int, list[int]] | None = None  # (position, tokens)
    # this reply's drafting models by source, and whether it may use lookup (GenerationConfig.sources)
    drafters: dict[str, ModelDrafter | MtpDrafter] = field(default_factory=dict)
    use_lookup: bool = False
    batch: Batch | None = None  # other sequences in its last verify decode: the decode it will likely share next


@dataclass
class DraftRequest:
    """A sequence asks the draft model for up to k tokens following `tokens`; whoever drafts (the sequence's own
    driver, or Rounds for every sequence drafting this round, in shared decodes) fills in the draft and this
    sequence's share of the time."""

    seq: int
    tokens: list[int]
    k: int
    config: GenerationConfig
    uniforms: PositionalUniforms
    stop_unsure: bool = True  # an unsure token ends the draft (False: sent, and marked in Draft.unsure)
    source: str = "model"  # which drafter: "model" (ModelDrafter) or "mtp" (MtpDrafter)
    draft: Draft | None = None
    seconds: float = 0.0  # this sequence's share of the drafting time (its catch-up, its share of shared decodes)


class _Drafting:
    """One sequence's draft being made, token by token (ModelDrafter)."""

    def __init__(self, request: DraftRequest, confidence: Confidence):
        self.request, self.confidence = request, confidence
        self.draft = Draft()
        self.penalty = PenaltyWindow(request.config.sampler)
        self.seconds = 0.0  # this sequence's share of the drafting time

    def choose(self, row: np.ndarray) -> int | None:
        """Take the draft's next token from the draft model's row; returns it when it must be evaluated for the
        next one (None: the draft is complete)."""
        request, draft, penalty = self.request, self.draft, self.penalty
        config, settings = request.config, request.config.sampler
        i = len(draft.tokens)
        history = request.tokens + draft.tokens if penalty.active else ()
        if settings.greedy:
            token = greedy_token(row, penalty, history)
            # a softmax over the vocabulary costs ~50 us: only pay it when the threshold can bite
            confidence = self.confidence.top_prob(row) if config.draft_p_min > 0 else 1.0
        else:
            q = distribution(row, settings, penalty.ids(history) if penalty.active else None)
            token = q.sample_at(request.uniforms.at(len(request.tokens) + i))  # coupled to the main model's draw (sampling.py)
            confidence = q.max_prob()
        if confidence < config.draft_p_min:
            if request.stop_unsure:
                draft.n_ignored += 1  # llama.cpp's rule: an unsure token ends the draft and is not sent
                draft.withheld = token
                return None
            draft.unsure.append(i)
        draft.tokens.append(token)
        if i + 1 < request.k:  # the last drafted token is evaluated next round, only if accepted
            draft.evaluated += 1
            return token
        return None

    def caught_up(self, tokens: int, seconds: float) -> None:
        self.draft.evaluated += tokens
        self.draft.caught_up = (tokens, seconds)
        self.seconds += seconds

    def close(self) -> None:
        draft, request = self.draft, self.request
        if len(draft.tokens) < request.config.draft_min:
            draft.n_ignored += len(draft.tokens)
            draft.tokens, draft.withheld, draft.unsure = [], None, []
        request.draft, request.seconds = draft, self.seconds


class ModelDrafter:
    """Drafts with a small model. Its context follows each sequence's accepted tokens incrementally:
    each round it evaluates only the tokens it has not seen (usually the main model's last token).
    Several sequences draft together: their catch-ups in one decode, then one decode per draft position."""

    source = "model"
    traits = MODEL_TRAITS

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._confidence = Confidence(ctx.model.n_vocab)

    def propose_all(self, requests: Sequence[DraftRequest]) -> None:
        """Draft for every request. Each is charged its own share of the time: its catch-up (by its tokens'
        share of a shared decode), then an equal share of each draft-position decode it was in."""
        if len(requests) == 1 or isinstance(self.ctx, SingleTokenContext):
            for request in requests:  # alone, or a draft model safe one token at a time: sequence by sequence
                self._propose_one(request)
            return
        ctx = self.ctx
        drafting = [_Drafting(request, self._confidence) for request in requests]
        # catch up: each sequence's unseen tokens, logits on its last; one decode while they fit the batch
        waiting: list[tuple[_Drafting, list[int]]] = []
        for d in drafting:
            tokens = d.request.tokens
            keep = ctx.keep_common_prefix(tokens, min(len(ctx.seqs[d.request.seq]), len(tokens) - 1), d.request.seq)
            waiting.append((d, tokens[keep:]))
        nexts: list[tuple[_Drafting, int]] = []
        group: list[tuple[_Drafting, list[int]]] = []
        for item in [*waiting, None]:
            width = sum(len(missing) for _, missing in group)
            if group and (item is None or width + len(item[1]) > ctx.n_batch):  # decode; read its rows before the next
                started = time.perf_counter()
                rows = ctx.decode_parts([(d.request.seq, missing, 1) for d, missing in group])
                seconds = time.perf_counter() - started
                for (d, missing), row in zip(group, rows, strict=True):
                    ctx.checkpoint(d.request.seq, transient=True)  # a recurrent draft goes back here after its draft (no-op otherwise)
                    d.caught_up(len(missing), seconds * len(missing) / width)
                    if (token := d.choose(row[-1])) is not None:
                        nexts.append((d, token))
                group = []
            if item is not None and len(item[1]) > ctx.n_batch:  # a long catch-up (a new prompt): alone, in chunks
                d, missing = item
                started = time.perf_counter()
                ctx.decode(missing, seq=d.request.seq)
                ctx.checkpoint(d.request.seq, transient=True)
                d.caught_up(len(missing), time.perf_counter() - started)
                if (token := d.choose(ctx.logits()[-1])) is not None:
                    nexts.append((d, token))
            elif item is not None:
                group.append(item)
        # then one decode per draft position, over every sequence still drafting
        while nexts:
            started = time.perf_counter()
            rows = ctx.decode_parts([(d.request.seq, [token], 1) for d, token in nexts])
            share = (time.perf_counter() - started) / len(nexts)
            for d, _ in nexts:
                d.seconds += share
            nexts = [(d, token) for (d, _), row in zip(nexts, rows, strict=True) if (token := d.choose(row[-1])) is not None]
        for d in drafting:
            d.close()

    def _propose_one(self, request: DraftRequest) -> None:
        started = time.perf_counter()
        drafting = _Drafting(request, self._confidence)
        caught_up = self.ctx.sync(request.tokens, request.seq)
        self.ctx.checkpoint(request.seq, transient=True)  # a recurrent draft model goes back here after drafting (no-op otherwise)
        drafting.caught_up(caught_up, time.perf_counter() - started)
        row = self.ctx.logits()[-1]
        while (token := drafting.choose(row)) is not None:
            self.ctx.decode([token], seq=request.seq)
            row = self.ctx.logits()[-1]
        drafting.seconds = time.perf_counter() - started
        drafting.close()


class MtpDrafter:
    """Drafts with the main model's own multi-token-prediction head (MtpContext), as llama.cpp's draft-mtp does.
    The main context keeps each decoded token's hidden state (observe); when asked to draft, the head catches up
    on the tokens the main model kept, each paired with the hidden state before it, and drafts its first token in
    that same decode; each further token comes from the head's own hidden state. Its drafts leave its cache after
    the round: it holds only what the main model holds, plus the verify's first token."""

    source = "mtp"
    traits = MTP_TRAITS

    def __init__(self, main_ctx: Context, n_threads: int):
        self.main_ctx = main_ctx
        self.ctx = MtpContext(main_ctx, n_threads)
        self._confidence = Confidence(main_ctx.model.n_vocab)
        # per sequence: the main model's hidden states not yet fed to the head, as (first position, rows) chunks
        self._pending: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(main_ctx.n_seq)]
        # per sequence: the position whose hidden state a regenerated reply needs (the prompt's last cached token)
        self._anchor = [-1] * main_ctx.n_seq

    def start(self, seq: int, prefix: Sequence[int], valid: int) -> None:
        """A reply starts on `seq` from `prefix` (all but the prompt's last token), whose first `valid` tokens are
        those the main context held there before (their hidden states still hold; later ones were another text's)."""
        self._cut(seq, valid)
        self._anchor[seq] = len(prefix) - 1

    def observe(self, needs: Sequence[Verify]) -> None:
        """After a main-model decode of `needs`: keep each sequence's new hidden states by position (rows left from a
        verify whose drafts were rejected, at or past where this decode started, go first). A sequence that gathered
        MTP_FEED_AFTER of them feeds the head what is settled (everything before this decode) now."""
        hidden, at = self.main_ctx.hidden(), 0
        for need in needs:
            n = len(need.tokens)
            start = len(self.main_ctx.seqs[need.seq]) - n
            self._cut(need.seq, start)
            self._pending[need.seq].append((start, hidden[at : at + n].copy()))
            at += n
            held = len(self.ctx.seqs[need.seq])
            if start - held >= MTP_FEED_AFTER:
                self._catch_up(need.seq, self.main_ctx.seqs[need.seq][:start], 0)

    def propose_all(self, requests: Sequence[DraftRequest]) -> None:
        for request in requests:  # one sequence at a time (llama.cpp batches sequences' MTP drafts: not yet here)
            self._propose_one(request)

    def _propose_one(self, request: DraftRequest) -> None:
        started = time.perf_counter()
        seq, tokens = request.seq, request.tokens
        n = len(tokens) - 1  # the main model caches tokens[:n]; tokens[n] opens the verify
        drafting = _Drafting(request, self._confidence)
        row, index, fed = self._catch_up(seq, tokens, 1)
        drafting.caught_up(fed, time.perf_counter() - started)
        while (token := drafting.choose(row)) is not None:
            hidden = self.ctx.hidden_row(index)
            row, index = self.ctx.feed([(seq, [token], hidden[None], 1)])[0][-1], 0
        self.ctx.truncate(n + 1, seq)  # the drafts go; the pair at n is the main model's own (next round keeps it)
        drafting.seconds = time.perf_counter() - started
        drafting.close()

    def _catch_up(self, seq: int, tokens: Sequence[int], wanted: int) -> tuple[np.ndarray, int, int]:
        """Feed the head `tokens` from what it holds, each with the main model's hidden state before it, in batches;
        logits for the last `wanted`. Returns the last logits row, its index in that batch and how many were fed."""
        ctx = self.ctx
        held = ctx.keep_common_prefix(tokens, len(tokens) - 1, seq)
        rows = self._rows(seq, held - 1, len(tokens) - 1)
        row, index = ctx.logits()[:0], -1
        for start in range(held, len(tokens), ctx.n_batch):
            chunk = tokens[start : start + ctx.n_batch]
            last = start + ctx.n_batch >= len(tokens)
            out = ctx.feed([(seq, chunk, rows[start - held : start - held + len(chunk)], wanted if last else 0)])[0]
            if last and wanted:
                row, index = out[-1], len(chunk) - 1
        self._forget(seq, len(tokens) - 1)
        return row, index, len(tokens) - held

    def _rows(self, seq: int, first: int, stop: int) -> np.ndarray:
        """The main model's hidden states at positions first..stop-1; zeros where none is kept (before the first
        token, as llama.cpp starts; or a stretch read again after an edit, the head's first pair there a guess)."""
        rows = np.zeros((max(stop - first, 0), self.ctx.n_embd), dtype=np.float32)
        for start, chunk in self._pending[seq]:
            lo, hi = max(start, first), min(start + len(chunk), stop)
            if lo < hi:
                rows[lo - first : hi - first] = chunk[lo - start : hi - start]
        return rows

    def _cut(self, seq: int, position: int) -> None:
        """Drop the hidden states at `position` and after (from the end: a round's decode starts near it)."""
        chunks = self._pending[seq]
        while chunks and chunks[-1][0] >= position:
            chunks.pop()
        if chunks and chunks[-1][0] + len(chunks[-1][1]) > position:
            start, chunk = chunks[-1]
            chunks[-1] = (start, chunk[: position - start])

    def _forget(self, seq: int, position: int) -> None:
        """Drop the hidden states before `position` (fed to the head: only the last one is asked for again), but the
        anchor's: regenerating the reply feeds the head from the end of its prompt again."""
        anchor, kept = self._anchor[seq], []
        for start, chunk in self._pending[seq]:
            if start + len(chunk) > position:
                kept.append((max(start, position), chunk[max(position - start, 0) :]))
            elif start <= anchor < start + len(chunk):
                kept.append((anchor, chunk[anchor - start : anchor - start + 1]))
        self._pending[seq] = kept


class Reply:
    """One reply as it is built: the stop rules, the text released so far, and its stats (the loop in
    SpeculativeEngine.sequence only drafts, verifies and hands the kept tokens here)."""

    def __init__(self, engine: SpeculativeEngine, config: GenerationConfig, n_prompt: int):
        self.engine, self.config = engine, config
        self.stats = GenerationStats(draft_model=engine.draft_name_for(config.sources), backend=engine.backend)
        self.stats.speculation = engine.speculation_state(config)
        self.stats.closed_sources = engine.closed_sources(config)
        self.stats.prompt_tokens_count = n_prompt
        self.stream = TextStream(engine.main.piece, config.stop)
        self.tokens: list[int] = []
        self.released: list[str] = []
        self.stop_reason = ""
        self.started = time.perf_counter()
        self.first_token_at = 0.0
        self.first_round_tokens = 0
        # in llama_decode for this reply (a shared batch's whole time) and drafting (its share, DraftRequest.seconds)
        self.decode_seconds = 0.0
        self.consumed = 0  # of the last round's kept tokens, how many the reply took before it ended
        self.shared_prompt = False  # a prompt chunk was read in a batch with other sequences' tokens

    def read(self, need: Verify) -> None:
        self.decode_seconds += need.seconds
        self.shared_prompt |= not need.alone

    def verified(self, need: Verify) -> None:
        self.decode_seconds += need.seconds
        self.stats.widest_batch = max(self.stats.widest_batch, need.width)

    def drafted(self, seconds: float) -> None:
        self.decode_seconds += seconds

    def take(self, kept: list[int], tokens: list[int]) -> list[int]:
        """Append the round's kept tokens to the reply (and to `tokens`, the whole sequence) until a stop rule
        ends it; returns those taken."""
        main = self.engine.main
        emitted: list[int] = []
        self.consumed = 0
        for token in kept:
            self.consumed += 1
            if main.is_eog(token):
                self.stop_reason = EOS
                break
            tokens.append(token)
            self.tokens.append(token)
            emitted.append(token)
            if self.stream.push(token):
                self.stop_reason = STOP_STRING
                break
            if len(self.tokens) >= self.config.max_tokens:
                self.stop_reason = MAX_TOKENS
                break
        return emitted

    def round(self, decision: Decision, draft: Draft, n_accepted: int, main_token: int, emitted: list[int],
              draft_seconds: float, verify_seconds: float, context: int) -> RoundEvent:  # fmt: skip
        text = self.stream.release()
        self.released.append(text)
        if not self.first_token_at:
            self.first_token_at = time.perf_counter()
            self.first_round_tokens = len(self.tokens)
        stats = self.stats
        n_drafted = len(draft.tokens)
        # accepted drafts after the reply's end (an end-of-generation token, a stop string, the token
        # budget) were never used: LM Studio's "ignored", so accepted never exceeds the tokens generated
        past_end = n_accepted - min(n_accepted, self.consumed)
        n_accepted -= past_end
        n_ignored = draft.n_ignored + past_end
        stats.rounds += 1
        stats.total_draft_tokens_count += n_drafted + draft.n_ignored
        stats.accepted_draft_tokens_count += n_accepted
        stats.rejected_draft_tokens_count += n_drafted - n_accepted - past_end
        stats.ignored_draft_tokens_count += n_ignored
        stats.draft_length_histogram[n_drafted] = stats.draft_length_histogram.get(n_drafted, 0) + 1
        if n_drafted:
            stats.count_source(decision.source, n_drafted, n_accepted)
        stats.draft_time += draft_seconds
        stats.verify_time += verify_seconds
        return RoundEvent(
            drafted=tuple(draft.tokens),
            n_accepted=n_accepted,
            main_token=main_token,
            n_ignored=n_ignored,
            n_past_end=past_end,
            tokens=tuple(emitted),
            text=text,
            draft_seconds=draft_seconds,
            verify_seconds=verify_seconds,
            draft_source=decision.source if draft.tokens or draft.n_ignored else "none",
            why=decision,
            pieces=tuple(self.engine.main.piece(t) for t in (*draft.tokens, main_token)),
            context=context,
        )

    def finish(self, controller: DraftController | None, context: int) -> Finished:
        engine, stats = self.engine, self.stats
        tail = self.stream.finish()
        self.released.append(tail)
        finished_at = time.perf_counter()
        stats.stop_reason = self.stop_reason
        stats.predicted_tokens_count = len(self.tokens)
        stats.generation_time = finished_at - self.started
        stats.time_to_first_token = (self.first_token_at or finished_at) - self.started
        stats.overhead_time = stats.generation_time - self.decode_seconds
        # a batch no wider than the self-check's exact ones is plain decoding, bit for bit; so is a prompt read
        # alone, in the chunks plain decoding reads it in; but not among other sequences' cells (Context.shared_cells)
        kernels = engine.main_profile.kernels
        narrow = stats.widest_batch <= kernels.exact_up_to and not self.shared_prompt
        stats.exact = (engine.exact_kernels or narrow) and not engine.main_ctx.shared_cells
        stats.exact_check = kernels.describe()
        stats.threads = engine.cores.threads if engine.cores is not None else engine.n_threads
        after_first = len(self.tokens) - self.first_round_tokens
        if after_first > 0 and finished_at > self.first_token_at:
            stats.tokens_per_second = after_first / (finished_at - self.first_token_at)
        elif self.tokens:
            stats.tokens_per_second = len(self.tokens) / stats.generation_time
        sent = sum(n * c for n, c in stats.draft_length_histogram.items())
        stats.mean_draft_length = sent / stats.rounds if stats.rounds else 0.0
        stats.plain_time_estimate = self._plain_estimate(after_first, controller)
        stats.speedup_estimate = stats.plain_time_estimate / stats.generation_time if stats.generation_time > 0 else 1.0
        return Finished(text="".join(self.released), tail=tail, tokens=tuple(self.tokens), stats=stats, context=context)

    def _plain_estimate(self, after_first: int, controller: DraftController | None) -> float:
        """Seconds plain decoding would have taken for this reply (GenerationStats.plain_time_estimate)."""
        stats, profile = self.stats, self.engine.main_profile
        if not stats.total_draft_tokens_count or profile is PLAIN_ONLY:
            return stats.generation_time  # nothing was drafted: this was plain decoding
        one_token = controller.verify_cost.at(0) if controller is not None else None
        one_token = one_token or profile.verify_seconds.get(1, 0.0)
        return stats.time_to_first_token + max(after_first, 0) * one_token


class SpeculativeEngine:
    """Main model + optional draft model, each in its own llama.cpp context.

    At creation the main model's kernels are probed on this machine (probe.py, cached): whether a verify
    batch is bit-identical to one-token decoding, and what batches cost; likewise the draft model's cost
    per token. The adaptive controller starts from those figures and never feeds or probes a source that
    could not beat plain decoding here even at full acceptance. `exact=True` promises output identical to
    plain decoding: when the kernels cannot keep that promise, nothing is drafted at all.
    """

    def __init__(
        self,
        main: Model,
        draft: Model | None = None,
        n_ctx: int = 4096,
        n_threads: int = 4,
        lookup: bool = False,
        exact: bool = False,
        main_profile: MainProfile | None = None,  # measured (or cached) when not given
        draft_profile: DraftProfile | None = None,
        progress: Progress | None = None,  # the self-check's steps, when it runs (not cached yet)
        n_seq: int = 1,  # sequences served together (--parallel): one batch per round carries them all
        mtp: bool = False,  # draft with the main model's own MTP head (it must have one: Model.mtp_layers)
        follow_cores: bool | None = None,  # fewer threads while other processes keep cores busy (default: cores.following)
    ):
        n_ctx = usable_context(n_ctx, main.n_ctx_train)
        self.main = main
        self.draft_model = draft
        self.drafter: ModelDrafter | None = None
        if draft is not None:
            require_compatible(main.path.name, draft.path.name, check_compatibility(main, draft))
        if mtp and not main.mtp_layers:
            raise TandemError(f"{main.path.name} was loaded without its MTP head" if main.info.mtp_layers else
                              f"{main.path.name} has no MTP head (no nextn layers this llama.cpp runs): "
                              "pick a draft model or prompt lookup")  # fmt: skip
        if main_profile is None:
            main_profile = profile_main(main, n_threads, progress=progress) if draft is not None or lookup or mtp else PLAIN_ONLY
        self.main_profile = main_profile
        self.n_threads = n_threads
        # threads follow the free cores (cores.py) where the CPU decodes; a GPU's decode hardly uses them
        follow = following() if follow_cores is None else follow_cores
        self.cores = FreeCores(n_threads) if main.on_cpu and follow else None
        self.n_seq = n_seq
        self.main_ctx = Context(main, n_ctx, n_threads, n_seq=n_seq, hidden=mtp, unified=not exact)
        self.mtp = MtpDrafter(self.main_ctx, n_threads) if mtp else None
        self.draft_profile: DraftProfile | None = None
        if draft is not None:
            self.draft_profile = draft_profile or profile_draft(draft, n_threads)
            self.drafter = ModelDrafter(draft_context(draft, n_ctx, n_threads, n_seq))
        # the sources that draft with a model (a DraftRequest each round they are chosen), by name
        self._drafters: dict[str, ModelDrafter | MtpDrafter] = {d.source: d for d in (self.drafter, self.mtp) if d is not None}
        self.lookup = lookup
        self._states = [SequenceState(LookupDrafter() if self.lookup else None) for _ in range(n_seq)]
        self.n_ctx = self.main_ctx.n_ctx
        self._shared: list[Verify] = []  # the last decode's needs, when several sequences of a recurrent model shared it
        self.prompt_chunk = PROMPT_CHUNK if main.on_cpu else self.main_ctx.n_batch
        kernels = self.main_profile.kernels
        # --exact: verify no batch wider than the self-check found bit-identical to one-token decoding
        self.exact_cap = None if kernels.exact or not exact else kernels.exact_up_to - 1
        self.blocked = (
            "--exact: drafting off, no verify batch is bit-identical to one-token decoding for "
            f"{main.path.name} with this build and CPU (logits differ by up to {kernels.max_difference:.2g})"
            if self.exact_cap == 0 and (self._drafters or self.lookup)
            else ""
        )
        # what the controller learned (costs, acceptance) carries over to the next reply of this pair:
        # later chat turns start from measured figures instead of priors
        self._controllers: dict[tuple[int, int, int], DraftController] = {}
        self._verify_cost = VerifyCost()

    def _follow_free_cores(self) -> None:
        """Decode with the cores other processes leave free (cores.py); every context of the pair alike."""
        threads = self.cores.check()
        if threads is not None:
            for ctx in (self.main_ctx, *(d.ctx for d in self._drafters.values())):
                ctx.set_threads(threads)

    @property
    def llama_seconds(self) -> float:
        """Time inside llama.cpp's decodes, every context of the pair together, since it loaded: the rest of a
        round's time is this process's own (stepping, drafting logic, sampling, events)."""
        contexts = [self.main_ctx, *(d.ctx for d in self._drafters.values())]
        return sum(ctx.decode_seconds for ctx in contexts)

    def close(self) -> None:
        if self.mtp:  # before the main context: the head's context reads it
            self.mtp.ctx.close()
        self.main_ctx.close()
        if self.drafter:
            self.drafter.ctx.close()

    def abandon(self) -> None:
        """The main model's RPC worker was lost mid-decode: a thread is stuck in llama.cpp for good, and nothing of
        this pair may be freed or used again (rpc.py). Its memory is left to the process's end."""
        if self.mtp:
            self.mtp.ctx.abandon()
        self.main_ctx.abandon()
        self.main.abandon()
        if self.drafter:
            self.drafter.ctx.abandon()
        if self.draft_model is not None:
            self.draft_model.abandon()

    @property
    def exact_kernels(self) -> bool:
        return self.main_profile.kernels.exact

    def controller(self, draft_min: int, draft_max: int, seq: int = 0) -> DraftController:
        """The adaptive controller for these bounds on sequence `seq`, started from this machine's measured costs.
        Acceptance and draft costs are each sequence's own (a reply's text is not another's); the verify costs
        are the machine's, one curve for all (VerifyCost, shared)."""
        key = (draft_min, draft_max, seq)
        if key not in self._controllers:
            sources = [*self._drafters.values(), *([LookupDrafter] if self.lookup else [])]
            ctl = DraftController(draft_min, draft_max, verify_cost=self._verify_cost,
                                  traits={source.source: source.traits for source in sources})  # fmt: skip
            draft = self.draft_profile
            ctl.seed(self.main_profile.verify_seconds, draft.token_seconds if draft else None, draft.catch_up_seconds if draft else None)
            self._controllers[key] = ctl
        return self._controllers[key]

    def speculation_state(self, config: GenerationConfig) -> str:
        """In words: what drafting a reply with `config` will do on this machine, and why (empty: nothing to say)."""
        if self.blocked:
            return self.blocked
        if not self._sources(config) or config.draft_max == 0:
            return "plain decoding"
        prefix = ""
        if self.exact_cap is not None and self.exact_cap < config.draft_max:
            prefix = f"--exact: drafts of at most {self.exact_cap} tokens (wider verify batches are not bit-identical here); "
        if not config.adaptive:
            return prefix + f"fixed draft length {self._bounds(config)[1]}"
        closed = self._closed(config)
        return prefix + "; ".join(closed.values())

    def closed_sources(self, config: GenerationConfig) -> tuple[str, ...]:
        """The draft sources a reply with `config` will not use here: they cannot pay (or drafting is blocked)."""
        if self.blocked:
            return tuple(self._sources(config))
        return tuple(self._closed(config)) if config.adaptive and config.draft_max > 0 else ()

    def _closed(self, config: GenerationConfig) -> dict[str, str]:
        ctl = self.controller(*self._bounds(config))
        ctl.review(self._sources())
        return {s: ctl.closed[s] for s in self._sources(config) if s in ctl.closed}

    def _bounds(self, config: GenerationConfig) -> tuple[int, int]:
        return config.draft_min, min(config.draft_max, self.exact_cap if self.exact_cap is not None else config.draft_max)

    def _sources(self, config: GenerationConfig | None = None) -> list[str]:
        """The engine's draft sources, or those a reply with `config` may use."""
        drafters, lookup = self._reply_sources(config) if config is not None else (self._drafters, self.lookup)
        return [*drafters, *([LOOKUP] if lookup else [])]

    def _reply_sources(self, config: GenerationConfig) -> tuple[dict[str, ModelDrafter | MtpDrafter], bool]:
        """The drafting models a reply with `config` may use, by source, and whether it may use lookup."""
        allowed = config.sources
        if allowed is None:
            return self._drafters, self.lookup
        return {s: d for s, d in self._drafters.items() if s in allowed}, self.lookup and LOOKUP in allowed

    def generate(
        self, prompt: Sequence[int], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """One reply on sequence 0, alone: each step's main-model need is decoded as it comes."""
        for item in self.sequence(0, prompt, config, cancel):
            if isinstance(item, Verify):
                self.decode([item])
            elif isinstance(item, DraftRequest):
                self.propose([item])
            else:
                yield item

    def propose(self, requests: Sequence[DraftRequest]) -> None:
        """Draft every request, each source's requests together (ModelDrafter batches sequences' drafts)."""
        for source, drafter in self._drafters.items():
            if mine := [r for r in requests if r.source == source]:
                drafter.propose_all(mine)

    def decode(self, needs: Sequence[Verify]) -> None:
        """One main-model decode over several sequences' needs; each gets its rows, the width and the time."""
        started = time.perf_counter()
        if self.cores is not None and self.cores.due(started):
            self._follow_free_cores()
        rows = self.main_ctx.decode_parts([(need.seq, need.tokens, len(need.tokens) if need.logits else 0) for need in needs])
        seconds = time.perf_counter() - started
        width = sum(len(need.tokens) for need in needs)
        for need, view in zip(needs, rows, strict=True):
            need.rows, need.width, need.seconds = view, width, seconds
        # a recurrent model's rejected drafts may be taken back by a replay (Context.truncate), a decode that would
        # overwrite llama.cpp's logits before the other sequences of this decode have read their rows (_keep_rows)
        self._shared = list(needs) if len(needs) > 1 and self.main_ctx.recurrent else []
        if self.mtp:  # the hidden states the MTP head drafts from (copied before the next decode overwrites them)
            self.mtp.observe(needs)

    def _keep_rows(self) -> None:
        """Copy the rows of the last shared decode out of llama.cpp's buffer, before a replay decodes over them (only
        then: a 9-token verify of a 248k vocabulary is 9 MB a sequence)."""
        for need in self._shared:
            if need.rows is not None and need.rows.base is not None:
                need.rows = need.rows.copy()
        self._shared = []

    def pick_sequence(self, prompt: Sequence[int], busy: set[int]) -> int:
        """The free sequence that already holds the longest part of `prompt` (a continuing conversation lands
        where its prefix is cached); else the free one whose cache is worth least: what no other sequence also
        holds (a prefix borrowed from another, see Context.borrow_prefix, costs nothing to drop), the emptiest."""
        free = [seq for seq in range(self.n_seq) if seq not in busy]
        if not free:
            raise ValueError("every sequence is busy")
        ctx = self.main_ctx
        best = max(free, key=lambda seq: ctx.common_prefix(prompt, seq))
        if ctx.common_prefix(prompt, best) >= PROMPT_FIRST_CHUNK or len(free) == 1:
            return best
        unique = self._unique_tokens()
        return min(free, key=lambda seq: (unique[seq], len(ctx.seqs[seq])))

    def _unique_tokens(self) -> list[int]:
        """Per sequence: the tokens of its cache that no other sequence holds too (what dropping it would lose). In
        lexicographic order the longest prefix a sequence shares with any other is shared with a neighbour, so a sort
        and one comparison per neighbouring pair do what comparing every pair did (n log n, not n squared)."""
        seqs = self.main_ctx.seqs
        order = sorted(range(self.n_seq), key=seqs.__getitem__)
        shared = [0] * self.n_seq
        for a, b in itertools.pairwise(order):
            n = self.main_ctx.common_prefix(seqs[a], b)
            shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
        return [len(seqs[seq]) - shared[seq] for seq in range(self.n_seq)]

    def sequence(
        self, seq: int, prompt: Sequence[int], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[Event | Verify | DraftRequest]:
        """One reply on sequence `seq`, as steps: yields events, a DraftRequest when it drafts with the draft model
        and a Verify each time it needs the main model (which the caller fulfils, alone or together with other
        sequences', before asking for the next item)."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.n_ctx}; "
                "shorten it or raise --ctx-size"
            )
        settings = config.sampler
        uniforms = PositionalUniforms(settings.seed)  # one number per position: seeded runs repeat exactly
        penalty = PenaltyWindow(settings)
        reply = Reply(self, config, len(prompt))
        controller = self.controller(*self._bounds(config), seq) if config.adaptive else None
        if controller is not None:
            controller.new_reply()
        tokens = list(prompt)
        stepped_back = False  # the last verify was rolled back through a recurrent model's snapshot
        state = self._states[seq]
        state.shadow, state.batch = None, None
        state.drafters, state.use_lookup = self._reply_sources(config)
        if state.lookup is not None:
            state.lookup.start(tokens)

        # the last prompt token opens the first verify batch. The draft model is not fed the prompt here:
        # it catches up only when the controller first chooses it (a reply that never drafts never pays)
        prefix = tokens[:-1]
        if self.mtp:
            self.mtp.start(seq, prefix, self.main_ctx.common_prefix(prefix, seq))
        if self.n_seq > 1:  # a prefix another sequence holds is shared, not read again (every context)
            self.main_ctx.borrow_prefix(prefix, seq, PROMPT_FIRST_CHUNK)
            for drafter in self._drafters.values():
                drafter.ctx.borrow_prefix(prefix, seq, PROMPT_FIRST_CHUNK)
        kept = self.main_ctx.keep_common_prefix(prefix, seq=seq)
        for drafter in self._drafters.values():  # and what a drafter holds of another conversation goes now (no decode:
            # it catches up lazily), or its length would pass for being in sync (the controller's `behind`)
            drafter.ctx.keep_common_prefix(prefix, seq=seq)
        reply.stats.prompt_tokens_evaluated = len(prefix) - kept + 1
        yield from self._read_prompt(seq, prefix, kept, cancel, reply)  # stopped early by a cancel: the loop ends at once
        self.main_ctx.checkpoint(seq)  # a recurrent model: an edited or regenerated turn goes back here, not to the start

        while not reply.stop_reason:
            if cancel is not None and cancel.is_set():
                reply.stop_reason = CANCELLED
                break
            room = self.n_ctx - len(tokens)  # verify batch = last token + k drafts must fit
            if room <= 0:
                reply.stop_reason = CONTEXT_FULL
                break
            limit = 0 if self.blocked else min(config.draft_max, config.max_tokens - len(reply.tokens) - 1, room - 1,
                                               self.main_ctx.n_batch - 1)  # one verify is one decode  # fmt: skip
            if self.exact_cap is not None:
                limit = min(limit, self.exact_cap)
            if self.main_ctx.rollback_limit:  # a recurrent main model drops rejected drafts through its snapshots
                limit = min(limit, self.main_ctx.rollback_limit)

            t0 = time.perf_counter()
            if reply.stats.rounds:
                decision, draft = self._make_draft(seq, tokens, limit, config, uniforms, controller,
                                                   config.max_tokens - len(reply.tokens))  # fmt: skip
            else:  # the first round is plain: time to first token is plain decoding's, whatever drafting costs
                decision, draft = Decision("none", 0, FIRST_TOKEN), Draft()
            draft_seconds = time.perf_counter() - t0
            if isinstance(draft, DraftRequest):
                request = draft
                yield request
                draft = request.draft
                draft_seconds += request.seconds  # drafted together with other sequences: this one's share
                reply.drafted(request.seconds)
            saved = time.perf_counter()
            if draft.tokens:  # a recurrent model without usable snapshots: its replay lands inside this verify's time
                self.main_ctx.rollback_point(seq)
            saved = time.perf_counter() - saved  # (saving that point is part of verifying: priced with it)
            need = Verify(seq, [tokens[-1], *draft.tokens], logits=True)
            yield need
            resumed = time.perf_counter()  # (with other sequences, their work came between the decode and now)
            if settings.greedy and not penalty.active:
                n_accepted, main_token = _verify_greedy(need.rows, draft.tokens)
            else:
                n_accepted, main_token = _verify_sampled(need.rows, draft, tokens, settings, penalty, uniforms)
            replays = self.main_ctx.replays(len(tokens) + n_accepted, seq)
            if self._shared and replays:
                self._keep_rows()
            # stepped back through a snapshot: the next decode reads the state from there (DraftController.rollback_cost)
            after_rollback, stepped_back = stepped_back, self.main_ctx.recurrent and n_accepted < len(draft.tokens) and not replays
            if not self.main_ctx.truncate(len(tokens) + n_accepted, seq):  # drop rejected drafts from the KV cache
                raise TandemError(f"llama.cpp could not drop rejected draft tokens from {self.main.path.name}'s cache")
            verify_seconds = need.seconds + time.perf_counter() - resumed + saved
            others = need.round_sequences - 1
            # (a prompt chunk read beside is left out: a one-off, decoded apart, its cost the same whatever is drafted)
            state.batch = Batch(others) if others else None
            reply.verified(need)
            if controller is not None:
                model = decision.source in self._drafters  # a model drafted (its own catch-up and evaluations)
                # a shared batch's time is not this sequence's verify cost: only its acceptance is evidence then. Nor
                # is the first decode after a prompt: over RPC workers it took 200-450 ms where later ones took 95
                # (real pair, 1 ms each way), and plain decoding priced from it made every draft look like a gain
                timed = need.alone and decision.why != FIRST_TOKEN
                controller.record(decision, len(draft.tokens), n_accepted, draft_seconds, verify_seconds if timed else None,
                                  draft.evaluated if model else None, draft.caught_up if model else None,
                                  after_rollback)  # fmt: skip
                if decision.source == "model":
                    _judge_unsure(controller, draft, n_accepted, main_token)
            emitted = reply.take([*draft.tokens[:n_accepted], main_token], tokens)
            yield reply.round(decision, draft, n_accepted, main_token, emitted, draft_seconds, verify_seconds,
                              context=len(self.main_ctx.seqs[seq]))  # fmt: skip

        self.main_ctx.checkpoint(seq)  # the turn's end: the next turn continues from here whatever the verify left
        if self.drafter:  # a recurrent draft model's too (its per-round point is gone by the next turn's edit)
            self.drafter.ctx.checkpoint(seq)
        finished = reply.finish(controller, context=len(self.main_ctx.seqs[seq]))
        if controller is not None and self._profile_is_stale(controller):
            self._retime()  # before the Finished: a reader that stops at it (--json, --benchmark) still gets it done
        yield finished

    def _retime(self) -> None:
        """Time the verify curve again (it was timed on a busy machine); a failure keeps the old one."""
        try:
            self.main_profile = retime_main(self.main, self.n_threads, self.main_profile)
        except TandemError:
            return
        self._verify_cost.set_prior({n - 1: s for n, s in self.main_profile.verify_seconds.items()})

    def _profile_is_stale(self, controller: DraftController) -> bool:
        """Live one-token rounds have run well under the probe's time for a sustained stretch (STALE_AFTER)."""
        return self.main_profile is not PLAIN_ONLY and controller.verify_cost.runs.get(0, 0) >= STALE_AFTER

    def _read_prompt(
        self, seq: int, prefix: list[int], kept: int, cancel: threading.Event | None, reply: Reply
    ) -> Iterator[PromptProgress | Verify]:
        """Evaluate prefix[kept:] in batches of prompt_chunk (each a step: other sequences' rounds run between
        them), stopping early when cancelled. Progress goes out between batches once reading looks like taking
        over PROMPT_PROGRESS_AFTER seconds."""
        total = len(prefix) - kept
        started = time.perf_counter()
        done = 0
        announced = False
        while done < total:
            if cancel is not None and cancel.is_set():
                return
            size = self.prompt_chunk if done else min(PROMPT_FIRST_CHUNK, self.prompt_chunk)
            need = Verify(seq, prefix[kept + done : kept + done + size], logits=False)
            yield need
            reply.read(need)
            done += len(need.tokens)
            self.main_ctx.checkpoint_due(seq)
            if done < total:
                elapsed = time.perf_counter() - started
                if announced or elapsed * total / done >= PROMPT_PROGRESS_AFTER:
                    announced = True
                    yield PromptProgress(done, total, elapsed, kept)

    @staticmethod
    def _check_shadow(state: SequenceState, tokens: list[int], controller: DraftController) -> None:
        """Judge lookup's unused proposal against the tokens that came since, as if it had been verified:
        evidence is recorded once the proposal is settled (a token differed, or all of it came true), so a
        proposal right at its first token but wrong at its third counts as what it would have been."""
        start, proposal = state.shadow
        came = tokens[start : start + len(proposal)]
        n = 0
        while n < len(came) and came[n] == proposal[n]:
            n += 1
        if n < len(came) or n == len(proposal):
            controller.observe("lookup", n, n + (n < len(proposal)))
            state.shadow = None

    @property
    def backend(self) -> str:
        """Which llama.cpp CPU build runs here, and where each model's weights live (kernels.py)."""
        main = f"main on {self.main.where}" if self.main.where else f"main weights {self.main.kernels.name}"
        parts = [f"CPU {backends().cpu_variant}", *backends().accelerators, main]
        if self.draft_model is not None:
            draft = self.draft_model.kernels
            parts.append(f"draft weights {draft.name}" + ("" if draft.batches else " (one token at a time)"))
        return ", ".join(parts)

    @property
    def draft_name(self) -> str | None:
        return self.draft_name_for(None)

    def draft_name_for(self, sources: frozenset[str] | None) -> str | None:
        """What drafts for a reply that may use `sources` (None: all of this engine's), in the stats' words."""
        lookup = self.lookup and (sources is None or LOOKUP in sources)
        if self.mtp and (sources is None or MTP in sources):
            return "MTP head + prompt lookup" if lookup else "MTP head"
        if not self.drafter or (sources is not None and DRAFT_MODEL not in sources):
            return "prompt lookup" if lookup else None
        draft = self.draft_model
        name = draft.name
        if draft.path == self.main.path:
            name += " (self-draft)"  # the main model's own file drafts for it
        elif name == self.main.name:  # another file of the same model (the demo pair: F16 main, Q4_1 draft)
            quant = draft.info.quantization
            name += f" {quant}" if quant != self.main.info.quantization else f" ({draft.path.name})"
        return f"{name} + prompt lookup" if lookup else name

    def _make_draft(
        self,
        seq: int,
        tokens: list[int],
        limit: int,
        config: GenerationConfig,
        uniforms: PositionalUniforms,
        controller: DraftController | None,
        remaining: int,
    ) -> tuple[Decision, Draft | DraftRequest]:
        """Pick a source and a length (the controller, or fixed draft_max), then draft (lookup) or say what the
        draft model is to draft."""
        state = self._states[seq]
        drafters = state.drafters
        if limit <= 0 or not (drafters or state.use_lookup):
            return (Decision("none", 0, OFF, detail=self.blocked) if self.blocked else Decision("none", 0, NO_SOURCE)), Draft()
        if limit < config.draft_min:  # the end of the reply is nearer than draft-min: a draft would be thrown away
            return Decision("none", 0, NEAR_END, left=limit, draft_min=config.draft_min), Draft()
        if controller is not None and (resting := controller.resting(state.batch)) is not None:
            return resting, Draft()  # nothing came near paying lately: not even a lookup match is looked for
        match = state.lookup.match(tokens, limit) if state.use_lookup and state.lookup else []
        if controller is not None and state.shadow is not None:
            self._check_shadow(state, tokens, controller)
        if controller is None:  # fixed length: the draft model or MTP head when there is one (llama.cpp's rule), else lookup
            if DRAFT_MODEL in drafters:
                decision = Decision(DRAFT_MODEL, limit, FIXED)
            elif MTP in drafters:
                decision = Decision(MTP, min(limit, max(MTP_DEPTH, config.draft_min)), FIXED)
            elif len(match) >= max(1, config.draft_min):
                decision = Decision("lookup", len(match), FIXED_LOOKUP)
            else:
                return Decision("none", 0, NO_MATCH), Draft()
        else:
            available = {LOOKUP: len(match)} if match else {}
            if DRAFT_MODEL in drafters:
                available[DRAFT_MODEL] = limit
            if MTP in drafters:
                available[MTP] = min(limit, max(MTP_DEPTH, config.draft_min))
            # beyond the main model's last token and an accepted draft's last token, a drafting model
            # evaluates what it missed: a new prompt, or what other sources and plain rounds produced meanwhile
            behind = {source: max(len(tokens) - len(d.ctx.seqs[seq]) - 2, 0) for source, d in drafters.items()}
            decision = controller.decide(available, behind, horizon=remaining, batch=state.batch)
            if match and decision.source != "lookup" and state.shadow is None:
                state.shadow = (len(tokens), match[:SHADOW_TOKENS])
        if decision.source in self._drafters:
            # (the confidence stop is lifted only where the controller has judged a draft model's unsure tokens)
            stop = controller.stop_unsure(decision.k) if controller is not None and decision.source == "model" else True
            # drafted by whoever steps this sequence
            return decision, DraftRequest(seq, tokens, decision.k, config, uniforms, stop, decision.source)
        if decision.source == "lookup":
            return decision, Draft(tokens=match[: decision.k])
        return decision, Draft()


def _judge_unsure(controller: DraftController, draft: Draft, n_accepted: int, main_token: int) -> None:
    """Would the confidence stop's unsure tokens have been accepted? Unsure tokens sent were judged by the verify;
    a withheld one is judged against the main model's own token at its place, known when every draft before it
    was accepted (the round's last token is then the main model's choice there)."""
    for i in draft.unsure:
        if i <= n_accepted:  # reached: every draft before it accepted
            controller.observe_unsure(i < n_accepted)
    if draft.withheld is not None and n_accepted == len(draft.tokens):
        controller.observe_unsure(draft.withheld == main_token)


def _verify_greedy(rows: np.ndarray, drafted: list[int]) -> tuple[int, int]:
    """Accept the longest prefix of `drafted` that matches the main model's argmax at each position."""
    best = rows.argmax(axis=1)
    n = 0
    while n < len(drafted) and best[n] == drafted[n]:
        n += 1
    return n, int(best[n])


def _verify_sampled(
    rows: np.ndarray,
    draft: Draft,
    tokens: list[int],
    settings: SamplerSettings,
    penalty: PenaltyWindow,
    uniforms: PositionalUniforms,
) -> tuple[int, int]:
    """At each position the main model draws its own token, as plain decoding would there (sampling.py);
    drafts are kept while they equal those draws. With a repeat penalty and no temperature: the
    penalised argmax."""

    def main_choice(i: int) -> int:
        history = tokens + draft.tokens[:i] if penalty.active else ()
        if settings.greedy:
            return greedy_token(rows[i], penalty, history)
        p = distribution(rows[i], settings, penalty.ids(history) if penalty.active else None)
        return p.sample_at(uniforms.at(len(tokens) + i))

    for i, token in enumerate(draft.tokens):
        chosen = main_choice(i)
        if chosen != token:
            return i, chosen
    return len(draft.tokens), main_choice(len(draft.tokens))
