"""Adaptive draft length: pick, each round, the k that maximises expected tokens per second.

Model (per draft source): each drafted token is accepted with probability a, given the ones
before it were, so k drafts yield a(1 - a^k)/(1 - a) accepted tokens plus the main model's own.
A round costs draft(k) + verify(k + 1). Verifying is not free on a CPU (on this machine 9 tokens
cost 2.9x to 4.2x one token, depending on the build), so verify time is measured per batch size
(interpolated between sizes not yet seen). A draft model evaluates k + a^k tokens per round: the
main model's last token, k - 1 drafts, and, when all k were accepted, the last draft too (proposed,
never evaluated).
Plain decoding (k = 0) is always a candidate: when nothing beats it the controller drafts nothing,
and probes again every few rounds so it notices when acceptance returns.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

DECAY = 0.9  # per-round decay of acceptance evidence: about the last 10-20 rounds count
# light: one fully accepted probe of 4 already reads as a = 0.9 (a picked draft is usually a good one)
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 1.5
# lookup's evidence is free and plentiful where it pays (a settled proposal while copying adds up to 8
# accepted tokens), so its prior can be sceptical: a short reply must not pay for a draft made on the
# strength of one or two lucky tokens (a 15-token JSON answer loses 10% to one failed draft of 3)
OBSERVED_PRIOR, OBSERVED_WEIGHT = 0.5, 4.0
MARGIN = 1.05  # drafting must be predicted this much faster than plain: noise in the estimates must not make us slower
OPTIMISTIC_ACCEPTANCE = 0.98  # a probe is made only if even this acceptance would pay at the measured draft cost...
PROBE_GAIN = 1.15  # ...by this much: a probe of an idle draft model costs its catch-up, so a marginal one loses
PRIOR_VERIFY_SLOPE = 0.3  # extra verify cost per extra token, as a fraction of one token, until measured
FIRST_PROBE = 4  # tokens drafted by the first probe of a source
PROBE_EVERY = 8  # rounds without a source before it is probed; doubles after each probe that does not win
MAX_PROBE_INTERVAL = 256
CATCH_UP_HORIZON = 64  # tokens over which a draft model's catch-up after idling is paid back (or what is left of the reply)
CATCH_UP_BATCH = 3  # a draft context evaluating more tokens than this in one sync is catching up (a new prompt, idling)
REVIEW_EVERY = 16  # rounds between re-checks of which sources could pay at all
# A source that came nowhere near paying (under QUIET_MARGIN of plain decoding's rate at its best length) is neither priced
# nor weighed for a probe again for a while, as long as it offers the same: its estimates move a few percent a round, and
# on a 2 ms model pricing 2 x 16 lengths and weighing a due probe every round took 85 us of a 2.2 ms round (Mamba-2
# stand-in, AMD EPYC). How long: enough rounds that deciding costs at most PRICING_SHARE of plain decoding's time (the
# engine's time for it measured), from one round on a model of tens of milliseconds to QUIET_MAX on a tiny one. Lookup's offer
# changes every round (its match), so it stays quiet whatever it offers, until its free evidence starts a streak (while
# the controller rests, below, no match is looked for: copying that starts then is noticed when the rest ends).
QUIET_MARGIN, PRICING_SHARE, QUIET_MAX = 0.9, 0.003, 32
# a new reply keeps this share of the last one's acceptance evidence: a sequence's next reply is often another
# conversation (a server's sequence serves any client), and a draft that was 95% right on code must not draft 12
# tokens at a time into prose for the ten rounds it takes that evidence to decay; costs carry over in full
NEW_REPLY_EVIDENCE = 0.25
# while a source is in sync and has shown too little to be sure it does not pay, it keeps drafting if an acceptance
# this many standard deviations above its estimate would pay: a draft model right 95% of the time on code reads as 85%
# after one early rejection (7 of 8 tokens), and dropped there it falls behind and is never worth its catch-up again
# (real pair, main model over RPC at 1 ms, Xeon AMX: quicksort 0.89x plain after a 1.4 s catch-up, fixed k=4 1.14x)
EXPLORE_SPREAD = 1.0
# ...until its recent evidence reaches this many tokens: then its estimate stands (MARGIN guards it). Exploring on
# past that kept a model right 87% of the time on prose drafting where 87% just breaks even: 0.85x plain, same setting
EXPLORE_EVIDENCE = 16.0
STALE_RATIO = 0.75  # a live time under this fraction of the probe's: the probe was timed on a busy machine
SPIKE = 1.3  # a verify time counts at most this many times the average so far (VerifyCost.add)
# A draft model stops drafting at a token it gives less than this probability (llama.cpp's --draft-p-min rule), so
# the controller's k is a most, not a must: where text gets hard the draft itself knows first. Real pair, Xeon AMX,
# 2 threads, adaptive: main model over RPC at 1 ms, pythagoras 0.82x plain without it, 1.09x with 0.75 (87 of 92
# drafts accepted); here, every bench prompt as fast or faster with it (quicksort 1.01x -> 1.03x plain)
DRAFT_P_MIN = 0.75
# ...but only while it pays: a quantized twin of the main model (the demo pair) is unsure where the main model is
# unsure too, and picks the same token there (fixed k=8 1.42x plain, adaptive with the stop always on 0.95x). What
# those unsure tokens would have got is checked against the main model's own tokens (Draft.unsure, Draft.withheld)
# and kept as evidence starting from a coin toss, decaying slowly (the pair's trait, not one reply's)
UNSURE_PRIOR, UNSURE_WEIGHT, UNSURE_DECAY = 0.5, 2.0, 0.97
# Until measured, a model's draft token is priced at a quarter of a main-model token: optimistic enough that
# each source is tried once, early, and then judged on what it really costs.
PRIOR_MODEL_COST = 0.25


@dataclass(frozen=True)
class SourceTraits:
    """What the controller must know of a draft source, carried by the source itself (ModelDrafter.traits,
    LookupDrafter.traits), as llama.cpp's common/speculative.cpp gives every draft source one small interface."""

    # a fully accepted draft leaves its last token to evaluate next round (a draft model's context)
    catches_up: bool = False
    streaky: bool = False  # acceptance runs in streaks (see SourceState)
    # costs nothing to ask: what it would have proposed is checked against the tokens that came (observe), so
    # its acceptance is known without ever spending a verify batch on a probe
    observed: bool = False
    prior_cost: float | None = None  # seconds per drafted token until measured; None: prior_share of a main token
    prior_share: float = PRIOR_MODEL_COST
    label: str = "draft model"  # in the controller's sentences


MODEL_TRAITS = SourceTraits(catches_up=True)
LOOKUP_TRAITS = SourceTraits(streaky=True, observed=True, prior_cost=0.0, label="prompt lookup")  # a dictionary probe: microseconds
# An MTP head is one decoder block and the output matrix: priced at a tenth of a main-model token until measured (a
# 24-layer model's block is ~4% of it; the vocabulary projection is the rest). It follows the main model's kept
# tokens the way a draft model does (catches_up), fed from the verify's hidden states.
MTP_TRAITS = SourceTraits(catches_up=True, prior_share=0.1, label="MTP head")


@dataclass
class VerifyCost:
    """Seconds to verify 1 + x tokens. Live measurements (smoothed per x) answer for themselves; sizes
    not yet seen in this session come from the probe's curve (measured once per machine, see probe.py),
    scaled by how live figures compare with it (a deep KV cache makes every batch a little dearer), and
    sizes between two known ones are interpolated: on a CPU the cost is far from a line (repacked
    kernels take rows in groups of 4). Without a probe, below the smallest measured x the prior shape
    1 + PRIOR_VERIFY_SLOPE * x is scaled through it; above the largest, the fitted slope continues."""

    samples: dict[int, float] = field(default_factory=dict)  # x -> seconds (EMA), this session
    prior: dict[int, float] = field(default_factory=dict)  # x -> seconds, from the probe
    # x -> how many samples in a row came in under STALE_RATIO of the prior (the engine re-times a stale probe)
    runs: dict[int, int] = field(default_factory=dict)
    # Kept up to date as samples come, not rebuilt: every plain round adds one, and a curve merged afresh for each
    # round that prices a draft was a cost of drafting on a 2 ms model
    _sizes: list[int] = field(default_factory=list)  # every size sampled or probed, in order
    _ratios: float = 0.0  # the sum of sample / prior over the sizes that have both (their mean is the scale)
    _both: int = 0  # how many sizes have both
    _fitted: float | None = None  # the slope above the largest size; None: to be fitted again

    def add(self, x: int, seconds: float) -> None:
        # the probe's figure, scaled as the curve scales it (at), is where the average starts: one slow first decode
        # (a worker waking up, a busy moment) must not stand alone for a size that drafting rounds then never measure
        # again (a slow first-token round made plain decoding look 4x dearer than it was for a whole reply); nor may a
        # first sample pull a size below what the curve said of it (the raw probe, on a machine now twice as slow)
        probed = self.prior.get(x)
        old = self.samples.get(x)
        raw = seconds
        base = old if old is not None else probed * self.scale if probed is not None else None
        if base is not None:
            # a hiccup (a decode that took 3-6x its time: the machine's, not the model's) moves the average a little,
            # a lasting slowdown a few percent a round: one 28 ms one-token decode among 4.5 ms ones made plain decoding
            # look 2.4x dearer, and a draft model right a third of the time drafted on at half of plain's speed, with no
            # plain round left to correct it (LFM2 stand-in, AMD EPYC)
            seconds = min(seconds, SPIKE * base)
        new = seconds if base is None else 0.7 * base + 0.3 * seconds
        if probed:
            self._ratios += (new - (old if old is not None else 0.0)) / probed
            self._both += old is None
        elif old is None:
            bisect.insort(self._sizes, x)
        self.samples[x] = new
        self._fitted = None
        self.runs[x] = self.runs.get(x, 0) + 1 if probed and raw < STALE_RATIO * probed else 0

    def set_prior(self, prior: dict[int, float]) -> None:
        self.prior, self.runs, self._fitted = prior, {}, None
        self._sizes = sorted(prior.keys() | self.samples.keys())
        both = [x for x in self.samples if prior.get(x)]
        self._ratios, self._both = sum(self.samples[x] / prior[x] for x in both), len(both)

    @property
    def scale(self) -> float:
        """Live figures / the probe's, where both exist: how much slower (or faster) than probed."""
        return self._ratios / self._both if self._both else 1.0

    def _known(self, x: int, scale: float) -> float:
        measured = self.samples.get(x)
        return measured if measured is not None else self.prior[x] * scale

    def at(self, x: int) -> float | None:
        measured = self.samples.get(x)
        if measured is not None:
            return measured
        sizes = self._sizes  # a bisection, not a scan: the controller asks for dozens of sizes every round
        if not sizes:
            return None
        scale = self.scale
        i = bisect.bisect_left(sizes, x)
        if i < len(sizes) and sizes[i] == x:
            return self.prior[x] * scale
        if 0 < i < len(sizes):
            lo, hi = sizes[i - 1], sizes[i]
            at_lo, at_hi = self._known(lo, scale), self._known(hi, scale)
            return at_lo + (at_hi - at_lo) * (x - lo) / (hi - lo)
        if i == 0:
            hi = sizes[0]
            return self._known(hi, scale) * (1 + PRIOR_VERIFY_SLOPE * x) / (1 + PRIOR_VERIFY_SLOPE * hi)
        lo = sizes[-1]
        if self._fitted is None:
            self._fitted = self._slope({size: self._known(size, scale) for size in sizes}, lo)
        return self._known(lo, scale) + self._fitted * (x - lo)

    @staticmethod
    def _slope(known: dict[int, float], lo: int) -> float:
        """Least-squares slope over the known sizes, to extrapolate upwards (the prior shape with one size)."""
        if len(known) < 2:
            return known[lo] / (1 + PRIOR_VERIFY_SLOPE * lo) * PRIOR_VERIFY_SLOPE
        xs, ys = list(known), list(known.values())
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        return max(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var, 0.0)


@dataclass
class Evidence:
    accepted: float = 0.0
    rejected: float = 0.0

    def acceptance(self, prior: float = PRIOR_ACCEPTANCE, weight: float = PRIOR_WEIGHT) -> float:
        return (self.accepted + prior * weight) / (self.accepted + self.rejected + weight)

    def plausible(self, prior: float = PRIOR_ACCEPTANCE, weight: float = PRIOR_WEIGHT) -> float:
        """An acceptance EXPLORE_SPREAD standard deviations above the estimate: the estimate is the mean of a
        Beta(accepted + prior weight, rejected + the rest of it) posterior (each drafted token accepted with
        probability a, given the ones before it were), whose spread narrows as evidence comes in."""
        mean = self.acceptance(prior, weight)
        n = self.accepted + self.rejected + weight
        return min(mean + EXPLORE_SPREAD * math.sqrt(mean * (1 - mean) / (n + 1)), 0.999)


@dataclass
class SourceState:
    """What a draft source has shown lately. For a streaky source, acceptance is kept apart for rounds
    that follow a fully accepted round of it: copying runs in streaks (a lookup that was right keeps
    being right until the text departs from its source), and one blended rate would undersell the
    streak. A draft model's acceptance hardly depends on its last round: one rate, all the evidence."""

    streaky: bool = False
    overall: Evidence = field(default_factory=Evidence)
    cold: Evidence = field(default_factory=Evidence)  # cold and streak: streaky sources only
    streak: Evidence = field(default_factory=Evidence)
    in_streak: bool = False
    # seconds per draft-model evaluation (or per proposed lookup token), EMA
    unit_cost: float | None = None
    # seconds per token when a draft model catches up on many tokens in one batch (a new prompt), EMA
    catch_up_cost: float | None = None
    # the probe's figures for both (probe.py), used until measured live, scaled as verify costs are
    probed_cost: float | None = None
    probed_catch_up: float | None = None
    # the draft model's tokens under --draft-p-min: would they have been accepted (DraftController.stop_unsure)
    unsure: Evidence = field(default_factory=Evidence)
    rounds_since_used: int = PROBE_EVERY  # an untried source is probed at once, while probing is cheap
    # a probe is dear for a draft model that sat idle: its context first catches up on every token it missed
    probe_interval: int = PROBE_EVERY

    @property
    def evidence(self) -> Evidence:
        return self.streak if self.in_streak else self.cold

    @property
    def acceptance(self) -> float:
        if not self.streaky:
            return self.overall.acceptance()
        # both estimates start from the source's overall rate, not from the blind prior: a lookup right
        # 95% of the time must not look like a coin toss on the first round after a rejection
        overall = self.overall.acceptance(OBSERVED_PRIOR, OBSERVED_WEIGHT)
        return self.evidence.acceptance(prior=overall)


@dataclass(frozen=True)
class Batch:
    """What else a round will carry (its last one's): other sequences verifying."""

    sequences: int


# Why a round drafted what it did, as a code with its figures (Decision): front-ends word it themselves.
PAYS = "pays"  # drafting is expected to beat plain decoding (acceptance, speedup)
PLAIN = "plain"  # no draft length was expected to beat plain decoding (rate: plain tok/s)
UNMEASURED = "unmeasured"  # plain: nothing measured yet
PROBE = "probe"  # a source left unused for a while is tried again (acceptance lately, speedup at best)
# a source that may still pay keeps drafting, k chosen to lose least if it does not (acceptance so far, plausible
# acceptance, speedup at that)
EXPLORE = "explore"
FIRST_TOKEN = "first-token"  # the first token is always plain
FIXED = "fixed"  # adaptive off: the draft model drafts k
FIXED_LOOKUP = "fixed-lookup"  # adaptive off, no draft model: lookup matched k tokens
NO_MATCH = "no-match"  # adaptive off, no draft model: lookup matched nothing
NO_SOURCE = "no-source"  # no draft source (or none allowed this round)
NEAR_END = "near-end"  # fewer tokens left to draft (left) than draft-min
OFF = "off"  # drafting is off here (detail: the engine's sentence, e.g. --exact's)


@dataclass(frozen=True)
class Decision:
    """A round's draft source and length, and why (a code above with the figures behind it)."""

    source: str  # "none", "model", "mtp" or "lookup"
    k: int
    why: str = PLAIN
    acceptance: float = 0.0
    speedup: float = 0.0  # predicted rate / plain decoding's
    plausible: float = 0.0  # EXPLORE: the acceptance its speedup assumes
    rate: float = 0.0  # plain decoding's predicted tok/s
    left: int = 0
    draft_min: int = 0
    detail: str = ""

    @property
    def reason(self) -> str:
        """The engine's own terse words for it (--json, logs, the debug pane's "engine:" line)."""
        # one sentence formatted, not all of them: this runs every round
        word = _REASONS.get(self.why)
        return word(self) if word is not None else self.detail


_REASONS = {
    PAYS: lambda d: f"expects {d.acceptance:.0%} accepted: {d.speedup:.2f}x plain",
    PLAIN: lambda d: f"plain {d.rate:.0f} tok/s",
    UNMEASURED: lambda d: "plain (nothing measured yet)",
    PROBE: lambda d: f"probe: {d.acceptance:.0%} accepted lately, at best {d.speedup:.2f}x plain",
    EXPLORE: lambda d: f"explore: {d.acceptance:.0%} accepted so far, {d.plausible:.0%} would be {d.speedup:.2f}x plain",
    FIRST_TOKEN: lambda d: "first token: plain decoding",
    FIXED: lambda d: f"fixed k={d.k}",
    FIXED_LOOKUP: lambda d: f"fixed, lookup match of {d.k}",
    NO_MATCH: lambda d: "no lookup match",
    NO_SOURCE: lambda d: "no drafting",
    NEAR_END: lambda d: f"at most {d.left} tokens left to draft, under draft-min {d.draft_min}",
}


@dataclass
class DraftController:
    draft_min: int
    draft_max: int
    sources: dict[str, SourceState] = field(default_factory=dict)
    verify_cost: VerifyCost = field(default_factory=VerifyCost)
    # sources that cannot beat plain decoding on this machine even if every drafted token were accepted:
    # never drafted, never probed (a draft model is then never even fed the prompt). Source -> why.
    closed: dict[str, str] = field(default_factory=dict)
    # each source's traits, by name (the engine passes its sources': these two, and "mtp" with an MTP head)
    traits: dict[str, SourceTraits] = field(default_factory=lambda: {"model": MODEL_TRAITS, "lookup": LOOKUP_TRAITS})
    # A recurrent main model that stepped back through a snapshot (llama.cpp's pending rollback index) reads its state
    # from the snapshot plane in its next decode, which costs more: on the LFM2 stand-in (AMD EPYC, 2 threads) a
    # one-token round after a rejected draft took 5.4-5.7 ms against 4.8 after a plain one. Measured as the excess of
    # such rounds over the verify curve (seconds, EMA), kept out of the curve (plain decoding is not dearer for it)
    # and charged to each drafting round by its chance of a rejection.
    rollback_cost: float = 0.0
    _rounds: int = 0
    _rollbacks: int = 0
    # source -> (until which round, what it offered, the batch): not priced meanwhile (QUIET_MARGIN)
    _quiet: dict[str, tuple[int, int, Batch | None]] = field(default_factory=dict)
    # seconds the engine took to decide a round that drafted nothing, when not resting (EMA; its lookup match, the
    # weighing): what a quiet or resting round saves
    _pricing: float = 0.0
    # Resting: the last weighing chose plain decoding and every source offering was quiet (lookup in no streak). Until
    # the first of them wakes (and while the batch stays the same), a round asks no lookup match and weighs nothing, and
    # record keeps only its verify time. Right after a decode the
    # Python that runs is slow (its code and data evicted: a 5 us dictionary fill took 15 right after a 2 ms decode),
    # so every line a round skips counts: on the Mamba-2 stand-in (AMD EPYC) a round's lookup match, weighing and
    # bookkeeping took 40-50 us of a 2.5 ms token. The per-round bookkeeping skipped is done at once after (_wake).
    _rest: tuple[int, int, Batch | None, Decision] | None = None  # (from which round, until which, the batch, the decision)
    _rested: int = 0  # rounds rested whose bookkeeping _wake has still to do

    def new_reply(self) -> None:
        """A reply starts on this controller's sequence: what was seen of the last one's text counts less."""
        self._wake()
        self._rest = None
        self._quiet.clear()
        for state in self.sources.values():
            for evidence in (state.overall, state.cold, state.streak):
                evidence.accepted *= NEW_REPLY_EVIDENCE
                evidence.rejected *= NEW_REPLY_EVIDENCE
            state.in_streak = False

    def verify_time(self, n: int) -> float | None:
        """Seconds to verify a batch of n tokens, measured or interpolated (None before any measurement)."""
        return self.verify_cost.at(n - 1)

    def expected_rate(
        self, source: str, k: int, acceptance: float | None = None, behind: int = 0, horizon: int = CATCH_UP_HORIZON,
        batch: Batch | None = None,
    ) -> float:  # fmt: skip
        """Predicted tokens per second of a round; `behind`: tokens a draft model must evaluate before it
        can draft, beyond a round's usual one or two (a new prompt, or it sat idle while other sources
        drafted), paid back over the next `horizon` tokens.

        `batch`: other sequences share the round. Its rate is then the batch's, as if every sequence verifying
        drafted like this one: n sequences make n(1 + accepted) tokens for n drafts and one decode of
        n(1 + k) tokens, against n tokens for a decode of n. So drafting
        shrinks as load makes the batch compute-bound (a CPU) and stays where a wider batch is nearly free (a
        GPU). (Priced one sequence at a time against the others' actual drafts, each would find its own draft
        cheap beside theirs, and all would draft where none should.)"""
        if k == 0:
            n = 1 + batch.sequences if batch else 1
            return n / (self.verify_time(n) or 1.0 + PRIOR_VERIFY_SLOPE * (n - 1))
        return self.rates(source, range(k, k + 1), acceptance, behind, horizon, batch)[0]

    def rates(
        self, source: str, ks: range, acceptance: float | None = None, behind: int = 0, horizon: int = CATCH_UP_HORIZON,
        batch: Batch | None = None,
    ) -> list[float]:  # fmt: skip
        """expected_rate for every k in `ks` (all > 0), the terms that do not depend on k worked out once: the
        controller prices up to 2 x 16 lengths a round, and on a 2 ms model its Python is a cost of drafting."""
        n = 1 + batch.sequences if batch else 1
        one = self.verify_time(n) or 1.0 + PRIOR_VERIFY_SLOPE * (n - 1)
        state = self.sources[source]
        a = min(state.acceptance if acceptance is None else acceptance, 0.999)
        unit = n * self.unit_cost(source)
        catches_up = self.traits[source].catches_up
        rollback = n * self.rollback_cost  # a rejection's rollback, paid in the next round's decode
        # the catch-up is paid once, then the model drafts for a while: each round is charged its share
        lag = self.catch_up_cost(source) * behind / max(horizon, 1) if behind else 0.0
        verify_at = self.verify_cost.at
        out = []
        for k in ks:
            ak = a**k
            accepted = a * (1 - ak) / (1 - a)
            cost = unit * (k + ak if catches_up else k) + (1 - ak) * rollback + lag * (accepted + 1.0)
            verify = verify_at(n * (k + 1) - 1) or one * (1 + PRIOR_VERIFY_SLOPE * n * k)
            out.append(n * (accepted + 1.0) / (cost + verify))
        return out

    def unit_cost(self, source: str) -> float:
        """Seconds per draft evaluation: measured live, else probed (scaled like verify costs), else a prior."""
        state = self.sources[source]
        if state.unit_cost is not None:
            return state.unit_cost
        if state.probed_cost is not None:
            return state.probed_cost * self.verify_cost.scale
        prior = self.traits[source].prior_cost
        return prior if prior is not None else self.traits[source].prior_share * (self.verify_time(1) or 1.0)

    def catch_up_cost(self, source: str) -> float:
        state = self.sources[source]
        if state.catch_up_cost is not None:
            return state.catch_up_cost
        if state.probed_catch_up is not None:
            return state.probed_catch_up * self.verify_cost.scale
        return self.unit_cost(source)

    def state(self, source: str) -> SourceState:
        if source not in self.sources:
            self.sources[source] = SourceState(streaky=self.traits[source].streaky)
        return self.sources[source]

    def seed(
        self, verify_seconds: dict[int, float], draft_token_seconds: float | None = None, catch_up_seconds: float | None = None
    ) -> None:
        """Start from the probe's figures for this machine (probe.py) instead of blind priors (a verify curve
        shared with other controllers keeps what it has learned when it already starts from them)."""
        prior = {n - 1: s for n, s in verify_seconds.items()}
        if self.verify_cost.prior != prior:
            self.verify_cost.set_prior(prior)
        if draft_token_seconds is not None:
            model = self.state("model")
            model.probed_cost, model.probed_catch_up = draft_token_seconds, catch_up_seconds

    def best_case(self, source: str) -> tuple[float, int]:
        """The best speedup over plain decoding `source` could give if every drafted token were accepted,
        and the draft length that gives it: an upper bound on what drafting can ever gain here."""
        self.state(source)
        plain = self.expected_rate("none", 0)
        lo = max(1, self.draft_min)
        ks = range(lo, max(lo, self.draft_max) + 1)
        rates = dict(zip(ks, self.rates(source, ks, acceptance=1.0), strict=True))
        k = max(rates, key=rates.__getitem__)
        return rates[k] / plain, k

    def review(self, sources: list[str]) -> None:
        """Close the sources that cannot pay on this machine, with the figures that say so; reopen those that can
        (the figures are live: a machine that got less busy, a measured verify curve that turned out cheaper)."""
        self._quiet.clear()
        for source in sources:
            gain, k = self.best_case(source)
            if gain >= MARGIN:
                self.closed.pop(source, None)
                continue
            one = self.verify_time(1) or 1.0
            verify = (self.verify_time(k + 1) or one) / one
            unit = self.unit_cost(source) / one
            self.closed[source] = (
                f"{self.traits[source].label} off: verifying {k + 1} tokens costs {verify:.1f}x one"
                + (f", a draft token {unit:.2f}x" if self.traits[source].prior_cost is None else "")
                + f"; even if every drafted token were accepted it would run at best {gain:.2f}x plain decoding"
            )

    def decide(
        self, available: dict[str, int], behind: dict[str, int] | None = None, horizon: int = CATCH_UP_HORIZON,
        batch: Batch | None = None,
    ) -> Decision:  # fmt: skip
        """`available`: source -> most tokens it can propose now (a lookup match may be short);
        `behind`: source -> tokens it must catch up on first (see expected_rate); `horizon`: tokens left
        to pay a catch-up back (never more than what is left of the reply); `batch`: what other sequences are
        expected to put in the same main-model decode (their last round's)."""
        self._wake()
        self._rest = None  # asked to decide: not resting (or no longer)
        plain = self.expected_rate("none", 0, batch=batch)
        measured = self.verify_time(1) is not None
        best = Decision("none", 0, PLAIN, rate=plain) if measured else Decision("none", 0, UNMEASURED)
        available = {s: n for s, n in available.items() if s not in self.closed}
        quiet = {s for s, n in available.items() if self._is_quiet(s, n, batch)}
        if len(quiet) == len(available):  # the common round on a model where drafting does not pay: nothing to weigh
            return self._settle(best, available, batch)
        decision, hopeless = self._weigh(available, quiet, behind or {}, min(horizon, CATCH_UP_HORIZON), batch, plain, best)
        until = self._rounds + self._quiet_rounds()
        for source in hopeless:
            self._quiet[source] = (until, available[source], batch)
        return self._settle(decision, available, batch)

    def _settle(self, decision: Decision, available: dict[str, int], batch: Batch | None) -> Decision:
        """Rest (_rest) after `decision` when it is plain decoding and every source offering is quiet."""
        if decision.source != "none" or any(state.in_streak for state in self.sources.values()):
            return decision
        if not available:  # nothing offered (lookup found no match, no model to draft with): rest as a quiet source would
            self._rest = (self._rounds, self._rounds + self._quiet_rounds(), batch, decision)
        elif all(self._is_quiet(source, offered, batch) for source, offered in available.items()):
            self._rest = (self._rounds, min(self._quiet[source][0] for source in available), batch, decision)
        return decision

    def resting(self, batch: Batch | None) -> Decision | None:
        """This round's decision while resting (plain decoding: nothing to match or weigh), else None."""
        rest = self._rest
        return rest[3] if rest is not None and self._rounds < rest[1] and rest[2] == batch else None

    def _wake(self) -> None:
        """The per-round bookkeeping of the rounds rested (record's), done at once."""
        n, self._rested = self._rested, 0
        if n:
            self._age(n)

    def _age(self, n: int, used: str = "none") -> None:
        """The last n rounds (already counted in _rounds) passed, `used` drafting in them: evidence decays, the other
        sources wait longer, streaks of theirs end; the closed sources are reviewed every REVIEW_EVERY rounds."""
        factor = DECAY**n
        for source, state in self.sources.items():
            for evidence in (state.overall, state.cold, state.streak):
                evidence.accepted *= factor
                evidence.rejected *= factor
            if source != used:
                state.rounds_since_used += n
                state.in_streak = False  # the streak is about consecutive rounds of this source
        if self.closed and self._rounds // REVIEW_EVERY != (self._rounds - n) // REVIEW_EVERY:
            self.review(list(self.closed))

    def _weigh(
        self, available: dict[str, int], quiet: set[str], behind: dict[str, int], horizon: int, batch: Batch | None,
        plain: float, best: Decision,
    ) -> tuple[Decision, list[str]]:  # fmt: skip
        """decide's pricing, probes and exploration over the sources not quiet; and the sources that came nowhere near
        paying (to be quiet for a while)."""
        best_rate = plain
        priced: dict[str, float] = {}  # each source priced this round: its best rate
        for source, limit in available.items():
            state = self.state(source)
            lo, hi = max(1, self.draft_min), min(self.draft_max, limit)
            if source in quiet or hi < lo:
                continue
            ks = range(lo, hi + 1)
            rates = self.rates(source, ks, behind=behind.get(source, 0), horizon=horizon, batch=batch)
            priced[source] = max(rates)
            for k, rate in zip(ks, rates, strict=True):
                if rate > best_rate * (MARGIN if best.source == "none" else 1.001):
                    best_rate = rate
                    best = Decision(source, k, PAYS, acceptance=state.acceptance, speedup=rate / plain)
        # a source left unused for a while gets a probe round when even near-perfect acceptance would make
        # it clearly better than this round's choice: prose can turn into code, text into copying
        for source, limit in available.items():
            state = self.sources[source]
            if source == best.source or self.traits[source].observed or limit < max(1, self.draft_min):
                continue
            if state.rounds_since_used < state.probe_interval or source in quiet:  # (a quiet one waits a few rounds more)
                continue
            if self.traits[source].catches_up:  # a first probe is longer: it decides whether drafting starts early in a reply
                k = min(max(FIRST_PROBE if state.unit_cost is None else 2, self.draft_min), limit, self.draft_max)
            else:  # free drafts: a fully accepted probe of 4 is evidence enough to switch, a failed one costs little
                k = min(limit, self.draft_max, max(FIRST_PROBE, self.draft_min))
            # a source too dear even at near-perfect acceptance (its catch-up included) is not worth a probe
            lag = behind.get(source, 0)
            if batch is not None and lag > CATCH_UP_BATCH:
                continue  # nor is a catch-up in a shared round: every sequence would wait for it (probed when alone)
            # a first probe is optimistic (nothing is known); a repeat probe that must first catch up is a bet on
            # what the source has shown here: at its acceptance so far it must pay for that catch-up (a model that
            # drafts 70% right where only 90% would pay loses a whole catch-up to every optimistic re-probe)
            hope = state.acceptance if lag > CATCH_UP_BATCH and state.unit_cost is not None else OPTIMISTIC_ACCEPTANCE
            ceiling = max(self.rates(source, range(k, max(k, min(self.draft_max, limit)) + 1), hope, lag, horizon, batch))
            if ceiling > best_rate * PROBE_GAIN:
                state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
                return Decision(source, k, PROBE, acceptance=state.acceptance, speedup=ceiling / plain), []
        if best.source != "none":
            self.sources[best.source].probe_interval = PROBE_EVERY  # it wins on merit: probe it promptly again
            return best, []
        explored = self._explore({s: n for s, n in available.items() if s not in quiet}, behind, batch, plain)
        hopeless = [source for source, top in priced.items() if top < plain * QUIET_MARGIN
                    and (explored is None or explored.source != source)]  # fmt: skip
        return explored or best, hopeless

    def _quiet_rounds(self) -> int:
        """How many rounds a source that came nowhere near paying stays quiet (or the controller rests): deciding costs
        at most PRICING_SHARE of plain decoding's time."""
        one = self.verify_time(1)
        if not one or not self._pricing:
            return 1
        return max(1, min(QUIET_MAX, math.ceil(self._pricing / (PRICING_SHARE * one))))

    def _is_quiet(self, source: str, offered: int, batch: Batch | None) -> bool:
        until = self._quiet.get(source)
        if until is None or self._rounds >= until[0] or until[2] != batch:
            return False
        if self.traits[source].observed:  # its offer changes every round (a lookup match's length); a streak wakes it
            return not self.sources[source].in_streak
        return until[1] == offered

    def _explore(self, available: dict[str, int], behind: dict[str, int], batch: Batch | None, plain: float) -> Decision | None:
        """A source in sync (nothing to catch up on) whose estimate says plain on thin evidence, but whose plausible
        acceptance says it would pay, drafts on: at the length that loses least at its estimate, so a source that truly does
        not pay costs little while its evidence grows. Observed sources gather evidence for free; untried ones are
        probed."""
        for source, limit in available.items():
            state = self.sources[source]
            traits = self.traits[source]  # (streaky sources keep their estimates apart; the one there is, lookup, is observed)
            if traits.observed or traits.streaky or state.unit_cost is None or behind.get(source, 0) > CATCH_UP_BATCH:
                continue
            if state.overall.accepted + state.overall.rejected >= EXPLORE_EVIDENCE:
                continue
            lo, hi = max(1, self.draft_min), min(self.draft_max, limit)
            if hi < lo:
                continue
            hope = state.overall.plausible()
            ks = range(lo, hi + 1)
            ceiling = max(self.rates(source, ks, hope, batch=batch))
            if ceiling > plain * MARGIN:
                estimated = self.rates(source, ks, batch=batch)
                k = ks[estimated.index(max(estimated))]
                return Decision(source, k, EXPLORE, acceptance=state.acceptance, speedup=ceiling / plain, plausible=hope)
        return None

    def stop_unsure(self, k: int) -> bool:
        """Whether the draft model's unsure tokens (top probability under --draft-p-min) end its draft this round:
        yes while such tokens are accepted too rarely to pay for sending one (a draft evaluation, a wider verify
        and, when it is rejected, the drafts after it, against a main-model token saved)."""
        one = self.verify_time(1)
        if one is None:
            return True
        k = max(k, 1)
        unit = self.unit_cost("model")
        wider = ((self.verify_time(k + 1) or one) - one) / k  # a verify's cost per extra token, at this width
        acceptance = self.state("model").unsure.acceptance(UNSURE_PRIOR, UNSURE_WEIGHT)
        # a rejected unsure token also wastes the drafts after it: about half the round's length on average
        wasted = (1 - acceptance) * unit * (k - 1) / 2
        return acceptance * one < unit + wider + wasted

    def observe_unsure(self, accepted: bool) -> None:
        """One unsure draft token judged against the main model's own token at its place."""
        self._wake()
        evidence = self.state("model").unsure
        evidence.accepted = evidence.accepted * UNSURE_DECAY + accepted
        evidence.rejected = evidence.rejected * UNSURE_DECAY + (not accepted)

    def observe(self, source: str, n_matched: int, n_checked: int) -> None:
        """Free evidence for an observed source (SourceTraits.observed): of the n_checked tokens that came after it was asked (and not
        used), its proposal had the first n_matched right."""
        self._wake()
        state = self.state(source)
        for evidence in (state.overall, state.evidence) if state.streaky else (state.overall,):
            evidence.accepted += n_matched
            evidence.rejected += 1.0 if n_matched < n_checked else 0.0
        state.in_streak = state.streaky and n_matched == n_checked

    def record(
        self,
        decision: Decision,
        n_drafted: int,
        n_accepted: int,
        draft_seconds: float,
        verify_seconds: float | None,  # None: verified in a batch shared with other sequences (not this round's cost)
        draft_work: int | None = None,  # draft-model evaluations this round (catch-up included); default k
        catch_up: tuple[int, float] | None = None,  # (tokens, seconds) of a batched catch-up inside draft_seconds
        after_rollback: bool = False,  # the decode before this round's was stepped back through a snapshot
    ) -> None:
        rest = self._rest  # (the round that decided to rest is recorded in full: it measured what deciding costs)
        if rest is not None and decision is rest[3] and self._rounds > rest[0] and not after_rollback:  # a round rested
            if verify_seconds is not None:
                self.verify_cost.add(0, verify_seconds)
            self._rounds += 1
            self._rested += 1
            return
        self._wake()
        if decision.why in (PLAIN, UNMEASURED):  # decided by decide: the engine's time for it is deciding's cost
            # (a one-off inside it, a hiccup, counts at most SPIKE times the average: it must not rest a real model)
            sample = min(draft_seconds, SPIKE * self._pricing) if self._pricing else draft_seconds
            self._pricing = sample if not self._pricing else 0.8 * self._pricing + 0.2 * sample
        if verify_seconds is not None and after_rollback:
            expected = self.verify_cost.at(n_drafted)
            if expected is not None:
                excess = max(verify_seconds - expected, 0.0)
                self.rollback_cost = excess if not self._rollbacks else 0.7 * self.rollback_cost + 0.3 * excess
                self._rollbacks += 1
        elif verify_seconds is not None:
            self.verify_cost.add(n_drafted, verify_seconds)
        self._rounds += 1
        self._age(1, decision.source)
        if decision.source == "none" or decision.k == 0:
            return
        self._quiet.pop(decision.source, None)  # it drafted: its figures moved
        state = self.sources[decision.source]
        state.rounds_since_used = 0
        for evidence in (state.overall, state.evidence) if state.streaky else (state.overall,):
            evidence.accepted += n_accepted
            evidence.rejected += 1.0 if n_accepted < n_drafted else 0.0
        state.in_streak = state.streaky and n_drafted > 0 and n_accepted == n_drafted
        work = draft_work if draft_work is not None else decision.k
        if catch_up is not None and catch_up[0] > CATCH_UP_BATCH:  # priced apart: a batch costs far less per token
            tokens, seconds = catch_up
            per_token = seconds / tokens
            state.catch_up_cost = per_token if state.catch_up_cost is None else 0.7 * state.catch_up_cost + 0.3 * per_token
            draft_seconds, work = draft_seconds - seconds, work - tokens
            if work <= 0:
                return
        per_unit = draft_seconds / max(work, 1)
        state.unit_cost = per_unit if state.unit_cost is None else 0.7 * state.unit_cost + 0.3 * per_unit
