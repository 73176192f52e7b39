"""The repaint pacer keeps the UI thread's CPU within its budget while a reply streams."""

from __future__ import annotations

from app.tui.pacing import BUDGET_SHARED, BUDGET_SPARE, FASTEST, SLOWEST, RefreshPacer, ui_budget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_depends_on_a_spare_core() -> None:
    assert ui_budget(engine_threads=2, cores=2) == BUDGET_SHARED
    assert ui_budget(engine_threads=2, cores=8) == BUDGET_SPARE


def test_interval_follows_the_cost_of_an_update() -> None:
    wall, cpu = FakeClock(), FakeClock()
    pacer = RefreshPacer(0.05, clock=wall, cpu_clock=cpu)
    assert pacer.due()
    cpu.now += 0.010  # a 10 ms update: 10 ms / 5% = one update every 0.2 s
    pacer.updated()
    assert abs(pacer.interval - 0.2) < 1e-9
    wall.now += 0.1
    assert not pacer.due()
    wall.now += 0.11
    assert pacer.due()
    cpu.now += 1.0  # a pathological update: never slower than SLOWEST
    pacer.updated()
    assert pacer.interval == SLOWEST
    cpu.now += 0.0001  # a cheap one: never faster than FASTEST
    pacer.updated()
    assert pacer.interval == FASTEST and pacer.updates == 3
    pacer.restart()
    assert pacer.due()
