"""The speculative loop: draft k tokens, verify them in one main-model batch, keep what agrees.

Invariant between rounds: `tokens` is the whole sequence (prompt + reply so far); the main context
caches every token but the last, which is the first token of the next verify batch. Plain decoding
is the same loop with k = 0, so plain and speculative numbers come from one code path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from app.engine.backend import Context, Model, draft_context
from app.engine.backends import backends
from app.engine.compat import check_compatibility, require_compatible
from app.engine.controller import Decision, DraftController
from app.engine.errors import ContextOverflowError, IncompatibleDraftError, TandemError
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
    draft_p_min: float = 0.0
    stop: tuple[str, ...] = ()
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    adaptive: bool = True  # choose k per round from measured acceptance and costs; False: always draft_max


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    n_ignored: int = 0
    evaluated: int = 0  # tokens the draft model evaluated: its catch-up, then one per draft but the last
    caught_up: tuple[int, float] = (0, 0.0)  # (tokens, seconds) of the catch-up before drafting


class ModelDrafter:
    """Drafts with a small model. Its context follows the accepted sequence incrementally:
    each round it evaluates only the tokens it has not seen (usually the main model's last token)."""

    source = "model"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._confidence = Confidence(ctx.model.n_vocab)

    def propose(self, tokens: list[int], k: int, config: GenerationConfig, uniforms: PositionalUniforms) -> Draft:
        draft = Draft()
        settings = config.sampler
        penalty = PenaltyWindow(settings)
        started = time.perf_counter()
        draft.evaluated = self.ctx.sync(tokens)
        draft.caught_up = (draft.evaluated, time.perf_counter() - started)
        for i in range(k):
            row = self.ctx.logits()[-1]
            history = tokens + draft.tokens if penalty.active else ()
            if settings.greedy:
                token = greedy_token(row, penalty, history)
                # a softmax over the vocabulary costs ~50 us: only pay it when the threshold can bite
                confidence = self._confidence.top_prob(row) if config.draft_p_min > 0 else 1.0
            else:
                q = distribution(row, settings, penalty.ids(history) if penalty.active else None)
                token = q.sample_at(uniforms.at(len(tokens) + i))  # coupled to the main model's draw (sampling.py)
                confidence = q.max_prob()
            if confidence < config.draft_p_min:
                draft.n_ignored += 1  # llama.cpp's rule: an unsure token ends the draft and is not sent
                break
            draft.tokens.append(token)
            if i + 1 < k:  # the last drafted token is evaluated next round, only if accepted
                self.ctx.decode([token])
                draft.evaluated += 1
        if len(draft.tokens) < config.draft_min:
            draft.n_ignored += len(draft.tokens)
            draft.tokens = []
        return draft


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
    ):
        n_ctx = min(n_ctx, main.n_ctx_train) if main.n_ctx_train > 0 else n_ctx
        # a recurrent main model cannot roll rejected drafts back: it decodes plainly, exact by construction
        recurrent = (
            f"drafting off: {main.path.name} is a recurrent model (its state cannot drop rejected draft tokens)"
            if main.recurrent and (draft is not None or lookup)
            else ""
        )
        if recurrent:
            draft, lookup, main_profile = None, False, PLAIN_ONLY
        elif draft is not None and draft.recurrent:
            raise IncompatibleDraftError(
                f"draft {draft.path.name} is a recurrent model: its state cannot drop rejected draft tokens; "
                "use a transformer draft, --draft lookup or --no-draft"
            )
        self.main = main
        self.draft_model = draft
        self.drafter: ModelDrafter | None = None
        if draft is not None:
            require_compatible(main.path.name, draft.path.name, check_compatibility(main, draft))
        if main_profile is None:
            main_profile = profile_main(main, n_threads, progress=progress) if draft is not None or lookup else PLAIN_ONLY
        self.main_profile = main_profile
        self.n_threads = n_threads
        self.main_ctx = Context(main, n_ctx, n_threads)
        self.draft_profile: DraftProfile | None = None
        if draft is not None:
            self.draft_profile = draft_profile or profile_draft(draft, n_threads)
            self.drafter = ModelDrafter(draft_context(draft, n_ctx, n_threads))
        self.lookup = LookupDrafter() if lookup else None
        self.n_ctx = self.main_ctx.n_ctx
        self.prompt_chunk = PROMPT_CHUNK if main.on_cpu else self.main_ctx.n_batch
        kernels = self.main_profile.kernels
        # --exact: verify no batch wider than the self-check found bit-identical to one-token decoding
        self.exact_cap = None if kernels.exact or not exact else kernels.exact_up_to - 1
        self.blocked = recurrent or (
            "--exact: drafting off, no verify batch is bit-identical to one-token decoding for "
            f"{main.path.name} with this build and CPU (logits differ by up to {kernels.max_difference:.2g})"
            if self.exact_cap == 0 and (self.drafter or self.lookup)
            else ""
        )
        # what the controller learned (costs, acceptance) carries over to the next reply of this pair:
        # later chat turns start from measured figures instead of priors
        self._controllers: dict[tuple[int, int], DraftController] = {}
        self._shadow: tuple[int, list[int]] | None = None

    def close(self) -> None:
        self.main_ctx.close()
        if self.drafter:
            self.drafter.ctx.close()

    @property
    def exact_kernels(self) -> bool:
        return self.main_profile.kernels.exact

    def controller(self, draft_min: int, draft_max: int) -> DraftController:
        """The adaptive controller for these bounds, started from this machine's measured costs."""
        bounds = (draft_min, draft_max)
        if bounds not in self._controllers:
            ctl = DraftController(*bounds)
            draft = self.draft_profile
            ctl.seed(self.main_profile.verify_seconds, draft.token_seconds if draft else None, draft.catch_up_seconds if draft else None)
            self._controllers[bounds] = ctl
        return self._controllers[bounds]

    def speculation_state(self, config: GenerationConfig) -> str:
        """In words: what drafting a reply with `config` will do on this machine, and why (empty: nothing to say)."""
        if self.blocked:
            return self.blocked
        if not (self.drafter or self.lookup) or config.draft_max == 0:
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
            return tuple(self._sources())
        return tuple(self._closed(config)) if config.adaptive and config.draft_max > 0 else ()

    def _closed(self, config: GenerationConfig) -> dict[str, str]:
        ctl = self.controller(*self._bounds(config))
        ctl.review(self._sources())
        return {s: ctl.closed[s] for s in self._sources() if s in ctl.closed}

    def _bounds(self, config: GenerationConfig) -> tuple[int, int]:
        return config.draft_min, min(config.draft_max, self.exact_cap if self.exact_cap is not None else config.draft_max)

    def _sources(self) -> list[str]:
        return [s for s, on in (("model", self.drafter), ("lookup", self.lookup)) if on]

    def generate(
        self, prompt: Sequence[int], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
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
        stats = GenerationStats(draft_model=self.draft_name, backend=self.backend)
        stats.speculation = self.speculation_state(config)
        stats.closed_sources = self.closed_sources(config)
        controller = self.controller(*self._bounds(config)) if config.adaptive else None
        stats.prompt_tokens_count = len(prompt)
        stream = TextStream(self.main.piece, config.stop)
        tokens = list(prompt)
        reply: list[int] = []
        released: list[str] = []
        contexts = [self.main_ctx, *([self.drafter.ctx] if self.drafter else [])]
        decode_before = sum(c.decode_seconds for c in contexts)
        started = time.perf_counter()
        first_token_at = 0.0
        first_round_tokens = 0
        stop_reason = ""
        widest = 1  # the widest verify batch of this reply
        self._shadow = None  # (position, tokens): lookup's unused proposal, checked next round (controller.observe)
        if self.lookup:
            self.lookup.start(tokens)

        # the last prompt token opens the first verify batch. The draft model is not fed the prompt here:
        # it catches up only when the controller first chooses it (a reply that never drafts never pays)
        prefix = tokens[:-1]
        kept = self.main_ctx.keep_common_prefix(prefix)
        stats.prompt_tokens_evaluated = len(prefix) - kept + 1
        yield from self._read_prompt(prefix, kept, cancel)  # stopped early by a cancel: the loop ends at once

        while not stop_reason:
            if cancel is not None and cancel.is_set():
                stop_reason = CANCELLED
                break
            room = self.n_ctx - len(tokens)  # verify batch = last token + k drafts must fit
            if room <= 0:
                stop_reason = CONTEXT_FULL
                break
            limit = 0 if self.blocked else min(config.draft_max, config.max_tokens - len(reply) - 1, room - 1)
            if self.exact_cap is not None:
                limit = min(limit, self.exact_cap)

            t0 = time.perf_counter()
            if stats.rounds:
                decision, draft = self._make_draft(tokens, limit, config, uniforms, controller, config.max_tokens - len(reply))
            else:  # the first round is plain: time to first token is plain decoding's, whatever drafting costs
                decision, draft = Decision("none", 0, "first token: plain decoding"), Draft()
            t1 = time.perf_counter()
            self.main_ctx.decode([tokens[-1], *draft.tokens], all_logits=True)
            rows = self.main_ctx.logits()
            if settings.greedy and not penalty.active:
                n_accepted, main_token = _verify_greedy(rows, draft.tokens)
            else:
                n_accepted, main_token = _verify_sampled(rows, draft, tokens, settings, penalty, uniforms)
            if not self.main_ctx.truncate(len(tokens) + n_accepted):  # drop rejected drafts from the KV cache
                raise TandemError(f"llama.cpp could not drop rejected draft tokens from {self.main.path.name}'s cache")
            t2 = time.perf_counter()
            widest = max(widest, len(draft.tokens) + 1)
            if controller is not None:
                work = draft.evaluated if decision.source == "model" else None
                catch_up = draft.caught_up if decision.source == "model" else None
                controller.record(decision, len(draft.tokens), n_accepted, t1 - t0, t2 - t1, work, catch_up)

            emitted: list[int] = []
            consumed = 0  # of the accepted drafts and the main token, how many the reply took before it ended
            for token in (*draft.tokens[:n_accepted], main_token):
                consumed += 1
                if self.main.is_eog(token):
                    stop_reason = EOS
                    break
                tokens.append(token)
                reply.append(token)
                emitted.append(token)
                if stream.push(token):
                    stop_reason = STOP_STRING
                    break
                if len(reply) >= config.max_tokens:
                    stop_reason = MAX_TOKENS
                    break
            text = stream.release()
            released.append(text)
            if not first_token_at:
                first_token_at = time.perf_counter()
                first_round_tokens = len(reply)

            n_drafted = len(draft.tokens)
            # accepted drafts after the reply's end (an end-of-generation token, a stop string, the token
            # budget) were never used: LM Studio's "ignored", so accepted never exceeds the tokens generated
            past_end = n_accepted - min(n_accepted, consumed)
            n_accepted -= past_end
            n_ignored = draft.n_ignored + past_end
            stats.rounds += 1
            stats.total_draft_tokens_count += n_drafted + draft.n_ignored
            stats.accepted_draft_tokens_count += n_accepted
            stats.rejected_draft_tokens_count += n_drafted - n_accepted - past_end
            stats.ignored_draft_tokens_count += n_ignored
            stats.draft_length_histogram[n_drafted] = stats.draft_length_histogram.get(n_drafted, 0) + 1
            stats.draft_time += t1 - t0
            stats.verify_time += t2 - t1
            yield RoundEvent(
                drafted=tuple(draft.tokens),
                n_accepted=n_accepted,
                main_token=main_token,
                n_ignored=n_ignored,
                n_past_end=past_end,
                tokens=tuple(emitted),
                text=text,
                draft_seconds=t1 - t0,
                verify_seconds=t2 - t1,
                draft_source=decision.source if draft.tokens or draft.n_ignored else "none",
                decision=decision.reason,
                pieces=tuple(self.main.piece(t) for t in (*draft.tokens, main_token)),
            )

        tail = stream.finish()
        released.append(tail)
        finished_at = time.perf_counter()
        stats.stop_reason = stop_reason
        stats.predicted_tokens_count = len(reply)
        stats.generation_time = finished_at - started
        stats.time_to_first_token = (first_token_at or finished_at) - started
        stats.overhead_time = stats.generation_time - (sum(c.decode_seconds for c in contexts) - decode_before)
        # a batch no wider than the self-check's exact ones is plain decoding, bit for bit
        stats.exact = self.exact_kernels or widest <= self.main_profile.kernels.exact_up_to
        stats.exact_check = self.main_profile.kernels.describe()
        after_first = len(reply) - first_round_tokens
        if after_first > 0 and finished_at > first_token_at:
            stats.tokens_per_second = after_first / (finished_at - first_token_at)
        elif reply:
            stats.tokens_per_second = len(reply) / stats.generation_time
        sent = sum(n * c for n, c in stats.draft_length_histogram.items())
        stats.mean_draft_length = sent / stats.rounds if stats.rounds else 0.0
        stats.plain_time_estimate = self._plain_estimate(stats, after_first, controller)
        stats.speedup_estimate = stats.plain_time_estimate / stats.generation_time if stats.generation_time > 0 else 1.0
        if controller is not None and self._profile_is_stale(controller):
            self.main_profile = retime_main(self.main, self.n_threads, self.main_profile)
            for ctl in self._controllers.values():
                ctl.verify_cost.set_prior({n - 1: s for n, s in self.main_profile.verify_seconds.items()})
        yield Finished(text="".join(released), tail=tail, tokens=tuple(reply), stats=stats)

    def _plain_estimate(self, stats: GenerationStats, after_first: int, controller: DraftController | None) -> float:
        """Seconds plain decoding would have taken for this reply (GenerationStats.plain_time_estimate)."""
        if not stats.total_draft_tokens_count or self.main_profile is PLAIN_ONLY:
            return stats.generation_time  # nothing was drafted: this was plain decoding
        one_token = controller.verify_cost.at(0) if controller is not None else None
        one_token = one_token or self.main_profile.verify_seconds.get(1, 0.0)
        return stats.time_to_first_token + max(after_first, 0) * one_token

    def _profile_is_stale(self, controller: DraftController) -> bool:
        """Live one-token rounds have run well under the probe's time for a sustained stretch (STALE_AFTER)."""
        return self.main_profile is not PLAIN_ONLY and controller.verify_cost.runs.get(0, 0) >= STALE_AFTER

    def _read_prompt(self, prefix: list[int], kept: int, cancel: threading.Event | None) -> Iterator[PromptProgress]:
        """Evaluate prefix[kept:] in batches of prompt_chunk, stopping early when cancelled. Progress goes out
        between batches once reading looks like taking over PROMPT_PROGRESS_AFTER seconds."""
        total = len(prefix) - kept
        started = time.perf_counter()
        done = 0
        announced = False
        while done < total:
            if cancel is not None and cancel.is_set():
                return
            size = self.prompt_chunk if done else min(PROMPT_FIRST_CHUNK, self.prompt_chunk)
            chunk = prefix[kept + done : kept + done + size]
            self.main_ctx.decode(chunk)
            done += len(chunk)
            if done < total:
                elapsed = time.perf_counter() - started
                if announced or elapsed * total / done >= PROMPT_PROGRESS_AFTER:
                    announced = True
                    yield PromptProgress(done, total, elapsed, kept)

    def _check_shadow(self, tokens: list[int], controller: DraftController) -> None:
        """Judge lookup's unused proposal against the tokens that came since, as if it had been verified:
        evidence is recorded once the proposal is settled (a token differed, or all of it came true), so a
        proposal right at its first token but wrong at its third counts as what it would have been."""
        start, proposal = self._shadow
        came = tokens[start : start + len(proposal)]
        n = 0
        while n < len(came) and came[n] == proposal[n]:
            n += 1
        if n < len(came) or n == len(proposal):
            controller.observe("lookup", n, n + (n < len(proposal)))
            self._shadow = None

    @property
    def backend(self) -> str:
        """Which llama.cpp CPU build runs here, and where each model's weights live (kernels.py)."""
        parts = [f"CPU {backends().cpu_variant}", *backends().accelerators, f"main weights {self.main.kernels.name}"]
        if self.draft_model is not None:
            draft = self.draft_model.kernels
            parts.append(f"draft weights {draft.name}" + ("" if draft.batches else " (one token at a time)"))
        return ", ".join(parts)

    @property
    def draft_name(self) -> str | None:
        if not self.drafter:
            return "prompt lookup" if self.lookup else None
        draft = self.draft_model
        name = draft.name
        if draft.path == self.main.path:
            name += " (self-draft)"  # the main model's own file drafts for it
        elif name == self.main.name:  # another file of the same model (the demo pair: F16 main, Q4_1 draft)
            quant = draft.info.quantization
            name += f" {quant}" if quant != self.main.info.quantization else f" ({draft.path.name})"
        return f"{name} + prompt lookup" if self.lookup else name

    def _make_draft(
        self,
        tokens: list[int],
        limit: int,
        config: GenerationConfig,
        uniforms: PositionalUniforms,
        controller: DraftController | None,
        remaining: int,
    ) -> tuple[Decision, Draft]:
        """Pick a source and a length (the controller, or fixed draft_max), then draft."""
        if limit <= 0 or not (self.drafter or self.lookup):
            return Decision("none", 0, self.blocked or "no drafting"), Draft()
        if limit < config.draft_min:  # the end of the reply is nearer than draft-min: a draft would be thrown away
            return Decision("none", 0, f"at most {limit} tokens left to draft, under draft-min {config.draft_min}"), Draft()
        match = self.lookup.match(tokens, limit) if self.lookup else []
        if controller is not None and self._shadow is not None:
            self._check_shadow(tokens, controller)
        if controller is None:  # fixed length: the draft model when there is one (llama.cpp's rule), else lookup
            if self.drafter:
                decision = Decision("model", limit, f"fixed k={limit}")
            elif len(match) >= max(1, config.draft_min):
                decision = Decision("lookup", len(match), f"fixed, lookup match of {len(match)}")
            else:
                return Decision("none", 0, "no lookup match"), Draft()
        else:
            available = {"lookup": len(match)} if match else {}
            if self.drafter:
                available["model"] = limit
            # beyond the main model's last token and an accepted draft's last token, the draft model
            # evaluates what it missed: a new prompt, or what lookup and plain rounds produced meanwhile
            behind = {"model": max(len(tokens) - len(self.drafter.ctx.tokens) - 2, 0)} if self.drafter else {}
            decision = controller.decide(available, behind, horizon=remaining)
            if match and decision.source != "lookup" and self._shadow is None:
                self._shadow = (len(tokens), match[:SHADOW_TOKENS])
        if decision.source == "model":
            return decision, self.drafter.propose(tokens, decision.k, config, uniforms)
        if decision.source == "lookup":
            return decision, Draft(tokens=match[: decision.k])
        return decision, Draft()


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
