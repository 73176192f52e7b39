"""Turning logits into tokens, for both models alike, and the exact speculative-sampling rule.

Distributions are sparse: after top-k only k candidates remain, so p and q are (ids, probs) pairs
of at most k entries and the accept/residual arithmetic never touches a vocab-sized array.
Greedy decoding skips all of this: an argmax over llama.cpp's logits view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerSettings:
    """The same settings shape the main model's p and the draft's q (required for exactness)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Distribution:
    """A normalised distribution over `ids` (sorted ascending) with probabilities `probs`."""

    ids: np.ndarray
    probs: np.ndarray

    def prob(self, token: int) -> float:
        i = int(np.searchsorted(self.ids, token))
        return float(self.probs[i]) if i < len(self.ids) and self.ids[i] == token else 0.0

    def probs_of(self, tokens: np.ndarray) -> np.ndarray:
        idx = np.minimum(np.searchsorted(self.ids, tokens), len(self.ids) - 1)
        return np.where(self.ids[idx] == tokens, self.probs[idx], 0.0)

    def max_prob(self) -> float:
        return float(self.probs.max())

    def sample(self, rng: np.random.Generator) -> int:
        return _sample(self.ids, self.probs, rng)


def _sample(ids: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(weights)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])


class PenaltyWindow:
    """Applies llama.cpp's repeat penalty in place on a logits row, and undoes it afterwards."""

    def __init__(self, settings: SamplerSettings):
        self.penalty = settings.repeat_penalty
        self.last_n = settings.repeat_last_n

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 and self.last_n != 0

    def ids(self, history: Sequence[int]) -> np.ndarray:
        tail = history[-self.last_n :] if self.last_n > 0 else history
        return np.unique(np.asarray(tail, dtype=np.int64))

    def apply(self, row: np.ndarray, ids: np.ndarray) -> np.ndarray:
        saved = row[ids].copy()
        row[ids] = np.where(saved > 0, saved / self.penalty, saved * self.penalty)
        return saved


def distribution(row: np.ndarray, settings: SamplerSettings, penalty_ids: np.ndarray | None = None) -> Distribution:
    """The sampling distribution for one logits row: penalty, top-k, temperature, top-p, min-p."""
    window = PenaltyWindow(settings)
    saved = window.apply(row, penalty_ids) if penalty_ids is not None and len(penalty_ids) else None
    try:
        k = settings.top_k
        if 0 < k < len(row):
            ids = np.argpartition(row, -k)[-k:]
            logits = row[ids].astype(np.float64)
        else:
            ids = np.arange(len(row))
            logits = row.astype(np.float64)
    finally:
        if saved is not None:
            row[penalty_ids] = saved
    logits /= max(settings.temperature, 1e-6)
    logits -= logits.max()
    probs = np.exp(logits)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    probs, ids = probs[order], ids[order]
    keep = len(probs)
    if settings.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), settings.top_p)) + 1)
    if settings.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= settings.min_p * probs[0]))))
    ids, probs = ids[:keep], probs[:keep]
    order = np.argsort(ids)
    return Distribution(ids[order].astype(np.int64), probs[order] / probs.sum())


def greedy_token(row: np.ndarray, penalty: PenaltyWindow | None = None, history: Sequence[int] = ()) -> int:
    if penalty is not None and penalty.active and len(history):
        ids = penalty.ids(history)
        saved = penalty.apply(row, ids)
        token = int(row.argmax())
        row[ids] = saved
        return token
    return int(row.argmax())


class Confidence:
    """Top-1 probability of a logits row (softmax at temperature 1), with one reused scratch buffer."""

    def __init__(self, n_vocab: int):
        self._scratch = np.empty(n_vocab, dtype=np.float32)

    def top_prob(self, row: np.ndarray) -> float:
        np.subtract(row, row.max(), out=self._scratch)
        np.exp(self._scratch, out=self._scratch)
        return float(1.0 / self._scratch.sum(dtype=np.float64))


def accept_or_resample(p: Distribution, q: Distribution, token: int, rng: np.random.Generator) -> tuple[bool, int]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    `token` was drawn from the draft's q. Keep it with probability min(1, p/q); otherwise draw from
    norm(max(0, p - q)). The result is distributed exactly as a draw from p.
    """
    q_x = q.prob(token)
    p_x = p.prob(token)
    if q_x > 0.0 and rng.random() * q_x < p_x:
        return True, token
    residual = np.maximum(p.probs - q.probs_of(p.ids), 0.0)
    if residual.sum() <= 0.0:  # p == q up to rounding: the residual is empty, p itself is exact
        return False, p.sample(rng)
    return False, _sample(p.ids, residual, rng)
