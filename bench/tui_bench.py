"""The chat app must not slow generation: tok/s inside the TUI (driven by Textual's Pilot) vs the
headless CLI (`tandem --prompt ... --json`, its own process), same prompt, same pair, runs
interleaved (ABBA), medians; and how long a key
press takes to be handled while a reply streams at full speed.

    python bench/tui_bench.py [--pair demo|real] [--runs 3] [--max-tokens 256] [--prompts 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from textual import events

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine.demo import ensure_demo_pair  # noqa: E402
from app.tui.app import LaunchOptions, TandemApp  # noqa: E402
from bench.bench import load_prompts, real_pair  # noqa: E402

_APP = None
REPAINTS: list[float] = []  # reply repaints per second, per TUI run
UI_SHARE: list[float] = []  # the UI thread's CPU time over the reply's, per TUI run


async def wait_for(predicate, timeout: float = 120.0, step: float = 0.02) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            state = f"focus {_APP.focused}, generation {_APP.generation}" if _APP else ""
            raise TimeoutError(f"the app did not get there in time ({state})")
        await asyncio.sleep(step)


async def tui_run(app: TandemApp, pilot, prompt: str) -> float:
    await pilot.pause(0.5)  # a headless run just blocked the loop: let its backlog clear first
    await app.action_new_chat()
    app.last_finished = None
    app.query_one("#prompt").value = prompt
    for _ in range(3):  # a key press can be lost while the previous reply's toast is leaving
        await pilot.press("enter")
        try:
            await wait_for(lambda: app.generation is not None or app.last_finished is not None, timeout=3)
            break
        except TimeoutError:
            continue
    # poll slowly: every wake-up of this (benchmark) loop would be charged to the app
    ui_cpu = time.thread_time()  # this thread is the app's UI thread: what it spends, the engine's cores lose
    await wait_for(lambda: app.last_finished is not None, step=0.25)
    ui_cpu = time.thread_time() - ui_cpu
    # let the app settle the reply into its Markdown widget now, not during the next measured run
    await pilot.pause(0.5)
    stats = app.last_finished.stats
    REPAINTS.append(app.pacer.updates / stats.generation_time)
    UI_SHARE.append(ui_cpu / stats.generation_time)
    return stats.tokens_per_second


async def key_latency(app: TandemApp, pilot, prompt: str, presses: int = 10) -> list[float]:
    """Type into the input box while a reply streams; time from key to the box showing it."""
    await app.action_new_chat()
    app.last_finished = None
    box = app.query_one("#prompt")
    box.value = prompt
    await pilot.press("enter")
    await wait_for(lambda: app.generation is not None or app.last_finished is not None)
    await wait_for(lambda: app.live.rounds > 3 or app.last_finished is not None)
    latencies = []
    for _ in range(presses):
        if app.generation is None:
            break
        before = box.value
        started = time.perf_counter()
        app.post_message(events.Key("x", "x"))  # as a terminal delivers it (Pilot.press also waits for idle)
        await wait_for(lambda before=before: box.value != before, timeout=5, step=0.001)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.1)
    await wait_for(lambda: app.last_finished is not None)
    box.value = ""
    return latencies


def headless_cli(prompt: str, main: Path, draft: Path, args) -> float:
    """The headless CLI exactly as a script runs it: its own process, no Textual loaded."""
    command = [sys.executable, "-m", "app", "--prompt", prompt, "--json", "--temp", "0", "-n", str(args.max_tokens),
               "-t", str(args.threads), "--model", str(main), "--draft", str(draft)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout)["stats"]["tokens_per_second"]


async def main() -> int:
    from app.tui.app import prefer_engine_thread

    if "--no-switch" not in sys.argv:
        prefer_engine_thread()
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", choices=("demo", "real"), default="demo")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--colored", action="store_true", help="stream in the accepted-token view")
    parser.add_argument("--latency-only", action="store_true", help="skip the tok/s comparison")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--no-switch", action="store_true")
    args = parser.parse_args()
    main_path, draft_path = real_pair() if args.pair == "real" else ensure_demo_pair()
    prompts = load_prompts(None)[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        options = LaunchOptions(
            config_path=Path(tmp) / "config.toml", main=str(main_path), draft=str(draft_path), history_dir=Path(tmp) / "history",
            settings={"temperature": 0.0, "max_tokens": args.max_tokens, "threads": args.threads},
        )  # fmt: skip
        global _APP
        app = _APP = TandemApp(options)
        async with app.run_test(size=(140, 45)) as pilot:
            await wait_for(lambda: app.engine is not None)
            app.colored = args.colored  # the accepted-token view instead of Markdown
            print(f"{'prompt':<12} {'headless':>9} {'tui':>9} {'tui/headless':>13}")
            ratios = []
            for item in ([] if args.latency_only else prompts):
                headless, tui = [], []
                for run in range(args.runs):
                    # the order alternates (ABBA) so neither side always runs on a warmer machine
                    if run % 2 == 0:
                        headless.append(headless_cli(item["prompt"], main_path, draft_path, args))
                    tui.append(await tui_run(app, pilot, item["prompt"]))
                    if run % 2 == 1:
                        headless.append(headless_cli(item["prompt"], main_path, draft_path, args))
                h, t = statistics.median(headless), statistics.median(tui)
                ratios.append(t / h)
                print(f"{item.get('id', '?'):<12} {h:9.1f} {t:9.1f} {t / h:12.2f}x", flush=True)
                if args.verbose:
                    print(f"  headless {[round(x, 1) for x in headless]}\n  tui      {[round(x, 1) for x in tui]}")
            # a long reply (pythagoras runs ~300 tokens) leaves time for many presses
            long_prompt = next((p for p in load_prompts(None) if p.get("id") == "pythagoras"), prompts[0])
            latencies = await key_latency(app, pilot, long_prompt["prompt"])
    if ratios:
        repaints = statistics.median(REPAINTS)
        print(f"mean tui/headless {statistics.mean(ratios):.2f}x; reply repainted {repaints:.1f} times a second (median); "
              f"UI thread busy {statistics.median(UI_SHARE):.1%} of a core while streaming (median)")
    if latencies:
        print(f"key press while streaming: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} presses")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
