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
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.6, 2.0
PRIOR_VERIFY_SLOPE = 0.3  # extra verify cost per extra token, as a fraction of one token, until measured
PROBE_EVERY = 8  # rounds without a source before it is probed; doubles after each probe that does not win
MAX_PROBE_INTERVAL = 256


@dataclass
class SourceState:
    accepted: float = 0.0
    rejected: float = 0.0
    draft_cost: float | None = None  # seconds per drafted token (EMA)
    rounds_since_used: int = 0
    # a probe is dear for a draft model that sat idle: its context first catches up on every token it missed
    probe_interval: int = PROBE_EVERY

    @property
    def acceptance(self) -> float:
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.accepted + self.rejected + PRIOR_WEIGHT)


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

    def verify_time(self, n: int) -> float | None:
        """Fitted seconds to verify a batch of n tokens (None before any measurement)."""
        points = sorted(self.verify_times.items())
        if not points:
            return None
        if len(points) == 1:
            (m, t), = points
            one = t / (1 + PRIOR_VERIFY_SLOPE * (m - 1))
            return one * (1 + PRIOR_VERIFY_SLOPE * (n - 1))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        return max(mean_y + max(slope, 0.0) * (n - mean_x), 1e-6)

    def expected_rate(self, source: str, k: int) -> float:
        one = self.verify_time(1) or 1.0
        if k == 0:
            return 1.0 / one
        state = self.sources[source]
        a = min(state.acceptance, 0.999)
        accepted = a * (1 - a**k) / (1 - a)
        cost = (state.draft_cost if state.draft_cost is not None else 0.5 * one) * k
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
                if rate > best_rate * 1.001:
                    best_rate = rate
                    best = Decision(source, k, f"a={state.acceptance:.2f} predicts {rate:.0f} vs plain {plain:.0f} tok/s")
        if best.source == "none":
            for source, limit in available.items():
                state = self.sources[source]
                if state.rounds_since_used >= state.probe_interval and limit >= max(1, self.draft_min):
                    state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
                    return Decision(source, min(max(2, self.draft_min), limit), f"probe (a={state.acceptance:.2f})")
        else:
            self.sources[best.source].probe_interval = PROBE_EVERY  # it wins on merit: probe it promptly again
        return best

    def record(self, decision: Decision, n_drafted: int, n_accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        batch = n_drafted + 1
        old = self.verify_times.get(batch)
        self.verify_times[batch] = verify_seconds if old is None else 0.7 * old + 0.3 * verify_seconds
        for source, state in self.sources.items():
            state.accepted *= DECAY
            state.rejected *= DECAY
            state.rounds_since_used = 0 if source == decision.source else state.rounds_since_used + 1
        if decision.source == "none" or decision.k == 0:
            return
        state = self.sources[decision.source]
        state.accepted += n_accepted
        state.rejected += 1.0 if n_accepted < n_drafted else 0.0
        per_token = draft_seconds / decision.k
        state.draft_cost = per_token if state.draft_cost is None else 0.7 * state.draft_cost + 0.3 * per_token
