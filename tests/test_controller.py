"""The adaptive controller on synthetic histories, and prompt lookup on hand-made sequences."""

from __future__ import annotations

import random

import pytest

from app.engine.controller import NEW_REPLY_EVIDENCE, PRIOR_VERIFY_SLOPE, PROBE_EVERY, Decision, DraftController, VerifyCost
from app.engine.lookup import LookupDrafter

ONE = 0.010  # seconds to verify one token


def feed(ctl: DraftController, source: str, k: int, accepted: int, draft_cost: float, rounds: int, slope: float = 0.15) -> None:
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)  # a plain round measures verify(1)
    for _ in range(rounds):
        ctl.state(source)
        ctl.record(Decision(source, k, "test"), k, accepted, draft_cost * k, ONE * (1 + slope * k))


def test_high_acceptance_and_cheap_drafts_give_long_drafts() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 8, 8, draft_cost=0.001, rounds=20)
    decision = ctl.decide({"model": 8})
    assert decision.source == "model" and decision.k >= 6


def test_low_acceptance_gives_short_drafts_then_none() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 1, draft_cost=0.001, rounds=20)
    medium = ctl.decide({"model": 8})
    assert 0 < medium.k <= 3
    feed(ctl, "model", 4, 0, draft_cost=0.001, rounds=20)
    assert ctl.decide({"model": 8}).source == "none"


def test_expensive_drafts_are_not_worth_it_even_when_accepted() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 3, draft_cost=0.009, rounds=20, slope=0.4)  # draft ~ as slow as the main model
    assert ctl.decide({"model": 8}).source == "none"


def test_recovers_after_a_probe_when_acceptance_returns() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 0, draft_cost=0.001, rounds=20)
    decisions = []
    for _ in range(PROBE_EVERY + 1):
        d = ctl.decide({"model": 8})
        decisions.append(d)
        ctl.record(d, d.k, d.k, 0.001 * d.k, ONE * (1 + 0.15 * d.k))  # the text turned predictable
    assert any(d.reason.startswith("probe") for d in decisions)
    for _ in range(5):
        d = ctl.decide({"model": 8})
        ctl.record(d, d.k, d.k, 0.001 * d.k, ONE * (1 + 0.15 * d.k))
    assert ctl.decide({"model": 8}).k >= 4


def test_draft_cost_is_per_evaluation_so_short_drafts_do_not_make_long_ones_look_dear() -> None:
    # measured on k = 1 rounds only: each costs two draft evaluations (the accepted draft, then the
    # main model's token). Priced per drafted token that reads as 0.7 x a main token, and no length
    # pays; priced per evaluation (0.35 x), k + a^k of them, longer drafts clearly do.
    ctl = DraftController(draft_min=0, draft_max=8)
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    ctl.state("model")
    for _ in range(10):
        ctl.record(Decision("model", 1, "test"), 1, 1, 2 * 0.35 * ONE, ONE * 1.3, draft_work=2)
    decision = ctl.decide({"model": 8})
    assert decision.source == "model" and decision.k >= 3
    assert ctl.expected_rate("model", 6) > 1.1 * ctl.expected_rate("none", 0)  # per drafted token: 0.8x


def test_one_rejection_does_not_drop_a_draft_model_that_is_usually_right() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 4, draft_cost=0.002, rounds=20, slope=0.3)
    ctl.record(Decision("model", 4, "test"), 4, 0, 0.008, ONE * 2.2)  # rejected at its first token
    assert ctl.sources["model"].acceptance > 0.85
    assert ctl.decide({"model": 8}).source == "model"


def test_verify_cost_answers_measured_sizes_and_interpolates_the_rest() -> None:
    cost = VerifyCost()
    assert cost.at(0) is None
    cost.add(4, 0.035)
    cost.add(5, 0.042)
    # one token was never verified alone: scaled from the smallest batch with the prior shape, not by
    # continuing the 4 -> 5 slope down to an implausible 7 ms
    assert cost.at(0) == pytest.approx(0.035 / (1 + 4 * PRIOR_VERIFY_SLOPE))
    cost.add(0, 0.018)
    assert cost.at(0) == 0.018 and cost.at(4) == 0.035
    assert cost.at(2) == pytest.approx(0.018 + (0.035 - 0.018) / 2)
    assert cost.at(8) > cost.at(5)


def _curve_afresh(cost: VerifyCost, x: int) -> float:
    """What VerifyCost.at answers, worked out from scratch: the probe's curve scaled by the mean sample/probe ratio,
    samples over it, interpolated between known sizes, the prior shape below them, the fitted slope above."""
    both = [n for n in cost.samples if n in cost.prior]
    scale = sum(cost.samples[n] / cost.prior[n] for n in both) / len(both) if both else 1.0
    known = {n: s * scale for n, s in cost.prior.items()} | cost.samples
    if x in known:
        return known[x]
    sizes = sorted(known)
    lower, higher = [n for n in sizes if n < x], [n for n in sizes if n > x]
    if lower and higher:
        lo, hi = lower[-1], higher[0]
        return known[lo] + (known[hi] - known[lo]) * (x - lo) / (hi - lo)
    if higher:
        return known[higher[0]] * (1 + PRIOR_VERIFY_SLOPE * x) / (1 + PRIOR_VERIFY_SLOPE * higher[0])
    return known[sizes[-1]] + VerifyCost._slope(known, sizes[-1]) * (x - sizes[-1])


def test_verify_cost_kept_up_to_date_answers_what_the_curve_worked_out_afresh_would() -> None:
    rng = random.Random(5)
    cost = VerifyCost()
    for step in range(400):
        if step % 150 == 20:  # a probe (again): its sizes, not every size
            cost.set_prior({n: ONE * (1 + 0.3 * n) * rng.uniform(0.9, 1.1) for n in (0, 1, 3, 7, 8, 15)})
        cost.add(rng.choice((0, 0, 0, 1, 2, 4, 8, 12, 20)), ONE * rng.uniform(0.5, 6.0))
        for x in (0, 1, 2, 5, 9, 15, 16, 30):
            assert cost.at(x) == pytest.approx(_curve_afresh(cost, x), rel=1e-9), (step, x)


def test_free_lookup_draft_beats_a_costly_model_draft_when_it_matches() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 3, draft_cost=0.004, rounds=10)
    feed(ctl, "lookup", 6, 6, draft_cost=0.00001, rounds=10)
    assert ctl.decide({"model": 8, "lookup": 6}).source == "lookup"


def test_lookup_proposes_the_continuation_of_the_latest_earlier_ngram() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert LookupDrafter().match(tokens, 4) == [4, 5, 9, 9]
    assert LookupDrafter().match(tokens, 2) == [4, 5]
    assert LookupDrafter().match([7, 8, 6], 4) == []
    assert LookupDrafter().match([7, 8, 6, 8], 4) == []  # a lone repeated token is not context enough
    assert LookupDrafter().match([7, 8, 6, 7, 8], 4) == []  # nor two: they mislead where copying breaks off


def test_lookup_index_follows_a_growing_sequence_and_resets_on_a_new_one() -> None:
    lookup = LookupDrafter()
    seq = [5, 6, 4, 7, 8, 5, 6, 4]
    assert lookup.match(seq, 3) == [7, 8, 5]
    seq += [7, 1, 5, 6, 4]
    assert lookup.match(seq, 2) == [7, 1]  # the latest occurrence wins
    lookup.start([3, 4, 2, 9, 3, 4, 2])  # a new reply on another sequence (the engine calls start)
    assert lookup.match([3, 4, 2, 9, 3, 4, 2], 2) == [9, 3]


def probed_controller(verify_ratio: float, draft_ratio: float) -> DraftController:
    ctl = DraftController(draft_min=0, draft_max=16)
    ctl.seed({n: ONE * (1 + verify_ratio * (n - 1)) for n in range(1, 18)}, ONE * draft_ratio, ONE * draft_ratio / 4)
    return ctl


def test_review_closes_a_draft_model_that_cannot_pay_even_at_full_acceptance_and_says_why() -> None:
    ctl = probed_controller(verify_ratio=1.0, draft_ratio=0.57)  # the real pair on a 2-core CPU
    ctl.review(["model"])
    assert "model" in ctl.closed and "at best 0." in ctl.closed["model"] and "a draft token 0.57x" in ctl.closed["model"]
    assert ctl.decide({"model": 8}).source == "none"  # neither drafted nor probed
    cheap = probed_controller(verify_ratio=0.1, draft_ratio=0.1)  # a GPU
    cheap.review(["model"])
    assert cheap.closed == {} and cheap.best_case("model")[0] > 2


def test_a_closed_source_reopens_when_live_figures_change() -> None:
    ctl = probed_controller(verify_ratio=1.0, draft_ratio=0.57)
    ctl.review(["model"])
    for _ in range(12):  # the machine turned out to verify batches cheaply after all (the averages start at the probe's)
        for x in range(17):
            ctl.record(Decision("none", 0, "test"), x, 0, 0.0, ONE * (1 + 0.05 * x))
    ctl.review(["model"])
    assert "model" not in ctl.closed


def test_probed_costs_scale_with_live_measurements() -> None:
    ctl = probed_controller(verify_ratio=0.5, draft_ratio=0.5)
    assert ctl.verify_time(5) == pytest.approx(ONE * 3)
    for _ in range(40):  # live one-token cost: twice the probe's
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, 2 * ONE)
    assert ctl.verify_time(5) == pytest.approx(ONE * 6)  # unmeasured sizes follow the probe's shape
    assert ctl.unit_cost("model") == pytest.approx(ONE)  # and so does the draft's unmeasured cost


def test_one_slow_sample_does_not_stand_alone_against_the_probes_figure() -> None:
    ctl = probed_controller(verify_ratio=0.5, draft_ratio=0.3)
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, 4.5 * ONE)  # a first decode that waited on something else
    assert ctl.verify_time(1) < 2.5 * ONE  # plain decoding is not 4.5x dearer for the rest of the reply
    for _ in range(20):
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, 2 * ONE)
    assert ctl.verify_time(1) == pytest.approx(2 * ONE, rel=0.01)  # a sustained change is followed


def test_lookup_is_judged_by_observation_and_never_probed() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    for _ in range(30):
        ctl.observe("lookup", 0, 1)  # its proposals keep being wrong
        decision = ctl.decide({"lookup": 4})
        assert decision.source == "none"
        ctl.record(decision, 0, 0, 0.0, ONE)
    for _ in range(6):
        ctl.observe("lookup", 1, 1)  # the reply started copying
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    assert ctl.decide({"lookup": 4}).source == "lookup"


def test_a_new_reply_keeps_a_share_of_the_last_replys_acceptance_and_all_of_its_costs() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 8, 8, draft_cost=0.001, rounds=20)  # code: every drafted token accepted
    state = ctl.sources["model"]
    before, evidence, cost = state.acceptance, state.overall.accepted, state.unit_cost
    ctl.new_reply()
    assert state.overall.accepted == pytest.approx(evidence * NEW_REPLY_EVIDENCE)
    assert 0.7 < state.acceptance < before and state.unit_cost == cost
    feed(ctl, "model", 4, 0, draft_cost=0.001, rounds=3)  # the next reply is prose: its own rounds now weigh most
    assert state.acceptance < 0.8


def idle_model(acceptance_shown: int, measured: bool) -> DraftController:
    """A model drafted a few rounds (accepting `acceptance_shown` of 4 each), then sat idle long enough to be probed."""
    ctl = DraftController(draft_min=0, draft_max=16)
    ctl.seed({n: ONE * (1 + 0.3 * (n - 1)) for n in range(1, 18)}, ONE * 0.1, ONE * 0.1)  # at 98%: 1.7x plain
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    for _ in range(6):
        ctl.state("model")
        ctl.record(Decision("model", 4, "test"), 4, acceptance_shown, ONE * 0.1 * 5, ONE * (1 + 0.3 * 4))
    for _ in range(PROBE_EVERY):
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    if not measured:
        ctl.sources["model"].unit_cost = None
    return ctl


def test_an_idle_model_is_reprobed_with_a_catch_up_only_at_the_acceptance_it_has_shown() -> None:
    # shown ~55%: a probe that must first read 40 missed tokens would not pay at that rate
    assert idle_model(1, measured=True).decide({"model": 16}, behind={"model": 40}).source == "none"
    # with nothing to catch up, a probe is cheap enough to be optimistic about
    assert idle_model(1, measured=True).decide({"model": 16}, behind={"model": 0}).why == "probe"
    # never measured: the first probe is optimistic, catch-up and all
    assert idle_model(1, measured=False).decide({"model": 16}, behind={"model": 40}).why == "probe"


def model_after(history: list[tuple[int, int]], verify_slope: float = 0.3, draft_ratio: float = 0.33) -> DraftController:
    """A draft model that drafted `history` ((k, accepted) per round) where a draft token costs a third of a
    main-model token (the real pair's main model over RPC at 1 ms): 95% acceptance pays there, 85% does not."""
    ctl = probed_controller(verify_ratio=verify_slope, draft_ratio=draft_ratio)
    ctl.state("model")
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    for k, accepted in history:
        ctl.record(Decision("model", k, "test"), k, accepted, ONE * draft_ratio * k, ONE * (1 + verify_slope * k))
    return ctl


def test_a_model_in_sync_with_thin_evidence_keeps_drafting_while_it_may_still_pay() -> None:
    early = model_after([(4, 4), (11, 3)])  # one early rejection: 7 of 8 tokens, read as about 85%
    state = early.sources["model"]
    assert state.acceptance < 0.9 < state.overall.plausible()
    assert early.expected_rate("model", 4) < early.expected_rate("none", 0) * 1.05  # at its estimate plain wins...
    decision = early.decide({"model": 16})
    assert decision.why == "explore" and decision.source == "model"  # ...but it drafts on
    assert 1 <= decision.k <= 4  # at the length that loses least if it really is 85%
    assert decision.acceptance == pytest.approx(state.acceptance) and decision.plausible > decision.acceptance
    assert early.decide({"model": 16}, behind={"model": 40}).source == "none"  # it is no bet worth a catch-up


def test_exploring_stops_once_the_evidence_says_the_model_does_not_pay() -> None:
    shown = model_after([(4, 2), (4, 3), (4, 1), (4, 4), (4, 2)] * 6)  # about 70%, and plenty of it
    assert shown.sources["model"].overall.plausible() < 0.85
    assert shown.decide({"model": 16}).source == "none"


def test_the_confidence_stop_holds_while_unsure_tokens_are_mostly_wrong_and_lifts_when_they_are_right() -> None:
    ctl = model_after([(4, 4)] * 3)  # a draft token a third of a main-model token, verify 0.3 per extra token
    assert ctl.stop_unsure(4)  # a coin toss does not pay for an extra draft token and a wider verify
    for _ in range(20):
        ctl.observe_unsure(True)  # a quantized twin: unsure where the main model is unsure too, and right there
    assert not ctl.stop_unsure(4)
    for _ in range(60):
        ctl.observe_unsure(False)  # a smaller draft guessing at hard places
    assert ctl.stop_unsure(4)



def test_a_rollbacks_cost_in_the_next_round_is_charged_to_drafting_not_to_plain_decoding() -> None:
    """A recurrent main model's decode after a snapshot rollback is dearer: that excess is kept out of the verify
    curve (plain decoding stays priced at its own cost) and charged to drafts by their chance of a rejection."""
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 2, draft_cost=0.001, rounds=20)
    before = ctl.expected_rate("model", 4)
    plain = ctl.verify_time(1)
    for _ in range(10):  # each one-token round after a rejected draft took 3 ms more than one token does
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE + 0.003, after_rollback=True)
    assert ctl.verify_time(1) == plain
    assert ctl.rollback_cost == pytest.approx(0.003)
    assert ctl.expected_rate("model", 4) < before
    full = DraftController(draft_min=0, draft_max=8)
    feed(full, "model", 4, 4, draft_cost=0.001, rounds=20)
    rate = full.expected_rate("model", 4, acceptance=0.999)
    full.rollback_cost = 0.003
    assert full.expected_rate("model", 4, acceptance=0.999) == pytest.approx(rate, rel=0.01)  # never rejected: no cost


def _deciding_takes(ctl: DraftController, seconds: float) -> None:
    """A plain round whose deciding (the engine's lookup match, the weighing) took `seconds`."""
    ctl.record(Decision("none", 0), 0, 0, seconds, ONE)


def test_a_source_far_from_paying_is_not_priced_again_every_round_but_a_probe_or_a_match_still_comes(monkeypatch) -> None:
    from app.engine import controller as c

    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 0, draft_cost=0.004, rounds=20)  # never accepted: far from paying
    ctl.state("model").probe_interval = 1000
    _deciding_takes(ctl, 3.5 * c.PRICING_SHARE * ONE)  # deciding costs 3.5 rounds' worth of PRICING_SHARE
    priced = []
    real = DraftController.rates
    monkeypatch.setattr(DraftController, "rates", lambda self, *a, **k: priced.append(self._rounds) or real(self, *a, **k))
    decisions = []
    for _ in range(4 + 2):
        decisions.append(ctl.decide({"model": 8}))
        ctl.record(decisions[-1], 0, 0, 0.0, ONE)
    assert all(d.source == "none" for d in decisions)
    assert sorted(set(priced)) == [priced[0], priced[0] + 4]  # priced on the first round, then again 4 rounds later
    ctl.decide({"model": 8})  # quiet again: not priced
    before = len(priced)
    ctl.state("lookup")
    ctl.decide({"model": 8, "lookup": 6})
    assert len(priced) > before  # a new offer (a lookup match) is priced at once
    ctl.state("model").rounds_since_used = ctl.state("model").probe_interval = 4
    before = len(priced)
    ctl.decide({"model": 8})
    assert len(priced) == before  # a due probe of a quiet source waits for the quiet rounds to pass...
    for _ in range(4):
        ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)
    ctl.decide({"model": 8})
    assert len(priced) > before  # ...then it is weighed


def test_how_long_a_source_stays_quiet_follows_what_pricing_costs_against_a_token(monkeypatch) -> None:
    from app.engine import controller as c

    for pricing, rounds in ((0.1 * c.PRICING_SHARE * ONE, 1), (7.5 * c.PRICING_SHARE * ONE, 8), (ONE, c.QUIET_MAX)):
        ctl = DraftController(draft_min=0, draft_max=8)
        feed(ctl, "model", 4, 0, draft_cost=0.004, rounds=20)
        ctl.state("model").probe_interval = 1000
        _deciding_takes(ctl, pricing)
        ctl.decide({"model": 8})
        assert ctl._quiet["model"][0] - ctl._rounds == rounds  # a model of tens of ms is priced every round


def test_with_nothing_near_paying_the_controller_rests_and_then_catches_up_the_rounds_bookkeeping(monkeypatch) -> None:
    from app.engine import controller as c

    def hopeless() -> DraftController:
        ctl = DraftController(draft_min=0, draft_max=8)
        feed(ctl, "model", 4, 0, draft_cost=0.004, rounds=20)  # never accepted
        ctl.state("lookup")
        ctl.state("model").probe_interval = 1000
        return ctl

    resting, awake = hopeless(), hopeless()
    for ctl in (resting, awake):
        _deciding_takes(ctl, 5.5 * c.PRICING_SHARE * ONE)  # quiet for 6 rounds
    priced = []
    real = DraftController.rates
    monkeypatch.setattr(DraftController, "rates", lambda self, *a, **k: priced.append(self) or real(self, *a, **k))
    plain = resting.decide({"model": 8})
    assert plain.source == "none" and resting.resting(None) is plain
    assert resting.resting(c.Batch(1)) is None  # another batch shape: weighed again
    weighed = len(priced)
    for _ in range(6):  # the engine asks nothing while resting: no match, no weighing
        assert resting.resting(None) is plain
        resting.record(plain, 0, 0, 0.0, ONE)
        awake.record(Decision("none", 0, "test"), 0, 0, 0.0, ONE)  # the same rounds, bookkept one by one
    assert resting.resting(None) is None  # the model's quiet rounds are over
    assert len(priced) == weighed
    resting._wake()
    for source in ("model", "lookup"):
        mine, theirs = resting.sources[source], awake.sources[source]
        assert mine.rounds_since_used == theirs.rounds_since_used
        for name in ("overall", "cold", "streak"):
            assert getattr(mine, name).accepted == pytest.approx(getattr(theirs, name).accepted)
            assert getattr(mine, name).rejected == pytest.approx(getattr(theirs, name).rejected)
    assert resting.verify_cost.samples == pytest.approx(awake.verify_cost.samples)


def test_a_controller_does_not_rest_while_lookup_is_on_a_streak_or_a_source_is_still_weighed() -> None:
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 4, 0, draft_cost=0.004, rounds=20)
    ctl.state("model").probe_interval = 1000
    ctl.observe("lookup", 3, 3)  # its proposal came true: a streak may be starting
    assert ctl.decide({"model": 8}).source == "none" and ctl.resting(None) is None
    fresh = DraftController(draft_min=0, draft_max=8)
    feed(fresh, "model", 4, 4, draft_cost=0.0001, rounds=3)  # a source that pays is never quiet
    fresh.decide({"model": 8})
    assert fresh.resting(None) is None


def test_with_nothing_offered_the_controller_rests_only_where_deciding_is_dear_against_a_token() -> None:
    from app.engine import controller as c

    for deciding, rests in ((2.5 * c.PRICING_SHARE * ONE, 3), (0.2 * c.PRICING_SHARE * ONE, 1)):  # a tiny model; a real one
        ctl = DraftController(draft_min=0, draft_max=8)
        ctl.state("lookup")
        _deciding_takes(ctl, deciding)
        plain = ctl.decide({})  # lookup found no match: nothing to weigh
        rested = 0
        while True:
            ctl.record(plain, 0, 0, 0.0, ONE)
            rested += 1
            if ctl.resting(None) is None:
                break
        assert rested == rests


def test_a_decode_hiccup_barely_moves_the_verify_curve_but_a_lasting_slowdown_is_followed() -> None:
    from app.engine.controller import SPIKE

    cost = VerifyCost()
    cost.set_prior({0: ONE, 1: 1.3 * ONE})
    for _ in range(10):
        cost.add(0, ONE)
    cost.add(0, 6 * ONE)  # one decode the machine held up: 6x its time
    assert cost.at(0) <= ONE * (0.7 + 0.3 * SPIKE) + 1e-12  # plain decoding looks a few percent dearer, not 2.5x
    for _ in range(12):  # the machine stays twice as slow
        cost.add(0, 2 * ONE)
    assert cost.at(0) == pytest.approx(2 * ONE, rel=0.02)
    ctl = DraftController(draft_min=0, draft_max=8)
    feed(ctl, "model", 2, 0, draft_cost=0.002, rounds=5)  # a draft that is never right
    ctl.record(Decision("none", 0, "test"), 0, 0, 0.0, 6 * ONE)  # and one hiccup in a plain round
    assert ctl.decide({"model": 8}).source == "none"  # does not make it look worth drafting


def test_a_first_sample_of_a_size_starts_from_the_curve_as_scaled_not_from_the_raw_probe() -> None:
    cost = VerifyCost()
    cost.set_prior({0: ONE, 3: 2 * ONE, 7: 4 * ONE})
    for _ in range(30):  # the machine runs at twice the probe's times
        cost.add(0, 2 * ONE)
    before = cost.at(7)
    assert before == pytest.approx(8 * ONE, rel=0.02)
    cost.add(7, 8 * ONE)  # a first live sample that says what the curve said
    assert cost.at(7) == pytest.approx(before, rel=0.02) and cost.at(3) == pytest.approx(4 * ONE, rel=0.02)
