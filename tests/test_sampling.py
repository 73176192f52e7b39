"""The speculative-sampling rule on hand-built distributions, and the sampler's shaping steps."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.sampling import (
    Confidence,
    Distribution,
    PenaltyWindow,
    SamplerSettings,
    accept_or_resample,
    distribution,
    greedy_token,
)


def dist(probs: dict[int, float]) -> Distribution:
    ids = np.array(sorted(probs), dtype=np.int64)
    return Distribution(ids, np.array([probs[i] for i in ids], dtype=np.float64))


def test_token_more_likely_under_p_is_always_accepted() -> None:
    p, q = dist({1: 0.7, 2: 0.3}), dist({1: 0.5, 2: 0.5})
    rng = np.random.default_rng(0)
    assert all(accept_or_resample(p, q, 1, rng) == (True, 1) for _ in range(200))


def test_token_impossible_under_p_is_always_rejected_and_resampled_from_residual() -> None:
    p, q = dist({1: 1.0}), dist({1: 0.5, 3: 0.5})
    rng = np.random.default_rng(0)
    for _ in range(200):
        accepted, token = accept_or_resample(p, q, 3, rng)
        assert not accepted and token == 1


def test_acceptance_probability_is_p_over_q() -> None:
    p, q = dist({1: 0.2, 2: 0.8}), dist({1: 0.8, 2: 0.2})
    rng = np.random.default_rng(1)
    n = 20_000
    accepted = sum(accept_or_resample(p, q, 1, rng)[0] for _ in range(n))
    assert accepted / n == pytest.approx(0.25, abs=0.015)  # min(1, 0.2 / 0.8)


def test_residual_is_normalised_positive_part_of_p_minus_q() -> None:
    # rejecting token 1 leaves max(0, p - q) = {2: 0.1, 3: 0.3} -> {2: 0.25, 3: 0.75}
    p, q = dist({1: 0.2, 2: 0.4, 3: 0.4}), dist({1: 0.6, 2: 0.3, 3: 0.1})
    rng = np.random.default_rng(2)
    resampled = [t for ok, t in (accept_or_resample(p, q, 1, rng) for _ in range(30_000)) if not ok]
    counts = np.bincount(resampled, minlength=4)
    assert counts[1] == 0
    assert counts[3] / len(resampled) == pytest.approx(0.75, abs=0.015)


def test_draw_then_accept_reproduces_p_exactly_in_distribution() -> None:
    p, q = dist({0: 0.5, 1: 0.3, 2: 0.2}), dist({0: 0.1, 1: 0.3, 2: 0.4, 3: 0.2})
    rng = np.random.default_rng(3)
    n = 40_000
    draws = [accept_or_resample(p, q, q.sample(rng), rng)[1] for _ in range(n)]
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.012)


def test_distribution_applies_top_k_temperature_and_normalises() -> None:
    row = np.array([0.0, 5.0, 4.0, 3.0, -1.0], dtype=np.float32)
    d = distribution(row.copy(), SamplerSettings(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    assert list(d.ids) == [1, 2]
    assert d.probs.sum() == pytest.approx(1.0)
    assert d.prob(1) == pytest.approx(1 / (1 + np.exp(-1)))


def test_top_p_and_min_p_cut_the_tail() -> None:
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    top_p = distribution(row.copy(), SamplerSettings(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0))
    assert list(top_p.ids) == [0, 1]
    min_p = distribution(row.copy(), SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2))
    assert list(min_p.ids) == [0, 1, 2]  # 0.05 < 0.2 * 0.5


def test_repeat_penalty_changes_argmax_and_leaves_logits_untouched() -> None:
    row = np.array([1.0, 2.0, 1.9], dtype=np.float32)
    before = row.copy()
    window = PenaltyWindow(SamplerSettings(repeat_penalty=1.5))
    assert greedy_token(row, window, history=[1]) == 2
    np.testing.assert_array_equal(row, before)
    assert greedy_token(row) == 1


def test_confidence_is_softmax_top_probability() -> None:
    row = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    expected = np.exp(2) / np.exp([2.0, 1.0, 0.0]).sum()
    assert Confidence(3).top_prob(row) == pytest.approx(expected, rel=1e-5)
