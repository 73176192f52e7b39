"""Adaptive draft length: pick, each round, the k that maximises expected tokens per second.

Model (per draft source): each drafted token is accepted with probability a, given the ones
before it were, so k drafts yield a(1 - a^k)/(1 - a) accepted tokens plus the main model's own.
A round costs k * draft_cost + verify(k + 1). Verifying is not free on a CPU (on this machine 9
tokens cost 2.3x to 4.2x one token, depending on the build), so verify time is measured per batch
size and fitted with a line. Plain decoding (k = 0) is always a candidate: when nothing beats it the
controller drafts nothing, and probes again every few rounds so it notices when acceptance returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.9  # per-round decay of acceptance evidence: about the last 10-20 rounds count
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.5, 3.0
MARGIN = 1.05  # drafting must be predicted this much faster than plain: noise in the estimates must not make us slower
OPTIMISTIC_ACCEPTANCE = 0.98  # a probe is made only if even this acceptance would pay at the measured draft cost...
PROBE_GAIN = 1.15  # ...by this much: a probe of an idle draft model costs its catch-up, so a marginal one loses
PRIOR_VERIFY_SLOPE = 0.3  # extra verify cost per extra token, as a fraction of one token, until measured
PROBE_EVERY = 8  # rounds without a source before it is probed; doubles after each probe that does not win
MAX_PROBE_INTERVAL = 256


# a lookup draft is a dictionary probe: microseconds. Until measured, a model's draft token is priced
# at a quarter of a main-model token: optimistic enough that each source is tried once, early, and then
# judged on what it really costs.
PRIOR_DRAFT_COST = {"lookup": 0.0}
PRIOR_MODEL_COST = 0.25


@dataclass
class Evidence:
    accepted: float = 0.0
    rejected: float = 0.0

    @property
    def acceptance(self) -> float:
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.accepted + self.rejected + PRIOR_WEIGHT)


@dataclass
class SourceState:
    """What a draft source has shown lately. Acceptance is kept apart for rounds that follow a fully
    accepted round of the same source: copying runs in streaks (a lookup that was right keeps being
    right until the text departs from its source), and one blended rate would undersell the streak."""

    cold: Evidence = field(default_factory=Evidence)
    streak: Evidence = field(default_factory=Evidence)
    in_streak: bool = False
    draft_cost: float | None = None  # seconds per drafted token (EMA)
    rounds_since_used: int = PROBE_EVERY  # an untried source is probed at once, while probing is cheap
    # a probe is dear for a draft model that sat idle: its context first catches up on every token it missed
    probe_interval: int = PROBE_EVERY

    @property
    def evidence(self) -> Evidence:
        return self.streak if self.in_streak else self.cold

    @property
    def acceptance(self) -> float:
        return self.evidence.acceptance


@dataclass(frozen=True)
class Decision:
    source: str  # "none", "model" or "lookup"
    k: int
    reason: str


@dataclass
class DraftController:
    draft_min: int
    draft_max: int
    sources: dict[str, SourceState] = field(default_factory=dict)
    verify_times: dict[int, float] = field(default_factory=dict)  # batch size -> seconds (EMA)

    # the fitted verify-cost line: seconds for one token and per extra token; refitted only when
    # a measurement arrives (record), not on each of decide's ~30 rate evaluations per round
    _verify_one: float | None = None
    _verify_slope: float = 0.0

    def verify_time(self, n: int) -> float | None:
        """Fitted seconds to verify a batch of n tokens (None before any measurement)."""
        if self._verify_one is None:
            return None
        return max(self._verify_one + self._verify_slope * (n - 1), 1e-6)

    def _refit(self) -> None:
        points = sorted(self.verify_times.items())
        if len(points) == 1:  # one batch size seen: assume the prior slope through it
            (m, t), = points
            self._verify_one = t / (1 + PRIOR_VERIFY_SLOPE * (m - 1))
            self._verify_slope = self._verify_one * PRIOR_VERIFY_SLOPE
            return
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = max(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var, 0.0)
        self._verify_slope = slope
        self._verify_one = mean_y - slope * (mean_x - 1)

    def expected_rate(self, source: str, k: int, acceptance: float | None = None) -> float:
        one = self.verify_time(1) or 1.0
        if k == 0:
            return 1.0 / one
        state = self.sources[source]
        a = min(state.acceptance if acceptance is None else acceptance, 0.999)
        accepted = a * (1 - a**k) / (1 - a)
        prior = PRIOR_DRAFT_COST.get(source, PRIOR_MODEL_COST * one)
        cost = (state.draft_cost if state.draft_cost is not None else prior) * k
        return (accepted + 1.0) / (cost + (self.verify_time(k + 1) or one * (1 + PRIOR_VERIFY_SLOPE * k)))

    def decide(self, available: dict[str, int]) -> Decision:
        """`available`: source -> most tokens it can propose now (a lookup match may be short)."""
        plain = self.expected_rate("none", 0)
        best = Decision("none", 0, f"plain {plain:.0f} tok/s")
        best_rate = plain
        for source, limit in available.items():
            state = self.sources.setdefault(source, SourceState())
            lo, hi = max(1, self.draft_min), min(self.draft_max, limit)
            for k in range(lo, hi + 1):
                rate = self.expected_rate(source, k)
                if rate > best_rate * (MARGIN if best.source == "none" else 1.001):
                    best_rate = rate
                    best = Decision(source, k, f"a={state.acceptance:.2f} predicts {rate:.0f} vs plain {plain:.0f} tok/s")
        if best.source == "none":
            for source, limit in available.items():
                state = self.sources[source]
                k = min(max(2, self.draft_min), limit)
                if state.rounds_since_used < state.probe_interval or limit < max(1, self.draft_min):
                    continue
                # the measured draft cost includes catching up after idling: a source too dear even at
                # near-perfect acceptance is not worth a probe
                ceiling = max(self.expected_rate(source, j, OPTIMISTIC_ACCEPTANCE) for j in range(k, min(self.draft_max, limit) + 1))
                if ceiling > plain * PROBE_GAIN:
                    state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
                    return Decision(source, k, f"probe (a={state.acceptance:.2f}, at best {ceiling:.0f} tok/s)")
        else:
            self.sources[best.source].probe_interval = PROBE_EVERY  # it wins on merit: probe it promptly again
        return best

    def record(self, decision: Decision, n_drafted: int, n_accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        batch = n_drafted + 1
        old = self.verify_times.get(batch)
        self.verify_times[batch] = verify_seconds if old is None else 0.7 * old + 0.3 * verify_seconds
        self._refit()
        for source, state in self.sources.items():
            for evidence in (state.cold, state.streak):
                evidence.accepted *= DECAY
                evidence.rejected *= DECAY
            if source != decision.source:
                state.rounds_since_used += 1
                state.in_streak = False  # the streak is about consecutive rounds of this source
        if decision.source == "none" or decision.k == 0:
            return
        state = self.sources[decision.source]
        state.rounds_since_used = 0
        evidence = state.evidence
        evidence.accepted += n_accepted
        evidence.rejected += 1.0 if n_accepted < n_drafted else 0.0
        state.in_streak = n_drafted > 0 and n_accepted == n_drafted
        per_token = draft_seconds / decision.k
        state.draft_cost = per_token if state.draft_cost is None else 0.7 * state.draft_cost + 0.3 * per_token
