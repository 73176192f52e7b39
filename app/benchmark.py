"""`tandem --benchmark`: plain vs speculative decoding on the chosen pair, on this machine, now.

Greedy, so every mode must produce the same tokens (checked: a mismatch is reported, not hidden).
Modes run interleaved (plain, fixed, adaptive, plain, ...) so a machine slowing down mid-run hurts
all of them alike; the table shows medians. For the full study see bench/bench.py.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from typing import TextIO

from app.config import Config

PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples.",
    "Explain in three short paragraphs why the sky is blue.",
)
RUNS = 3
MAX_TOKENS = 128


def _measuring(what: str, done: int, total: int) -> None:
    """The first run of a model on this machine measures its kernels: said on stderr, the table stays clean."""
    if done == total:
        sys.stderr.write(f"tandem: {what}: done\n")


def run_benchmark(config: Config, out: TextIO) -> int:
    from app.engine.chat import ChatSession
    from app.engine.events import Finished
    from app.engine.loading import describe_draft, load_engine
    from app.host import resolve_spec

    spec = resolve_spec(config)
    engine = load_engine(spec, measuring=_measuring)
    settings = dataclasses.replace(config.settings, temperature=0.0, max_tokens=MAX_TOKENS, seed=0)
    k = max(1, min(settings.draft_max, 8))
    modes = {
        "plain": dataclasses.replace(settings, draft_max=0, draft_min=0),
        f"fixed k={k}": dataclasses.replace(settings, adaptive=False, draft_max=k),
        "adaptive": dataclasses.replace(settings, adaptive=True, draft_max=k),
    }
    out.write(f"tandem benchmark: {engine.main.name} + {describe_draft(spec.draft)}, {settings.threads} threads, "
              f"greedy, {MAX_TOKENS} tokens, median of {RUNS}\n")  # fmt: skip
    from app.engine.backends import backends

    out.write(f"llama.cpp: {backends().describe()}\n")
    for model in (engine.main, engine.draft_model):
        if model is not None:
            out.write(f"weights of {model.path.name}: {model.kernels.reason or model.kernels.name}\n")
    out.write(f"main-model kernels: {engine.main_profile.kernels.describe()}\n")
    speculation = engine.speculation_state(modes["adaptive"].generation_config())
    if speculation:
        out.write(f"adaptive: {speculation}\n")
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    exact: dict[str, bool] = dict.fromkeys(modes, True)
    accepted: dict[str, list[float]] = {m: [] for m in modes}
    mismatches = 0
    for prompt in PROMPTS:
        reference = None
        for _ in range(RUNS):
            for mode, mode_settings in modes.items():
                session = ChatSession(engine, system=settings.system or None)
                finished = next(e for e in session.send(prompt, mode_settings.generation_config()) if isinstance(e, Finished))
                speeds[mode].append(finished.stats.tokens_per_second)
                accepted[mode].append(finished.stats.acceptance_rate)
                exact[mode] = exact[mode] and finished.stats.exact
                if reference is None:
                    reference = finished.tokens
                elif finished.tokens != reference:
                    mismatches += 1
    plain = statistics.median(speeds["plain"])
    out.write(f"{'mode':<12} {'tok/s':>7} {'vs plain':>9} {'accepted':>9} {'exact':>6}\n")
    for mode in modes:
        speed = statistics.median(speeds[mode])
        rate = "—" if mode == "plain" else f"{statistics.median(accepted[mode]):.0%}"
        out.write(f"{mode:<12} {speed:7.1f} {speed / plain:8.2f}x {rate:>9} {'yes' if exact[mode] else 'no':>6}\n")
    if mismatches:
        out.write(f"{mismatches} runs differed from plain output: kernels not batch-invariant here (--exact keeps them identical)\n")
    engine.close()
    return 0
