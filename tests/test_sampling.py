"""Coupled sampling on hand-built distributions (see sampling.py), and the sampler's shaping steps."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.sampling import (
    Confidence,
    Distribution,
    PenaltyWindow,
    PositionalUniforms,
    SamplerSettings,
    distribution,
    greedy_token,
)


def dist(probs: dict[int, float]) -> Distribution:
    ids = np.array(sorted(probs), dtype=np.int64)
    return Distribution(ids, np.array([probs[i] for i in ids], dtype=np.float64))


def test_inverse_cdf_draws_follow_the_distribution() -> None:
    p = dist({0: 0.5, 1: 0.3, 2: 0.2})
    uniforms = PositionalUniforms(11)
    n = 40_000
    freq = np.bincount([p.sample_at(uniforms.at(i)) for i in range(n)], minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.012)


def test_positional_uniforms_depend_on_seed_and_position_only() -> None:
    a, b = PositionalUniforms(7), PositionalUniforms(7)
    forward = [a.at(i) for i in range(100)]
    backward = [b.at(i) for i in reversed(range(100))][::-1]  # asked in another order, some twice
    assert forward == backward == [b.at(i) for i in range(100)]
    assert forward != [PositionalUniforms(8).at(i) for i in range(100)]
    assert all(0.0 <= u < 1.0 for u in forward)
    assert PositionalUniforms(None).seed != PositionalUniforms(None).seed  # unseeded replies differ
    # neighbouring positions are not correlated (a weak hash would show it here)
    values = np.array([a.at(i) for i in range(20_000)])
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.03
    assert abs(values.mean() - 0.5) < 0.01


def test_a_draft_whose_q_is_close_to_p_guesses_p_s_draw_most_of_the_time() -> None:
    """The draft's guess and the main model's token use the same number: with q close to p they
    coincide about as often as the overlap of the two distributions allows."""
    p, q = dist({1: 0.6, 2: 0.3, 3: 0.1}), dist({1: 0.55, 2: 0.35, 3: 0.1})
    uniforms = PositionalUniforms(3)
    n = 20_000
    agree = sum(p.sample_at(u) == q.sample_at(u) for u in (uniforms.at(i) for i in range(n)))
    assert agree / n == pytest.approx(0.95, abs=0.01)  # the CDFs differ on [0.55, 0.6) only


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
