"""Exactness on K-quant models: the kernel self-check, --exact, and the near-tie rule when not exact.

Tiny Q4_K_M models made by llama.cpp's own quantizer reach the same kernels a real K-quant model does
(repacked K-quants on AVX2/AVX-512 CPUs, llama.cpp's tiled K-quant matmul for batches of 8+), which
the F16/Q4_1 test models never touch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.engine.backend import Context, Model
from app.engine.kernels import PLAIN_CHOICE
from app.engine.probe import VERIFY_SIZES, measure_main, probe_tokens, profile_main
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig, SpeculativeEngine
from tests import tiny_models

GREEDY = SamplerSettings(temperature=0.0)
PROMPTS = ["the cat sat on the mat and the dog", "def sort ( x ) : return x", "hello world , hello world , hello"]


@pytest.fixture(scope="module")
def kquant(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kquant")
    return tiny_models.k_quant_model(root), tiny_models.k_quant_model(root, noise=0.3, name="tiny-q4km-draft")


def direct_comparison(model: Model, sizes: tuple[int, ...]) -> dict[int, float]:
    """Largest |logit| difference per batch size, batch against one token at a time (no probe code)."""
    tokens = probe_tokens(model, 8 + max(sizes) + 1)
    ctx = Context(model, 64, 2, n_batch=32)
    ctx.decode(tokens[:8])
    reference = []
    for token in tokens[8:]:
        ctx.decode([token], all_logits=True)
        reference.append(ctx.logits()[0].copy())
    differences = {}
    for n in sizes:
        ctx.truncate(8)
        ctx.decode(tokens[8 : 8 + n], all_logits=True)
        differences[n] = float(np.abs(ctx.logits() - np.stack(reference[:n])).max())
    ctx.close()
    return differences


@pytest.mark.parametrize("choice", [None, PLAIN_CHOICE], ids=["default-kernels", "exact-kernels"])
def test_self_check_agrees_with_a_direct_comparison(kquant, choice) -> None:
    model = Model(kquant[0], kernels=choice)
    check = measure_main(model, 2).kernels
    direct = direct_comparison(model, VERIFY_SIZES)
    differing = [n for n, d in direct.items() if d > 0]
    assert check.differing_sizes == differing
    assert check.exact == (not differing)
    assert check.exact_up_to == (min(differing) - 1 if differing else max(VERIFY_SIZES))
    # the probe also checks the token after each batch, which reads the K/V the batch wrote
    assert check.max_difference >= max(direct.values()) and (check.max_difference > 0) == bool(differing)


def test_self_check_is_cached_per_model_file(kquant, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    model = Model(kquant[0])
    first = profile_main(model, 2)
    import app.engine.probe as probe

    def fail(*_args, **_kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(probe, "measure_main", fail)
    assert profile_main(model, 2) == first
    with pytest.raises(AssertionError, match="measured again"):  # another thread count is another machine setting
        profile_main(model, 1)


def test_a_changed_model_file_is_measured_again(kquant, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(kquant[0].read_bytes())
    profile_main(Model(copy), 2)
    import app.engine.probe as probe

    calls = []
    real = probe.measure_main
    monkeypatch.setattr(probe, "measure_main", lambda *a, **k: calls.append(1) or real(*a, **k))
    profile_main(Model(copy), 2)
    assert calls == []
    import os

    # same bytes, new mtime: a re-downloaded file is checked again
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    profile_main(Model(copy), 2)
    assert calls == [1]


def greedy(engine: SpeculativeEngine, prompt: list[int], **config):
    config.setdefault("sampler", GREEDY)
    return list(engine.generate(prompt, GenerationConfig(max_tokens=80, **config)))[-1]


@pytest.mark.parametrize("draft_max", [1, 4, 8])
def test_exact_mode_is_token_identical_to_plain_on_a_k_quant_model(kquant, draft_max) -> None:
    main = Model(kquant[0], kernels=PLAIN_CHOICE)  # what load_engine does for --exact
    draft = Model(kquant[1])
    plain_engine = SpeculativeEngine(main, None, n_ctx=512, n_threads=2)
    engine = SpeculativeEngine(main, draft, n_ctx=512, n_threads=2, lookup=True, exact=True)
    drafted = 0
    for text in PROMPTS:
        prompt = main.tokenize(text * 2)
        plain = greedy(plain_engine, prompt)
        for adaptive in (False, True):
            spec = greedy(engine, prompt, draft_max=draft_max, adaptive=adaptive)
            assert spec.tokens == plain.tokens, (text, adaptive)
            assert spec.stats.exact
            assert max(spec.stats.draft_length_histogram) <= engine.main_profile.kernels.exact_up_to - 1
            drafted += spec.stats.total_draft_tokens_count
    assert drafted > 0  # speculation really ran


def test_exact_mode_with_no_exact_batch_drafts_nothing(kquant) -> None:
    from app.engine.probe import KernelCheck, MainProfile

    main = Model(kquant[0])
    never = MainProfile(KernelCheck(False, 0.5, list(VERIFY_SIZES[1:]), 1), {n: 0.01 * n for n in VERIFY_SIZES})
    engine = SpeculativeEngine(main, Model(kquant[1]), n_ctx=512, n_threads=2, lookup=True, exact=True, main_profile=never)
    out = greedy(engine, main.tokenize(PROMPTS[0]), draft_max=4, adaptive=False)
    assert out.stats.total_draft_tokens_count == 0 and out.stats.exact
    assert "--exact: drafting off" in out.stats.speculation


def plain_logits_at(main: Model, prompt: list[int], reply: tuple[int, ...], i: int) -> np.ndarray:
    """The main model's logits for reply position i, decoded token by token as plain decoding does."""
    ctx = Context(main, 512, 2)
    ctx.decode(prompt[:-1])
    for token in [prompt[-1], *reply[:i]]:
        ctx.decode([token])
    row = ctx.logits()[-1].copy()
    ctx.close()
    return row


def assert_first_difference_is_a_near_tie(main: Model, engine: SpeculativeEngine, prompt: list[int], plain, spec) -> bool:
    """Where speculative output first differs from plain output, plain decoding's own logits must rank
    the two tokens within the kernels' measured disagreement: both are the main model's choice up to
    floating-point rounding. Returns whether the outputs differed."""
    if spec.tokens == plain.tokens:
        return False
    i = next((j for j, (a, b) in enumerate(zip(plain.tokens, spec.tokens, strict=False)) if a != b), None)
    assert i is not None, "one output is a prefix of the other: a stop differed, not a token"
    row = plain_logits_at(main, prompt, plain.tokens, i)
    gap = float(row[plain.tokens[i]] - row[spec.tokens[i]])
    bound = engine.main_profile.kernels.rounding_bound
    assert 0.0 <= gap <= bound, f"position {i}: gap {gap} beyond the kernels' disagreement {bound}"
    assert not spec.stats.exact
    return True


def test_default_kernels_differ_from_plain_only_at_near_ties(kquant) -> None:
    main, draft = Model(kquant[0]), Model(kquant[1])
    plain_engine = SpeculativeEngine(main, None, n_ctx=512, n_threads=2)
    engine = SpeculativeEngine(main, draft, n_ctx=512, n_threads=2, lookup=True)
    for text in PROMPTS:
        prompt = main.tokenize(text * 2)
        plain = greedy(plain_engine, prompt)
        for k in (4, 8):
            spec = greedy(engine, prompt, draft_max=k, adaptive=False)
            if not assert_first_difference_is_a_near_tie(main, engine, prompt, plain, spec) and engine.exact_kernels:
                assert spec.stats.exact


def test_the_near_tie_rule_fails_on_a_real_difference(kquant) -> None:
    """The rule is not vacuous: a reply that takes the main model's second-best token where the two are
    far apart is caught."""
    from types import SimpleNamespace

    main = Model(kquant[0])
    engine = SpeculativeEngine(main, None, n_ctx=512, n_threads=2)
    prompt = main.tokenize(PROMPTS[0])
    plain = greedy(engine, prompt)
    row = plain_logits_at(main, prompt, plain.tokens, 0)
    order = np.argsort(row)[::-1]
    far = next(int(t) for t in order[1:] if row[order[0]] - row[t] > engine.main_profile.kernels.rounding_bound + 1e-3)
    fake = SimpleNamespace(tokens=(far, *plain.tokens[1:]), stats=SimpleNamespace(exact=False))
    with pytest.raises(AssertionError, match="beyond the kernels' disagreement"):
        assert_first_difference_is_a_near_tie(main, engine, prompt, plain, fake)


def decode_token_by_token(model: Model, tokens: list[int], n_seq: int, unified: bool, beside: bool) -> np.ndarray:
    """Sequence 0's logits for each token, decoded one at a time; `beside`: another sequence's token in each decode."""
    ctx = Context(model, 256, 2, n_seq=n_seq, unified=unified)
    rows = []
    for i, token in enumerate(tokens):
        parts = [(0, [token], 1)] + ([(1, [tokens[(i * 7) % len(tokens)]], 1)] if beside else [])
        rows.append(ctx.decode_parts(parts)[0][-1].copy())
    ctx.close()
    return np.stack(rows)


def test_a_stream_per_sequence_decodes_as_alone_whatever_runs_beside_it(kquant) -> None:
    """In one pool of cells a sequence's cells sit among another's, which moves attention's rounding (seen: 1e-5 on
    this model); a stream per sequence (what --exact takes with --parallel) gives plain decoding's logits, bit for bit."""
    model = Model(kquant[0], kernels=PLAIN_CHOICE)
    tokens = model.tokenize(PROMPTS[0] * 3)
    alone = decode_token_by_token(model, tokens, 1, True, False)
    assert np.array_equal(decode_token_by_token(model, tokens, 4, False, True), alone)
    shared = Context(model, 64, 2, n_seq=4)
    assert shared.shared_cells and not Context(model, 64, 2, n_seq=4, unified=False).shared_cells
    shared.close()
