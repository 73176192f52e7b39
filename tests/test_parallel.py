"""Several replies at once: one main-model batch per round over every active sequence (engine/rounds.py), the
host serving --parallel N, and the controller pricing drafts at the batch's marginal cost."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from app.config import Config
from app.engine.backend import Model
from app.engine.controller import Batch, Decision, DraftController
from app.engine.errors import ContextOverflowError
from app.engine.events import Finished, RoundEvent
from app.engine.loading import EngineSpec
from app.engine.rounds import Rounds
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig, SpeculativeEngine, Verify
from app.host import DONE, READER_BACKLOG, EngineHost, Job, JobFailed

GREEDY = SamplerSettings(temperature=0.0)
PROMPTS = ["the cat sat on the mat", "def sort ( x ) : return", "hello world , hello", "one two three four five"]


@pytest.fixture(scope="module")
def models(tiny) -> dict[str, Model]:
    return {name: Model(getattr(tiny, name), n_gpu_layers=0) for name in ("main", "draft")}


def engine_of(models, n_seq: int, draft: bool = True, **kw) -> SpeculativeEngine:
    return SpeculativeEngine(models["main"], models["draft"] if draft else None, n_ctx=256, n_threads=2, lookup=True,
                             n_seq=n_seq, **kw)  # fmt: skip


def config(**kw) -> GenerationConfig:
    kw.setdefault("sampler", GREEDY)
    kw.setdefault("max_tokens", 48)
    return GenerationConfig(**kw)


def run_together(engine: SpeculativeEngine, prompts: list[list[int]], configs: list[GenerationConfig],
                 cancels: dict[int, threading.Event] | None = None, cancel_after: int = 0) -> dict[int, list]:  # fmt: skip
    """Start every prompt on one Rounds, step until all end; key -> its events (then None or the exception)."""
    rounds = Rounds(engine)
    out: dict[int, list] = {i: [] for i in range(len(prompts))}
    for i, (prompt, cfg) in enumerate(zip(prompts, configs, strict=True)):
        for key, item in rounds.start(i, prompt, cfg, (cancels or {}).get(i)):
            out[key].append(item)
    steps = 0
    while rounds.busy:
        for key, item in rounds.round():
            out[key].append(item)
        steps += 1
        if cancels and steps == cancel_after:
            for cancel in cancels.values():
                cancel.set()
    return out


def finished(events: list) -> Finished:
    assert events[-1] is None, events[-1]
    return events[-2]


def test_replies_batched_together_equal_each_reply_alone(models) -> None:
    """Greedy, with a draft model, fixed and adaptive k: each of four sequences generated in shared decodes
    gives the tokens it gives alone (the tiny models' kernels are batch-invariant), and the decodes were shared."""
    prompts = [models["main"].tokenize(p) for p in PROMPTS]
    configs = [config(draft_max=4, adaptive=False), config(), config(draft_max=2, adaptive=False), config(max_tokens=20)]
    alone = engine_of(models, 1)
    expected = [[e for e in alone.generate(p, c)][-1] for p, c in zip(prompts, configs, strict=True)]
    engine = engine_of(models, 4)
    together = run_together(engine, prompts, configs)
    for i, reference in enumerate(expected):
        reply = finished(together[i])
        assert reply.tokens == reference.tokens and reply.text == reference.text, i
        assert reply.stats.widest_batch > 1 + max(len(r.drafted) for r in together[i][:-2] if isinstance(r, RoundEvent))
    assert max(finished(together[i]).stats.widest_batch for i in range(4)) > 5  # several sequences in one decode


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch(models) -> None:
    prompts = [models["main"].tokenize(p) for p in PROMPTS[:3]]
    sampled = [config(sampler=SamplerSettings(temperature=0.9, seed=s), draft_max=3, adaptive=False) for s in (1, 2, 3)]
    alone = engine_of(models, 1)
    expected = [[e for e in alone.generate(p, c)][-1].tokens for p, c in zip(prompts, sampled, strict=True)]
    together = run_together(engine_of(models, 3), prompts, sampled)
    assert [finished(together[i]).tokens for i in range(3)] == expected


def test_a_failing_or_cancelled_reply_leaves_the_others_alone(models) -> None:
    main = models["main"]
    prompts = [main.tokenize(PROMPTS[0]), main.tokenize("word " * 400), main.tokenize(PROMPTS[2])]
    engine = engine_of(models, 3)
    alone = engine_of(models, 1)
    reference = [e for e in alone.generate(prompts[0], config())][-1]
    cancel = threading.Event()
    out = run_together(engine, prompts, [config(), config(), config(max_tokens=200)], cancels={2: cancel}, cancel_after=3)
    assert isinstance(out[1][-1], ContextOverflowError)  # too long for a sequence: that reply fails at once
    assert finished(out[0]).tokens == reference.tokens
    stopped = finished(out[2])
    assert stopped.stats.stop_reason == "userStopped" and 0 < len(stopped.tokens) < 200


def test_a_failed_decode_ends_only_the_replies_in_it(models, monkeypatch) -> None:
    engine = engine_of(models, 2, draft=False)
    rounds = Rounds(engine)
    seqs = {}
    for i, text in enumerate(PROMPTS[:2]):
        rounds.start(i, models["main"].tokenize(text), config())
        seqs[i] = next(seq for seq, active in rounds._active.items() if active.key == i)
    real = engine.decode

    def failing(needs: list[Verify]) -> None:
        if any(need.seq == seqs[0] and need.logits for need in needs):
            raise RuntimeError("boom")
        real(needs)

    monkeypatch.setattr(rounds, "_groups", lambda waiting: [[item] for item in waiting])  # one decode each
    monkeypatch.setattr(engine, "decode", failing)
    ended: dict[int, object] = {}
    while rounds.busy:
        for key, item in rounds.round():
            if item is None or isinstance(item, BaseException):
                ended[key] = item
    assert isinstance(ended[0], RuntimeError) and ended[1] is None


def test_a_continuing_conversation_lands_on_the_sequence_that_holds_its_prefix(models) -> None:
    engine = engine_of(models, 3, draft=False)
    first, second = models["main"].tokenize(PROMPTS[0]), models["main"].tokenize(PROMPTS[1])
    out = run_together(engine, [first, second], [config(max_tokens=8), config(max_tokens=8)])
    seq_of_first = next(s for s in range(3) if engine.main_ctx.seqs[s][: len(first) - 1] == first[:-1])
    follow_up = [*first, *finished(out[0]).tokens, *models["main"].tokenize(" and then")]
    assert engine.pick_sequence(follow_up, busy=set()) == seq_of_first
    assert engine.pick_sequence(follow_up, busy={seq_of_first}) not in (seq_of_first,)
    reply = run_together(engine, [follow_up], [config(max_tokens=4)])
    assert finished(reply[0]).stats.prompt_tokens_evaluated < len(follow_up) - len(first)  # the prefix was reused


def fake_engine(n_batch: int, exact_up_to: int | None) -> SimpleNamespace:
    kernels = SimpleNamespace(exact_up_to=exact_up_to or 1)
    return SimpleNamespace(main_ctx=SimpleNamespace(n_batch=n_batch), exact_cap=None if exact_up_to is None else exact_up_to - 1,
                           main_profile=SimpleNamespace(kernels=kernels))  # fmt: skip


def widths(engine, needs: list[tuple[int, bool]]) -> list[list[int]]:
    rounds = Rounds(engine)
    waiting = [(i, SimpleNamespace(need=Verify(i, [0] * n, logits))) for i, (n, logits) in enumerate(needs)]
    return [[len(a.need.tokens) for _, a in group] for group in rounds._groups(waiting)]


def test_needs_are_packed_into_decodes_no_wider_than_the_batch_or_the_exact_width() -> None:
    needs = [(5, True), (9, True), (16, False), (1, True), (64, False)]
    assert widths(fake_engine(64, None), needs) == [[5, 9, 16, 1], [64]]
    # --exact with batches exact up to 4 tokens: verify rows in decodes of at most 4, prompt chunks alone
    assert widths(fake_engine(64, 4), [(1, True), (3, True), (2, True), (16, False), (2, True)]) == [[1, 3], [2, 2], [16]]


def test_a_draft_costs_its_marginal_share_of_a_shared_batch() -> None:
    """Verify costs of a CPU whose batches grow dear past 8 tokens: alone, a long draft pays; with three other
    sequences verifying, four drafts of k make a decode of 4(k + 1) tokens, dear where 4 plain tokens were
    cheap, and drafting shrinks; where a bigger batch is nearly free (a GPU), drafting stays."""
    ctl = DraftController(0, 8)
    ctl.seed({1: 0.010, 2: 0.011, 4: 0.012, 8: 0.014, 9: 0.015, 12: 0.030, 13: 0.032, 16: 0.040, 17: 0.042, 21: 0.052}, 0.001, 0.0005)
    for _ in range(30):  # a model draft right 80% of the time, at 1 ms a token
        ctl.record(Decision("model", 4, ""), 4, 3, 0.004, None)
    alone = ctl.decide({"model": 8})
    busy = ctl.decide({"model": 8}, batch=Batch(3))
    assert alone.source == "model" and alone.k >= 4
    assert busy.source == "none" or busy.k < alone.k
    gpu = DraftController(0, 8)
    gpu.seed({n: 0.010 + 0.0001 * n for n in (1, 2, 4, 8, 9, 12, 13, 16, 17, 21)}, 0.0004, 0.0002)
    for _ in range(30):
        gpu.record(Decision("model", 4, ""), 4, 3, 0.0004, None)
    assert gpu.decide({"model": 8}, batch=Batch(3)).source == "model"
    assert ctl.verify_cost.samples == {}  # shared batches' times are not recorded as one sequence's cost


def job_of(prompt: str, **kw) -> Job:
    return Job(config=config(**kw), prompt=prompt)


def drain(job: Job, timeout: float = 60) -> list:
    items, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = job.take()
        except Exception:
            time.sleep(0.005)
            continue
        if item is DONE:
            return items
        items.append(item)
    raise AssertionError("the job never ended")


def test_host_generates_parallel_jobs_together_and_a_stalled_reader_holds_back_only_its_own(tiny) -> None:
    cfg = Config(main=str(tiny.main), draft=str(tiny.draft))
    cfg.settings.ctx_size, cfg.settings.threads = 256, 2
    host = EngineHost(cfg, parallel=3)
    host.start()
    try:
        # a fixed draft length: each sequence verifies 3 tokens a round, whatever the controller would make of a tiny model
        jobs = [host.submit(job_of(p, max_tokens=40, draft_max=2, adaptive=False)) for p in PROMPTS[:3]]
        results = [drain(job) for job in jobs]
        ends = [items[-1] for items in results]
        assert all(isinstance(end, Finished) for end in ends), ends
        assert max(end.stats.widest_batch for end in ends) > 3  # they shared decodes
        assert host.spec == EngineSpec(main=tiny.main, draft=str(tiny.draft), ctx_size=256, threads=2, parallel=3,
                                       gpu_layers=host.spec.gpu_layers, draft_on_gpu=host.spec.draft_on_gpu)  # fmt: skip
        # a reader that never reads: its job waits (then ends), another job runs to its end meanwhile
        stalled = Job(config=config(max_tokens=400), prompt=PROMPTS[3], reader_timeout=1.0)
        host.submit(stalled)
        time.sleep(0.3)
        other = drain(host.submit(job_of(PROMPTS[0], max_tokens=40)))
        assert isinstance(other[-1], Finished) and not stalled.stalled
        deadline = time.monotonic() + 30
        while not stalled.stalled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled.stalled
        items = drain(stalled)
        assert isinstance(items[-1], Finished) and items[-1].stats.stop_reason == "userStopped"
        assert host.counters.stalled == 1 and not host.active
    finally:
        host.stop()


def test_host_fails_one_job_and_serves_the_next(tiny) -> None:
    cfg = Config(main=str(tiny.main), draft="none")
    cfg.settings.ctx_size, cfg.settings.threads = 128, 2
    host = EngineHost(cfg, parallel=2)
    host.start()
    try:
        too_long, fine = host.submit(job_of("word " * 300)), host.submit(job_of(PROMPTS[0], max_tokens=8))
        assert isinstance(drain(too_long)[-1], JobFailed)
        assert isinstance(drain(fine)[-1], Finished)
    finally:
        host.stop()
    assert host.stopped


# ---- memory known before it is taken (#28) ---------------------------------------------------------------------------


def test_the_cache_size_is_read_from_the_header_for_each_kind_of_model(tiny, tmp_path) -> None:
    from app.engine.gguf_info import read_gguf_info
    from tests import tiny_models

    info = read_gguf_info(tiny.main)  # 2 layers, 4 KV heads of 16: keys and values in F16
    assert info.kv_bytes_per_token == 2 * (4 * 16 + 4 * 16) * 2
    lfm2 = read_gguf_info(tiny_models.lfm2_model(tmp_path / "lfm2.gguf"))  # attention in 2 of its 4 layers
    assert lfm2.kv_bytes_per_token == 2 * (4 * 16 + 4 * 16) * 2
    qwen35 = read_gguf_info(tiny_models.qwen35_model(tmp_path / "q35.gguf", tiny_models.qwen35_weights(nextn=False)))
    assert qwen35.kv_bytes_per_token == 1 * (4 * 16 + 4 * 16) * 2  # every 2nd of 2 layers attends
    assert read_gguf_info(tiny_models.mamba2_model(tmp_path / "m2.gguf")).kv_bytes_per_token is None  # no attention cache


def test_a_cache_that_cannot_fit_is_refused_in_one_line_before_anything_loads(tiny, monkeypatch) -> None:
    import app.engine.backend as backend
    from app.engine import loading
    from app.engine.errors import TandemError

    free = 16 * 2**20  # the pair's caches: 2 x 512 bytes a token x 1024 tokens x 64 sequences = 64 MiB
    monkeypatch.setattr(backend.psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
    monkeypatch.setattr(loading, "Model", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))
    spec = EngineSpec(main=tiny.main, draft=str(tiny.draft), ctx_size=1024, parallel=64, threads=2, gpu_layers=0)
    with pytest.raises(TandemError) as refused:
        loading.load_engine(spec)
    message = str(refused.value)
    assert "\n" not in message and "--parallel or --ctx-size" in message and "64 sequences of 1024 tokens" in message
    assert "needs 0.1 GiB but 0.0 GiB" in message and "main.gguf and draft.gguf" in message
    # what fits is not refused (the same pair, one sequence)
    loading.check_cache_memory("x", 2 * 512 * 2 * 256 * 2, 512, 1)


def test_the_server_says_in_one_line_why_its_models_did_not_load(tiny, monkeypatch) -> None:
    import app.engine.backend as backend

    monkeypatch.setattr(backend.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    config = Config(main=str(tiny.main), draft=str(tiny.draft))
    config.settings.set("ctx_size", 1024)
    said: list[str] = []
    host = EngineHost(config, parallel=8, on_failed=said.append)
    host.start()
    try:
        deadline = time.monotonic() + 30
        while host.state == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert host.state == "failed" and said == [host.load_error] and "--parallel or --ctx-size" in said[0]
    finally:
        host.stop()


def test_the_sequence_whose_cache_is_worth_least_is_found_by_sorting_as_by_comparing_every_pair(models) -> None:
    """pick_sequence at --parallel 64: the cache a new conversation may take is the one with the fewest tokens no other
    sequence also holds; found from neighbours in sorted order, it equals the every-pair answer."""
    import random

    engine = SpeculativeEngine(models["main"], None, n_ctx=64, n_threads=2, n_seq=64)
    rng = random.Random(3)
    stems = [[rng.randrange(300) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    for seq in range(64):
        stem = rng.choice(stems)
        engine.main_ctx.seqs[seq] = stem[: rng.randrange(len(stem) + 1)] + [rng.randrange(300) for _ in range(rng.randrange(4))]

    def brute(seq: int) -> int:
        ctx = engine.main_ctx
        return len(ctx.seqs[seq]) - max(ctx.common_prefix(ctx.seqs[seq], o) for o in range(64) if o != seq)

    assert engine._unique_tokens() == [brute(seq) for seq in range(64)]
    busy = set(range(0, 64, 3))
    free = [s for s in range(64) if s not in busy]
    expected = min(free, key=lambda s: (brute(s), len(engine.main_ctx.seqs[s])))
    assert engine.pick_sequence([999, 998], busy) == expected
    engine.main_ctx.seqs = [[] for _ in range(64)]  # (the fake caches must not reach llama.cpp at close)


# ---- a request's own draft sources inside the batch (#28 item 3) -----------------------------------------------------


def test_each_reply_drafts_only_from_its_own_sources_inside_one_batch(models) -> None:
    """Plain decoding, lookup alone and the whole set share the decodes of one pair: each reply equals plain decoding,
    drafts only from the sources it may use, and names them in its stats."""
    prompts = [models["main"].tokenize(p) for p in PROMPTS[:3]]
    plain = engine_of(models, 1)
    expected = [[e for e in plain.generate(p, config(draft_max=0))][-1].tokens for p in prompts]
    allowed = [frozenset(), frozenset({"lookup"}), None]
    # fixed length: wherever the draft model may draft, it drafts every round
    configs = [config(sources=sources, draft_max=3, adaptive=False) for sources in allowed]
    engine = engine_of(models, 3)
    together = run_together(engine, prompts, configs)
    rounds = {i: [e for e in together[i] if isinstance(e, RoundEvent)] for i in range(3)}
    assert [finished(together[i]).tokens for i in range(3)] == expected
    assert not any(r.drafted for r in rounds[0]) and finished(together[0]).stats.draft_model is None
    assert finished(together[0]).stats.speculation == "plain decoding"
    assert {r.draft_source for r in rounds[1]} <= {"lookup", "none"} and finished(together[1]).stats.draft_model == "prompt lookup"
    assert "model" in {r.draft_source for r in rounds[2]} and finished(together[2]).stats.draft_model.endswith("+ prompt lookup")
    assert finished(together[0]).stats.widest_batch > 1  # the plain reply shared decodes with the drafting ones


def test_a_request_for_plain_decoding_or_lookup_runs_beside_the_others_on_the_loaded_pair(tiny) -> None:
    """A job whose draft choice the loaded pair covers is one more sequence in its batch: it neither reloads nor waits
    for the running jobs to end."""
    cfg = Config(main=str(tiny.main), draft=str(tiny.draft))
    cfg.settings.ctx_size, cfg.settings.threads = 256, 2
    host = EngineHost(cfg, parallel=3)
    host.start()
    try:
        # a long job whose reader does not read: it holds its sequence, paused behind READER_BACKLOG unread rounds
        held = host.submit(Job(config=config(max_tokens=200), prompt=PROMPTS[0], reader_timeout=60))
        deadline = time.monotonic() + 30
        while held.events.qsize() < READER_BACKLOG and time.monotonic() < deadline:
            time.sleep(0.01)
        engine = host.engine
        reference = None
        for draft, used in (("none", None), ("lookup", "prompt lookup")):
            items = drain(host.submit(Job(config=config(max_tokens=16), prompt=PROMPTS[1], draft=draft)), timeout=20)
            reply = items[-1]
            assert isinstance(reply, Finished), reply
            assert reply.stats.draft_model == used
            assert reference is None or reply.tokens == reference
            reference = reply.tokens
            assert held in host.active and host.engine is engine  # beside the held job, on the loaded pair
        assert host.spec.draft == str(tiny.draft)
    finally:
        held.cancel.set()
        host.stop()
