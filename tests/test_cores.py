"""Threads that follow the free cores (app/engine/cores.py): the count from the machine's samples, and a decode's
result independent of it (the exactness promise rests on that)."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine import cores
from app.engine.backend import Context, Model
from app.engine.cores import FreeCores, _Sample
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig, SpeculativeEngine
from tests import tiny_models


class Machine:
    """Samples of a machine of 2 cores where this process uses `own` cores and others `others`, each 0.5 s apart."""

    def __init__(self) -> None:
        self.at = self.busy = self.own = 0.0

    def tick(self, others: float, own: float = 1.0) -> _Sample:
        self.at += 0.5
        self.busy += 0.5 * (others + own)
        self.own += 0.5 * own
        return _Sample(self.at, self.busy, self.own)


def watcher(wanted: int = 2) -> tuple[FreeCores, Machine]:
    machine = Machine()
    free = FreeCores(wanted)
    free.cores, free._last = 2, _Sample(0.0, 0.0, 0.0)
    return free, machine


def test_a_busy_core_takes_a_thread_away_and_a_free_one_gives_it_back() -> None:
    free, machine = watcher()
    assert free.update(machine.tick(others=0.1)) is None and free.threads == 2  # quiet
    assert free.update(machine.tick(others=1.0)) is None  # one sample is a moment, not a busy machine
    assert free.update(machine.tick(others=1.0)) == 1 and free.threads == 1
    assert "1 of 2 threads" in free.describe() and "1.0 of 2 cores" in free.describe()
    assert free.update(machine.tick(others=1.0, own=1.0)) is None  # its own thread is not counted against it
    assert free.update(machine.tick(others=0.0)) is None
    assert free.update(machine.tick(others=0.0)) == 2 and free.describe() == "2 threads"


def test_light_work_elsewhere_keeps_every_thread_and_never_below_one() -> None:
    free, machine = watcher()
    for _ in range(4):
        assert free.update(machine.tick(others=0.5)) is None  # half a core: both threads still pay
    for _ in range(2):
        free.update(machine.tick(others=2.0))  # every core taken: one thread still runs
    assert free.threads == 1
    capped, machine = watcher(wanted=1)
    for _ in range(3):
        assert capped.update(machine.tick(others=0.0)) is None and capped.threads == 1  # never above --threads


@pytest.fixture(scope="module")
def kquant(tmp_path_factory: pytest.TempPathFactory):
    return tiny_models.k_quant_model(tmp_path_factory.mktemp("kquant"))


@pytest.mark.parametrize("kind", ["f16", "q4_k_m"])
def test_a_decode_gives_the_same_logits_on_one_thread_as_on_two(tiny, kquant, kind) -> None:
    model = Model(tiny.main if kind == "f16" else kquant, n_gpu_layers=0)
    tokens = model.tokenize("the cat sat on the mat and the dog ran to the list " * 2)
    rows = []
    for threads in (2, 1):
        ctx = Context(model, 256, 2)
        ctx.set_threads(threads)
        ctx.decode(tokens[:-9])
        ctx.decode(tokens[-9:], all_logits=True)  # a verify batch's width
        rows.append(ctx.logits().copy())
        ctx.close()
    assert np.array_equal(rows[0], rows[1])


def test_the_engine_decodes_on_the_threads_the_watcher_allows(tiny, monkeypatch) -> None:
    main, draft = Model(tiny.main, n_gpu_layers=0), Model(tiny.draft, n_gpu_layers=0)
    config = GenerationConfig(max_tokens=40, sampler=SamplerSettings(temperature=0.0), draft_max=4, adaptive=False)
    prompt = main.tokenize("the cat sat on the mat")
    fixed = SpeculativeEngine(main, draft, n_ctx=256, n_threads=2, follow_cores=False)
    alone = list(fixed.generate(prompt, config))[-1]
    assert fixed.cores is None and alone.stats.threads == 2
    monkeypatch.setattr(cores, "CHECK_SECONDS", 0.0)
    set_to: list[int] = []
    monkeypatch.setattr(Context, "set_threads", lambda self, n: set_to.append(n))
    monkeypatch.setattr(FreeCores, "check", lambda self: setattr(self, "threads", 1) or 1)
    busy = SpeculativeEngine(main, draft, n_ctx=256, n_threads=2)
    out = list(busy.generate(prompt, config))[-1]
    assert out.tokens == alone.tokens and out.stats.threads == 1
    assert set(set_to) == {1} and len(set_to) >= 2  # the main context and the draft's
