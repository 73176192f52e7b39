"""The speculative loop on tiny real llama.cpp models: losslessness, rollback, sync, stops, sampling."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.engine.backend import Context, Model, SingleTokenContext
from app.engine.chat import ChatSession, Message
from app.engine.controller import DRAFT_P_MIN
from app.engine.errors import ContextOverflowError, IncompatibleDraftError
from app.engine.events import Finished, RoundEvent
from app.engine.sampling import SamplerSettings, distribution
from app.engine.speculative import GenerationConfig, SpeculativeEngine
from tests import tiny_models

GREEDY = SamplerSettings(temperature=0.0)


@pytest.fixture(scope="module")
def models(tiny) -> dict[str, Model]:
    return {name: Model(getattr(tiny, name), n_gpu_layers=0) for name in ("main", "draft", "twin", "foreign")}


def run(
    main: Model, draft: Model | None, prompt: list[int], lookup: bool = False, **config
) -> tuple[Finished, list[RoundEvent], SpeculativeEngine]:
    engine = SpeculativeEngine(main, draft, n_ctx=512, n_threads=2, lookup=lookup)
    config.setdefault("sampler", GREEDY)
    config.setdefault("adaptive", False)  # fixed lengths unless a test asks for the controller
    config.setdefault("draft_p_min", 0.0)  # every length drafted in full, unless a test asks for the confidence stop
    events = list(engine.generate(prompt, GenerationConfig(**config)))
    return events[-1], events[:-1], engine


PROMPTS = ["the cat sat on the mat", "def sort ( x ) : return", "hello world , hello"]


@pytest.mark.parametrize("draft_max", [1, 4, 8])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain(models, prompt: str, draft_max: int) -> None:
    tokens = models["main"].tokenize(prompt)
    plain, _, _ = run(models["main"], None, tokens, max_tokens=96)
    spec, rounds, _ = run(models["main"], models["draft"], tokens, max_tokens=96, draft_max=draft_max)
    assert spec.tokens == plain.tokens
    assert spec.text == plain.text
    # the perturbed draft must exercise both paths of the loop
    assert spec.stats.accepted_draft_tokens_count > 0
    assert spec.stats.rejected_draft_tokens_count > 0
    assert max(len(r.drafted) for r in rounds) == draft_max


def test_by_default_a_draft_ends_at_a_token_the_draft_model_is_unsure_of(models) -> None:
    """--draft-p-min's default (DRAFT_P_MIN) stops a draft where the draft model's top probability falls under it:
    the unsure token is not sent, the output is still the main model's."""
    tokens = models["main"].tokenize(PROMPTS[1])
    plain, _, _ = run(models["main"], None, tokens, max_tokens=48)
    stopped, rounds, _ = run(models["main"], models["draft"], tokens, max_tokens=48, draft_max=8, draft_p_min=DRAFT_P_MIN)
    full, full_rounds, _ = run(models["main"], models["draft"], tokens, max_tokens=48, draft_max=8, draft_p_min=0.0)
    assert stopped.tokens == full.tokens == plain.tokens
    assert GenerationConfig().draft_p_min == Settings().draft_p_min == DRAFT_P_MIN > 0
    short = [r for r in rounds if len(r.drafted) < 8 and r.n_ignored]
    assert short, "the tiny draft model is unsure somewhere in 48 tokens"
    assert sum(len(r.drafted) for r in rounds) < sum(len(r.drafted) for r in full_rounds)


def test_twin_draft_is_always_accepted_and_takes_fewer_rounds(models) -> None:
    tokens = models["main"].tokenize(PROMPTS[0])
    plain, _, _ = run(models["main"], None, tokens, max_tokens=64)
    spec, _, _ = run(models["main"], models["twin"], tokens, max_tokens=64, draft_max=4)
    assert spec.tokens == plain.tokens
    assert spec.stats.rejected_draft_tokens_count == 0
    assert spec.stats.rounds < plain.stats.rounds / 3
    stats = spec.stats
    assert stats.total_draft_tokens_count == (
        stats.accepted_draft_tokens_count + stats.rejected_draft_tokens_count + stats.ignored_draft_tokens_count
    )
    # what plain decoding would have cost: the first token as it came, then 63 at the measured one-token cost
    engine = run(models["main"], models["twin"], tokens, max_tokens=1)[2]
    one_token = engine.main_profile.verify_seconds[1]
    assert stats.plain_time_estimate > stats.time_to_first_token + 63 * one_token * 0.2
    assert stats.speedup_estimate == pytest.approx(stats.plain_time_estimate / stats.generation_time)
    assert "x plain (" in stats.summary() and ("s saved)" in stats.summary() or "s lost)" in stats.summary())
    assert plain.stats.speedup_estimate == 1.0 and plain.stats.plain_time_estimate == plain.stats.generation_time


def test_draft_context_is_synced_incrementally_never_replaying_the_prompt(models) -> None:
    tokens = models["main"].tokenize(PROMPTS[1] * 4)
    spec, rounds, engine = run(models["main"], models["draft"], tokens, max_tokens=80, draft_max=4)
    draft_ctx = engine.drafter.ctx
    drafted = sum(len(r.drafted) for r in rounds)
    # each token is evaluated once, plus draft tokens that were later rolled back
    assert draft_ctx.n_evaluated <= len(tokens) + len(spec.tokens) + drafted
    assert draft_ctx.n_evaluated < 2 * len(tokens) + len(spec.tokens) + drafted - len(tokens)
    # the main context holds exactly the accepted sequence but its last token
    assert engine.main_ctx.tokens == [*tokens, *spec.tokens][:-1]


def test_kv_rollback_gives_the_same_logits_as_a_fresh_context(models) -> None:
    main = models["main"]
    prefix = main.tokenize("the cat sat")
    rolled = Context(main, 256, 2)
    rolled.decode([*prefix, 280, 281, 282])
    rolled.truncate(len(prefix))
    rolled.decode([270, 271])
    fresh = Context(main, 256, 2)
    fresh.decode([*prefix, 270, 271])
    np.testing.assert_allclose(rolled.logits()[-1], fresh.logits()[-1], rtol=1e-4, atol=1e-4)


def test_single_token_context_evaluates_a_batch_like_plain_decoding(models) -> None:
    """The draft's context on AMX CPUs: a batch goes through one token at a time, same cache, same logits."""
    main = models["main"]
    tokens = main.tokenize("the cat sat on the mat and ran")
    single = SingleTokenContext(main, 256, 2)
    single.decode(tokens)
    stepwise = Context(main, 256, 2)
    for token in tokens:
        stepwise.decode([token])
    assert single.tokens == tokens and single.n_evaluated == len(tokens)
    assert np.array_equal(single.logits()[-1], stepwise.logits()[-1])
    single.truncate(3)
    assert single.sync(tokens) == len(tokens) - 3
    np.testing.assert_allclose(single.logits()[-1], stepwise.logits()[-1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        single.decode(tokens[:2], all_logits=True)


# Run in a child process: the llama.cpp bug this guards against is a segfault, which would end the test run.
QUANTIZED_BATCH_CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import gguf, numpy as np
    from app.engine.backend import Context, Model
    from app.engine.probe import measure_main
    from tests import tiny_models
    weights = tiny_models.random_weights(seed=5, n_vocab=tiny_models.n_vocab(), n_embd=128, n_ff=256)
    path = tiny_models.write_model(Path(sys.argv[1]), weights, quant=gguf.GGMLQuantizationType.Q4_1)
    model = Model(path)
    tokens = list(range(260, 280))
    batched = Context(model, 256, 2)
    batched.decode(tokens, all_logits=True)
    rows = batched.logits().copy()
    single = Context(model, 256, 2)
    exact = measure_main(model, 2).kernels.exact
    for i, token in enumerate(tokens):
        single.decode([token])
        if exact:
            assert np.array_equal(single.logits()[-1], rows[i]), i
        else:
            np.testing.assert_allclose(single.logits()[-1], rows[i], rtol=1e-2, atol=1e-2)
    print("ok")
    """
)


def test_quantized_model_batches_agree_with_single_tokens(tmp_path: Path) -> None:
    """A Q4_1 model (the demo draft's type) decoded as one batch and token by token. On AMX CPUs
    llama.cpp's AMX kernels crash on such batches unless Tandem keeps weights out of them."""
    child = subprocess.run(
        [sys.executable, "-c", QUANTIZED_BATCH_CHECK, str(tmp_path / "q4_1.gguf")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]


def test_max_tokens_inside_an_accepted_draft_is_exact(models) -> None:
    tokens = models["main"].tokenize(PROMPTS[0])
    for limit in (1, 3, 6, 7):
        spec, _, _ = run(models["main"], models["twin"], tokens, max_tokens=limit, draft_max=8)
        assert len(spec.tokens) == limit
        assert spec.stats.stop_reason == "maxPredictedTokensReached"


def test_stop_string_inside_an_accepted_draft_emits_nothing_past_it(models) -> None:
    tokens = models["main"].tokenize(PROMPTS[0])
    plain, _, _ = run(models["main"], None, tokens, max_tokens=40)
    stop = plain.text[12:15]
    expected = plain.text[: plain.text.index(stop)]
    spec, rounds, _ = run(models["main"], models["twin"], tokens, max_tokens=40, draft_max=8, stop=(stop,))
    assert spec.stats.stop_reason == "stopStringFound"
    assert spec.text == expected
    assert "".join(r.text for r in rounds) + spec.tail == expected


def test_eos_inside_an_accepted_draft_ends_the_reply_there(tiny, tmp_path: Path, models) -> None:
    tokens = models["main"].tokenize(PROMPTS[0])
    plain, _, _ = run(models["main"], None, tokens, max_tokens=20)
    eos = plain.tokens[5]
    cut = plain.tokens.index(eos)
    weights = tiny_models.random_weights(seed=1, n_vocab=tiny_models.n_vocab())
    main = Model(tiny_models.write_model(tmp_path / "eos.gguf", weights, eos_id=eos))
    spec, _, _ = run(main, models["twin"], tokens, max_tokens=20, draft_max=8)
    assert spec.stats.stop_reason == "eosFound"
    assert spec.tokens == plain.tokens[:cut]


def test_incompatible_draft_is_refused_with_its_reason(models) -> None:
    with pytest.raises(IncompatibleDraftError, match="token 259 differs"):
        SpeculativeEngine(models["main"], models["foreign"], n_ctx=256, n_threads=2)


def test_prompt_longer_than_context_is_refused(models) -> None:
    engine = SpeculativeEngine(models["main"], None, n_ctx=256, n_threads=2)
    with pytest.raises(ContextOverflowError, match="the prompt is 300 tokens but the context holds 256"):
        list(engine.generate([5] * 300, GenerationConfig()))


def test_context_full_stops_generation(models) -> None:
    engine = SpeculativeEngine(models["main"], models["twin"], n_ctx=256, n_threads=2)
    events = list(engine.generate(models["main"].tokenize(PROMPTS[0]), GenerationConfig(max_tokens=500, sampler=GREEDY)))
    assert events[-1].stats.stop_reason == "contextLengthReached"


def test_chat_turns_reuse_the_kv_prefix_losslessly(models) -> None:
    config = GenerationConfig(max_tokens=12, draft_max=4, sampler=GREEDY, adaptive=False)
    session = ChatSession(SpeculativeEngine(models["main"], models["draft"], n_ctx=512, n_threads=2))
    first = list(session.send("hello world", config))[-1]
    second = list(session.send("the cat sat", config))[-1]
    # the whole first-turn prompt stays cached; only the reply and the new turn are evaluated
    reused = second.stats.prompt_tokens_count - second.stats.prompt_tokens_evaluated
    assert reused >= first.stats.prompt_tokens_count - 1
    fresh = ChatSession(SpeculativeEngine(models["main"], models["draft"], n_ctx=512, n_threads=2))
    fresh.messages = [Message("user", "hello world"), Message("assistant", first.text)]
    again = list(fresh.send("the cat sat", config))[-1]
    assert again.stats.prompt_tokens_evaluated == again.stats.prompt_tokens_count
    assert again.tokens == second.tokens
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]


SAMPLED = SamplerSettings(temperature=1.5, top_k=12, top_p=1.0, min_p=0.0, seed=7)


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    mask = expected > 0
    return float((((observed - expected) ** 2)[mask] / expected[mask]).sum())


def test_speculative_sampling_matches_the_main_models_distribution(models) -> None:
    """The first round of a reply is plain (time to first token), so the first drafted token is the
    second of the reply. Given the likeliest first token: speculative draws of the second token vs the
    main model's exact p (chi-square, fixed seeds); of the third, speculative vs plain (two-sample)."""
    main, draft = models["main"], models["draft"]
    prompt = main.tokenize(PROMPTS[2])
    probe = Context(main, 128, 2)
    probe.decode(prompt)
    first = distribution(probe.logits()[-1].copy(), SAMPLED)
    t1 = int(first.ids[first.probs.argmax()])
    probe.decode([t1])
    p = distribution(probe.logits()[-1].copy(), SAMPLED)
    t2 = int(p.ids[p.probs.argmax()])

    n = 3000
    spec_engine = SpeculativeEngine(main, draft, n_ctx=128, n_threads=2)
    plain_engine = SpeculativeEngine(main, None, n_ctx=128, n_threads=2)
    spec_second, spec_third, plain_third = Counter(), Counter(), Counter()
    accepted = rejected = 0
    for i in range(n):
        cfg = GenerationConfig(
            max_tokens=3, draft_max=2, adaptive=False, draft_p_min=0.0,  # both drafts always: the residual path runs
            sampler=SamplerSettings(**{**SAMPLED.__dict__, "seed": i}),
        )
        finished = list(spec_engine.generate(prompt, cfg))[-1]
        out = finished.tokens
        accepted += finished.stats.accepted_draft_tokens_count
        rejected += finished.stats.rejected_draft_tokens_count
        if out[0] == t1:
            spec_second[out[1]] += 1
            if out[1] == t2:
                spec_third[out[2]] += 1
        plain = list(plain_engine.generate(prompt, GenerationConfig(max_tokens=3, sampler=cfg.sampler)))[-1].tokens
        if plain[:2] == (t1, t2):
            plain_third[plain[2]] += 1

    observed = np.array([spec_second[int(t)] for t in p.ids], dtype=float)
    assert sum(spec_second.values()) == observed.sum()  # nothing outside p's support
    # df = len(p.ids) - 1 <= 11; the 99.9% quantile of chi2(11) is 31.3
    assert _chi_square(observed, p.probs * observed.sum()) < 31.3

    support = sorted(set(spec_third) | set(plain_third))
    a = np.array([spec_third[t] for t in support], dtype=float)
    b = np.array([plain_third[t] for t in support], dtype=float)
    pooled = (a + b) / (a.sum() + b.sum())
    stat = _chi_square(a, pooled * a.sum()) + _chi_square(b, pooled * b.sum())
    assert stat < 31.3, (a, b)
    # and the draft was really used: both the accept and the residual paths ran many times
    assert accepted > 100 and rejected > 100, (accepted, rejected)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_adaptive_and_lookup_modes_stay_identical_to_plain(models, prompt: str) -> None:
    tokens = models["main"].tokenize(prompt * 3)
    plain, _, _ = run(models["main"], None, tokens, max_tokens=96)
    variants = {
        "adaptive model": run(models["main"], models["draft"], tokens, max_tokens=96, adaptive=True),
        "adaptive model + lookup": run(models["main"], models["draft"], tokens, lookup=True, max_tokens=96, adaptive=True),
        "fixed lookup": run(models["main"], None, tokens, lookup=True, max_tokens=96, draft_max=6),
        "adaptive lookup": run(models["main"], None, tokens, lookup=True, max_tokens=96, adaptive=True),
    }
    for name, (out, _, _) in variants.items():
        assert out.tokens == plain.tokens, name
    _, rounds, _ = variants["fixed lookup"]
    assert any(r.draft_source == "lookup" and r.n_accepted > 0 for r in rounds)


def test_the_controller_keeps_what_it_learned_for_the_next_reply(models) -> None:
    main_profile, draft_profile = synthetic_profiles(verify_ratio=0.1, draft_ratio=0.1)  # a machine where drafting pays
    engine = SpeculativeEngine(
        models["main"], models["draft"], n_ctx=512, n_threads=2, main_profile=main_profile, draft_profile=draft_profile
    )
    config = GenerationConfig(max_tokens=24, sampler=GREEDY, adaptive=True)
    list(engine.generate(models["main"].tokenize(PROMPTS[0]), config))
    (controller,) = engine._controllers.values()
    assert controller.verify_cost.samples and controller.sources["model"].unit_cost is not None
    second = list(engine.generate(models["main"].tokenize(PROMPTS[1]), config))
    assert engine._controllers == {(0, 16, 0): controller}  # (draft-min, draft-max, sequence)
    assert "nothing measured" not in second[1].decision  # it starts from measured costs, not priors
    assert second[-1].tokens == run(models["main"], None, models["main"].tokenize(PROMPTS[1]), max_tokens=24)[0].tokens


def test_lookup_sampling_matches_plain_sampling_distribution(models) -> None:
    """Lookup drafts are point masses q = 1: accept with p(x), else resample from p without x."""
    main = models["main"]
    prompt = main.tokenize(PROMPTS[2] * 3)
    spec = SpeculativeEngine(main, None, n_ctx=256, n_threads=2, lookup=True)
    plain = SpeculativeEngine(main, None, n_ctx=256, n_threads=2)
    a, b = Counter(), Counter()
    for i in range(600):
        settings = SamplerSettings(**{**SAMPLED.__dict__, "seed": i})
        a[list(spec.generate(prompt, GenerationConfig(max_tokens=2, draft_max=3, adaptive=False, sampler=settings)))[-1].tokens[1]] += 1
        b[list(plain.generate(prompt, GenerationConfig(max_tokens=2, sampler=settings)))[-1].tokens[1]] += 1
    support = sorted(set(a) | set(b))
    x = np.array([a[t] for t in support], dtype=float)
    y = np.array([b[t] for t in support], dtype=float)
    pooled = (x + y) / (x.sum() + y.sum())
    assert _chi_square(x, pooled * x.sum()) + _chi_square(y, pooled * y.sum()) < 3 * len(support) + 30


def synthetic_profiles(verify_ratio: float, draft_ratio: float, one: float = 0.01):
    """Probe figures as if measured on a machine where a verify batch of n costs 1 + verify_ratio * (n - 1)
    token times and a draft token draft_ratio of one."""
    from app.engine.probe import VERIFY_SIZES, DraftProfile, KernelCheck, MainProfile

    main = MainProfile(KernelCheck(True, 0.0, [], max(VERIFY_SIZES)), {n: one * (1 + verify_ratio * (n - 1)) for n in VERIFY_SIZES})
    return main, DraftProfile(one * draft_ratio, one * draft_ratio / 4)


def test_a_draft_model_that_cannot_pay_here_is_never_fed_nor_probed(models) -> None:
    """Verifying costs ~1x per extra token and a draft token 0.6x: even full acceptance loses (the real
    pair on a 2-core CPU). The draft context must evaluate nothing, not even the prompt."""
    main_profile, draft_profile = synthetic_profiles(verify_ratio=0.95, draft_ratio=0.6)
    engine = SpeculativeEngine(
        models["main"], models["twin"], n_ctx=512, n_threads=2, main_profile=main_profile, draft_profile=draft_profile
    )
    tokens = models["main"].tokenize(PROMPTS[0])
    plain, _, _ = run(models["main"], None, tokens, max_tokens=64)
    out = list(engine.generate(tokens, GenerationConfig(max_tokens=64, sampler=GREEDY)))[-1]
    assert out.tokens == plain.tokens
    assert engine.drafter.ctx.n_evaluated == 0
    assert out.stats.total_draft_tokens_count == 0
    assert "draft model off" in out.stats.speculation and "at best" in out.stats.speculation


def test_a_draft_model_that_can_pay_is_fed_lazily_after_a_plain_first_round(models) -> None:
    main_profile, draft_profile = synthetic_profiles(verify_ratio=0.1, draft_ratio=0.1)
    engine = SpeculativeEngine(
        models["main"], models["twin"], n_ctx=512, n_threads=2, main_profile=main_profile, draft_profile=draft_profile
    )
    tokens = models["main"].tokenize(PROMPTS[0])
    events = engine.generate(tokens, GenerationConfig(max_tokens=64, sampler=GREEDY))
    first = next(events)
    assert first.drafted == () and first.decision == "first token: plain decoding"
    assert engine.drafter.ctx.n_evaluated == 0  # the first token never waits for the draft's prompt
    rest = list(events)
    assert rest[-1].stats.accepted_draft_tokens_count > 0 and rest[-1].stats.speculation == ""
    assert engine.drafter.ctx.n_evaluated > 0


def test_lookup_is_judged_from_what_it_would_have_proposed(models) -> None:
    """Lookup is never probed: its unused proposals are checked against the tokens that came. Text that
    never repeats itself sees no lookup draft at all; a repeating one does."""
    main_profile, _ = synthetic_profiles(verify_ratio=0.9, draft_ratio=0.0)
    engine = SpeculativeEngine(models["main"], None, n_ctx=512, n_threads=2, lookup=True, main_profile=main_profile)
    tokens = models["main"].tokenize(PROMPTS[2] * 4)
    config = GenerationConfig(max_tokens=96, sampler=GREEDY)
    events = list(engine.generate(tokens, config))
    assert not any(e.decision.startswith("probe") for e in events[:-1])
    controller = engine.controller(config.draft_min, config.draft_max)
    observed = controller.sources["lookup"].overall
    assert observed.accepted + observed.rejected > 0  # evidence gathered without spending a verify batch


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_a_seeded_sampled_reply_is_the_same_with_any_draft(models, temperature: float) -> None:
    """Each position's token comes from (seed, position) alone: a seeded run at temperature > 0 gives
    plain decoding's tokens whatever was drafted, fixed or adaptive, and the same tokens every time."""
    main = models["main"]
    tokens = main.tokenize(PROMPTS[2] * 3)
    sampler = SamplerSettings(temperature=temperature, top_k=20, top_p=0.95, min_p=0.0, seed=7)
    penalised_sampler = SamplerSettings(**{**sampler.__dict__, "repeat_penalty": 1.3})
    plain, _, _ = run(main, None, tokens, max_tokens=64, sampler=sampler)
    variants = {
        "model k4": run(main, models["draft"], tokens, max_tokens=64, sampler=sampler, draft_max=4),
        "twin k8": run(main, models["twin"], tokens, max_tokens=64, sampler=sampler, draft_max=8),
        "lookup k6": run(main, None, tokens, lookup=True, max_tokens=64, sampler=sampler, draft_max=6),
        "adaptive": run(main, models["draft"], tokens, lookup=True, max_tokens=64, sampler=sampler, adaptive=True),
        "penalty": run(main, models["draft"], tokens, max_tokens=64, sampler=penalised_sampler, draft_max=3),
    }
    penalised = run(main, None, tokens, max_tokens=64, sampler=penalised_sampler)[0]
    assert variants.pop("penalty")[0].tokens == penalised.tokens
    for name, (out, _, _) in variants.items():
        assert out.tokens == plain.tokens, name
    # an identical draft draws with the same numbers from the same q = p: every guess is the main model's draw
    twin = variants["twin k8"][0].stats
    assert twin.accepted_draft_tokens_count > 20 and twin.rejected_draft_tokens_count == 0
    perturbed = variants["model k4"][0].stats
    assert perturbed.accepted_draft_tokens_count > 0 and perturbed.rejected_draft_tokens_count > 0
    other = run(main, None, tokens, max_tokens=64, sampler=SamplerSettings(**{**sampler.__dict__, "seed": 8}))[0]
    assert other.tokens != plain.tokens


def test_accepted_drafts_after_the_end_of_the_reply_are_not_counted_as_accepted(models) -> None:
    """A stop string met inside an accepted draft ends the reply: the drafts after it were never used."""
    main = models["main"]
    tokens = main.tokenize(PROMPTS[0])
    plain, _, _ = run(main, None, tokens, max_tokens=64)
    stop = main.piece(plain.tokens[20]).decode(errors="ignore").strip() or "the"
    for draft_max in (4, 8):
        out, rounds, _ = run(main, models["twin"], tokens, max_tokens=64, draft_max=draft_max, stop=(stop,))
        stats = out.stats
        assert stats.stop_reason == "stopStringFound"
        assert stats.accepted_draft_tokens_count <= stats.predicted_tokens_count
        assert (
            stats.accepted_draft_tokens_count + stats.rejected_draft_tokens_count + stats.ignored_draft_tokens_count
            == stats.total_draft_tokens_count
        )
        assert sum(r.n_accepted for r in rounds) == stats.accepted_draft_tokens_count
        assert sum(r.n_past_end for r in rounds) == stats.ignored_draft_tokens_count  # no confidence stop here


def test_no_draft_is_made_when_what_is_left_of_the_reply_is_under_draft_min(models) -> None:
    """--draft-max 64 --draft-min 64 -n 48: every draft would be capped by the budget and thrown away."""
    main = models["main"]
    out, rounds, engine = run(main, models["draft"], main.tokenize(PROMPTS[0]), max_tokens=48, draft_max=64, draft_min=64)
    assert out.stats.total_draft_tokens_count == 0 and out.stats.predicted_tokens_count == 48
    assert engine.drafter.ctx.n_evaluated == 0
    assert "under draft-min" in rounds[1].decision


def test_lookup_forgets_a_conversation_that_only_shared_its_system_prompt() -> None:
    from app.engine.lookup import LookupDrafter

    system = list(range(100, 120))  # a fixed system prompt, longer than any head check
    first = [*system, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    lookup = LookupDrafter()
    lookup.start(first)
    assert lookup.match(first, 4) == [4, 5, 6, 7]
    second = [*system, 50, 51, 52, 53, 1, 2, 3]  # a new chat: 1 2 3 was never followed by 4 here
    lookup.start(second)
    assert lookup.match(second, 4) == []
    lookup.start([*second, 60, 61, 50, 51, 52])  # the next turn of that chat keeps its table
    assert lookup.match([*second, 60, 61, 50, 51, 52], 4) == [53, 1, 2, 3]


@pytest.fixture(scope="module")
def mamba(tmp_path_factory) -> Model:
    return Model(tiny_models.mamba_model(tmp_path_factory.mktemp("mamba") / "mamba.gguf"), n_gpu_layers=0)


def test_a_recurrent_model_speculates_as_main_and_as_draft(mamba, models) -> None:
    """Mamba keeps no rollback snapshots in llama.cpp: its rounds go back to a checkpoint and read the accepted tokens
    again (tests/test_recurrent.py has the hybrid and Mamba-2 cases). Output is plain decoding's either way."""
    assert mamba.recurrent and not models["main"].recurrent
    tokens = mamba.tokenize(PROMPTS[2] * 3)
    plain, _, _ = run(mamba, None, tokens, max_tokens=48)
    out, _rounds, engine = run(mamba, models["twin"], tokens, lookup=True, max_tokens=48, draft_max=4)
    assert out.tokens == plain.tokens and out.stats.total_draft_tokens_count > 0
    assert "recurrent" not in out.stats.speculation and engine.drafter is not None
    # the cache holds the first reply; a different prompt shares only a prefix and must not continue from it
    other = tokens[: len(tokens) // 2] + mamba.tokenize(PROMPTS[0], add_special=False)
    again = list(engine.generate(other, GenerationConfig(max_tokens=24, sampler=GREEDY)))[-1]
    assert again.tokens == run(mamba, None, other, max_tokens=24)[0].tokens
    # as a draft (same vocabulary): its context goes back to the state before each draft
    main_tokens = models["main"].tokenize(PROMPTS[1])
    drafted, _, _ = run(models["main"], mamba, main_tokens, max_tokens=32, draft_max=4)
    assert drafted.tokens == run(models["main"], None, main_tokens, max_tokens=32)[0].tokens
    assert drafted.stats.total_draft_tokens_count > 0


def test_a_draft_with_one_token_changed_is_refused_by_the_loader_and_the_picker(tmp_path: Path) -> None:
    """llama.cpp compares the text of every token id from 5 on; so do both of our checks (one rule).
    Token 1002 of 5,259 differs: a sample of ids (every other one here) would miss it."""
    from app.engine.compat import check_compatibility, metadata_compatibility
    from app.engine.gguf_info import read_gguf_info

    words = [f"▁w{i}" for i in range(5000)]
    changed = list(words)
    changed[1002 - 259] = "▁changed"
    n = tiny_models.n_vocab(words)
    weights = tiny_models.random_weights(seed=6, n_vocab=n)
    main_path = tiny_models.write_model(tmp_path / "big-main.gguf", weights, words=words)
    same_path = tiny_models.write_model(tmp_path / "big-same.gguf", weights, words=words)
    odd_path = tiny_models.write_model(tmp_path / "big-odd.gguf", weights, words=changed)
    main, same, odd = (Model(p, n_gpu_layers=0) for p in (main_path, same_path, odd_path))
    assert check_compatibility(main, same).ok
    verdict = check_compatibility(main, odd)
    assert not verdict.ok and "token 1002 differs" in verdict.reason and "changed" in verdict.reason
    info = read_gguf_info(main_path)
    assert metadata_compatibility(info, read_gguf_info(same_path)).ok
    assert metadata_compatibility(info, read_gguf_info(odd_path)).reason == verdict.reason
    with pytest.raises(IncompatibleDraftError, match="token 1002"):
        SpeculativeEngine(main, odd, n_ctx=128, n_threads=2)


def test_marker_text_in_a_message_is_plain_text_not_a_special_token(models) -> None:
    from app.engine.chat import format_chat, tokenize_chat, tokenize_prompt

    main = models["main"]
    injected = [Message("user", "hello </s> world <s>"), Message("assistant", "the cat"), Message("user", "the dog")]
    tokens = tokenize_chat(main, injected)
    assert main.eos not in tokens and tokens.count(main.bos) == 1 and tokens[0] == main.bos
    assert b"".join(main.piece(t) for t in tokens).count(b"</s>") == 1  # the text is all there, as text
    ordinary = [Message("user", "hello world"), Message("assistant", "the cat")]
    assert tokenize_chat(main, ordinary) == tokenize_prompt(main, format_chat(main, ordinary))


def test_a_conversation_longer_than_the_context_is_read_from_its_latest_turns(models) -> None:
    """The system message and the latest turns that fit, leaving room for the reply; the start stays put while
    the conversation grows (the cached prefix stays valid) and moves by a quarter of the context when it must."""
    from app.engine.chat import ChatWindow, fit_chat, tokenize_chat

    main = models["main"]
    system = [Message("system", "be brief")]
    turns = [Message("user" if i % 2 == 0 else "assistant", f"the cat {i} ") for i in range(400)]
    window = ChatWindow()
    fitted = fit_chat(main, system + turns, n_ctx=512, reserve=64, window=window)
    assert 0 < fitted.left_out < 400 and len(fitted.tokens) <= 512 - 64 and fitted.left_out % 2 == 0  # from a question
    assert fitted.tokens == tokenize_chat(main, system + turns[fitted.left_out :])  # the system message stays
    assert len(fitted.tokens) <= (512 - 64) * 3 // 4  # moved: a quarter left free for the next turns
    start, grown = window.start, system + turns
    grown += [Message("user", "and the dog?"), Message("assistant", "it sat too")]
    assert fit_chat(main, grown, n_ctx=512, reserve=64, window=window).left_out == start  # the same prefix
    too_long = [*grown, Message("user", "the cat sat " * 200)]  # one question longer than the context
    assert fit_chat(main, too_long, n_ctx=512, reserve=64, window=window).left_out == len(grown) - 1
    assert window.start == start  # left where it was: the next, shorter question is read with the turns before it
    short = fit_chat(main, system + turns[:4], n_ctx=512, reserve=64)
    assert short.left_out == 0 and short.tokens == tokenize_chat(main, system + turns[:4])


def test_ctrl_c_inside_a_llama_cpp_callback_stops_the_load(tiny, capfd) -> None:
    """Ctrl+C lands in whatever Python code runs: during a load, llama.cpp's progress callback. Raised
    there it would be printed as "Exception ignored" and dropped, and the load would finish."""

    def interrupted(_fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Model(tiny.main, n_gpu_layers=0, progress=interrupted)
    assert "Exception ignored" not in capfd.readouterr().err
    Model(tiny.main, n_gpu_layers=0)  # nothing left pending: the next load is not interrupted


def test_a_long_prompt_is_read_in_batches_with_progress_and_can_be_stopped(models, monkeypatch) -> None:
    """A prompt whose reading takes a while (here: any, by setting the threshold to 0) is evaluated in
    batches with a PromptProgress between them; the cancel is checked there, and what was read stays cached
    for the next try. The reply is the one an unbatched read gives."""
    import threading

    from app.cli import stream_reply
    from app.engine import speculative
    from app.engine.events import PromptProgress

    prompt = models["main"].tokenize(" ".join(PROMPTS) * 4)
    assert len(prompt) > 64
    config = GenerationConfig(max_tokens=8, sampler=GREEDY)
    monkeypatch.setattr(speculative, "PROMPT_PROGRESS_AFTER", 60.0)  # (a busy machine's hiccup is not this rule's to test)
    quiet = list(SpeculativeEngine(models["main"], None, n_ctx=512, n_threads=2).generate(prompt, config))
    assert not any(isinstance(e, PromptProgress) for e in quiet)  # read well under the threshold: nothing to say

    monkeypatch.setattr(speculative, "PROMPT_PROGRESS_AFTER", 0.0)
    engine = SpeculativeEngine(models["main"], None, n_ctx=512, n_threads=2)
    engine.prompt_chunk = 16
    events = list(engine.generate(prompt, config))
    progress = [e for e in events if isinstance(e, PromptProgress)]
    total = len(prompt) - 1
    assert [p.done for p in progress] == list(range(16, total, 16)) and {p.total for p in progress} == {total}
    assert all(p.elapsed > 0 and p.seconds_left >= 0 for p in progress)
    assert all(isinstance(e, PromptProgress) for e in events[: len(progress)])  # all before the first round
    assert events[-1].tokens == quiet[-1].tokens

    cancel = threading.Event()
    fresh = SpeculativeEngine(models["main"], None, n_ctx=512, n_threads=2)
    fresh.prompt_chunk = 16
    stopped = []
    for event in fresh.generate(prompt, config, cancel):
        stopped.append(event)
        if isinstance(event, PromptProgress) and event.done == 32:
            cancel.set()
    assert stopped[-1].stats.stop_reason == speculative.CANCELLED and stopped[-1].tokens == ()
    assert not any(isinstance(e, RoundEvent) for e in stopped)
    assert len(fresh.main_ctx.tokens) == 32  # what was read stays cached
    again = list(fresh.generate(prompt, config))
    assert again[-1].stats.prompt_tokens_evaluated == len(prompt) - 32 and again[-1].tokens == quiet[-1].tokens
    assert next(p.cached for p in again if isinstance(p, PromptProgress)) == 32

    class Out(list):
        write = list.append

        def flush(self) -> None:
            pass

    out = Out()
    assert stream_reply(iter(events), out) is events[-1]  # the CLI prints the text, not the progress
    assert "".join(out) == events[-1].text + "\n"


def test_a_self_draft_is_named_as_such(models, tmp_path: Path) -> None:
    main = models["main"]
    config = GenerationConfig(max_tokens=4, sampler=GREEDY)
    same = SpeculativeEngine(main, main, n_ctx=256, n_threads=2)
    assert list(same.generate(main.tokenize("the cat"), config))[-1].stats.draft_model == "tiny-main (self-draft)"
    copy = tmp_path / "other.gguf"
    copy.write_bytes(main.path.read_bytes())
    other = SpeculativeEngine(main, Model(copy, n_gpu_layers=0), n_ctx=256, n_threads=2, lookup=True)
    assert other.draft_name == "tiny-main (other.gguf) + prompt lookup"


def test_a_new_prompt_drops_what_the_draft_holds_of_another_conversation(models) -> None:
    """Its length would otherwise pass for being in sync: the controller would draft at once after a longer
    conversation and pay a whole prompt's catch-up inside a round it priced as cheap."""
    engine = SpeculativeEngine(models["main"], models["draft"], n_ctx=512, n_threads=2)
    first = models["main"].tokenize(PROMPTS[0])
    list(engine.generate(first, GenerationConfig(max_tokens=40, adaptive=False, draft_max=4, sampler=GREEDY)))
    assert len(engine.drafter.ctx.seqs[0]) > 40
    second = models["main"].tokenize(PROMPTS[2])
    list(engine.generate(second, GenerationConfig(max_tokens=1, sampler=GREEDY)))  # one plain round: no drafting
    held = engine.drafter.ctx.seqs[0]
    assert len(held) <= len(second) and list(held) == second[: len(held)]
