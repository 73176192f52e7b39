"""Turning logits into tokens, for both models alike, and the rule that keeps sampled output exact.

Sampling at temperature > 0 draws every token by inverse CDF from one uniform number per sequence
position, derived from (seed, position) alone (PositionalUniforms). The draft model draws its guess
for a position from its q with that position's number; the main model draws its own token from p
with the same number; a guess is kept when the two agree. The token at each position is then the
one plain decoding draws there, whatever was drafted: distributed exactly as p, and a seeded run
gives the same text with any draft, draft length or adaptive choice (timing-dependent choices must
not change how many random numbers are used). It is llama.cpp's rule for its speculative server
(the main model samples, drafts are kept while they match), with the draft's guess coupled to the
main model's draw, so a draft whose q is close to p guesses the very token p draws.

Distributions are sparse: after top-k only k candidates remain, so p and q are (ids, probs) pairs
of at most k entries, sorted by token id (the same order for both models, which couples their draws).
Greedy decoding skips all of this: an argmax over llama.cpp's logits view.
"""

from __future__ import annotations

import secrets
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

    def sample_at(self, u: float) -> int:
        """The token whose CDF interval (ids in ascending order) holds the uniform number u."""
        cdf = np.cumsum(self.probs)
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return int(self.ids[min(i, len(self.ids) - 1)])


_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class PositionalUniforms:
    """A uniform number in [0, 1) for each sequence position, a function of (seed, position) only: no
    generator state advances, so how many numbers a run used (drafts made, rejected, skipped) cannot
    change the numbers later positions get. Without a seed, a fresh random one per reply."""

    def __init__(self, seed: int | None):
        self.seed = secrets.randbits(64) if seed is None else seed
        self._key = _splitmix64(self.seed & _MASK)

    def at(self, position: int) -> float:
        return (_splitmix64((self._key + position * 0xD1B54A32D192ED03) & _MASK) >> 11) / float(1 << 53)


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
