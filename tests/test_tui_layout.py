"""The chat app's layout on the terminals users have: 80x24 (the default), 60 columns, 160x45.

The status bar keeps its figures, the key hints keep F1, the debug pane keeps one line per round with the
tokens told apart without spaces and the discarded ones struck, a round expands on demand, F1 lists every key.
Reference screenshots (SVG, with their text) of the main states are kept in tests/snapshots/; the test that
regenerates them compares the text (volatile figures masked), so a layout change shows up in review.
TANDEM_UPDATE_SNAPSHOTS=1 rewrites the references."""

from __future__ import annotations

import difflib
import io
import os
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from app.engine import speculative
from app.engine.controller import EXPLORE, FIRST_TOKEN, FIXED, NEAR_END, OFF, PAYS, PLAIN, PROBE, Decision
from app.engine.events import Finished, GenerationStats, RoundEvent
from app.engine.probe import KernelCheck, MainProfile
from app.engine.speculative import Verify
from app.tui.app import TandemApp
from app.tui.generation import LiveStats
from app.tui.screens.help import HelpScreen, key_name
from app.tui.widgets import status as status_module
from app.tui.widgets.debug import DebugPane, explain, fates, format_round, token_label
from app.tui.widgets.status import KeyHints, StatusInfo, fit_status
from tests.test_tui import home, make_app, send, until

__all__ = ["home"]  # the fixture, used by name

SNAPSHOTS = Path(__file__).parent / "snapshots"
LONG_MAIN = "Qwen2.5 Coder 1.5B Instruct GGUF Q4_K_M"
LONG_DRAFT = "qwen2.5-coder-0.5b-instruct-q8_0.gguf"


def status_text(app: TandemApp) -> str:
    return app.status_bar.render().plain


def assert_figures(text: str, width: int, ctx: str = r"ctx \d+/") -> None:
    """tok/s, acceptance, the draft's state and the context stay, within the width."""
    assert cell_len(text) <= width, text
    assert re.search(r"\d+\.\d tok/s", text), text
    assert re.search(r"acc(ept)? (\d+%|—)", text), text
    assert "draft " in text, text
    assert re.search(ctx + r"\d+", text), text


def round_lines(pane: DebugPane) -> list[str]:
    return [strip.text for strip in pane.lines if strip.text.startswith("#")]


PAYING = Decision("model", 4, PAYS, acceptance=0.62, speedup=1.31)


def event(
    pieces: list[bytes], n_accepted: int, main: bytes = b"!", *, n_past_end: int = 0, ended: bool = False,
    decision: Decision = PAYING, source: str = "model",
) -> RoundEvent:  # fmt: skip
    """A round as the engine reports it: `pieces` drafted, the first `n_accepted` kept, then the main model's token."""
    emitted = n_accepted + (0 if ended else 1)
    return RoundEvent(
        drafted=tuple(range(100, 100 + len(pieces))), n_accepted=n_accepted, main_token=7, n_ignored=n_past_end,
        n_past_end=n_past_end,
        tokens=tuple(range(emitted)), text="", draft_seconds=0.0021, verify_seconds=0.0052, draft_source=source,
        why=decision, pieces=(*pieces, main),
    )  # fmt: skip


# ---- the status bar and the key hints ------------------------------------------------------------------------


async def test_status_bar_keeps_its_figures_at_80_and_60_columns(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        assert_figures(status_text(app), 80, ctx=f"ctx {len(app.engine.main_ctx.tokens)}/")
        assert app.screen.has_class("-narrow")

        # the names users have: long ones, the draft off, a reply streaming, the API served
        info = replace(app._status_info(), main=LONG_MAIN, draft=LONG_DRAFT, draft_state="off", state="generating",
                       acceptance=0.62, drafted=40, draft_length=4, tokens_per_second=41.3, speedup=0.78)  # fmt: skip
        # the app's own 2 s refresh (a timer bound at mount) must show these figures too, not the engine's
        app._status_info = lambda: info
        app.status_bar.show(info)
        text = status_text(app)
        assert_figures(text, 80)
        assert "62%" in text and "41.3 tok/s" in text and "off" in text and "generating" in text
        assert "draft qwen2.5-coder" in text  # shortened, not dropped
        serving = replace(info, serving="http://127.0.0.1:8080/v1 served 3 queued 1")
        app.status_bar.show(serving)
        text = status_text(app)
        assert_figures(text, 80)
        assert ":8080" in text and "served 3 queued 1" in text and "off" in text

        await pilot.resize_terminal(60, 24)
        await pilot.pause()
        for shown in (info, serving):
            app.status_bar.show(shown)
            text = status_text(app)
            assert_figures(text, 60)
            assert "62%" in text and "41.3 tok/s" in text and "off" in text

        await pilot.resize_terminal(160, 45)
        await pilot.pause()
        app.status_bar.show(info)
        text = status_text(app)
        assert "Qwen2.5 Coder 1.5B Q4_K_M" in text and "qwen2.5-coder-0.5b-q8_0" in text  # shortened first
        assert "(off: cannot pay here, F4)" in text and "k 4" in text
        assert not app.screen.has_class("-narrow")
        await pilot.resize_terminal(200, 45)
        await pilot.pause()
        text = status_text(app)
        assert LONG_MAIN in text and LONG_DRAFT in text and "RAM" in text


def test_the_status_line_gives_up_names_before_figures() -> None:
    info = StatusInfo(main=LONG_MAIN, draft=LONG_DRAFT, tokens_per_second=41.3, acceptance=0.62, draft_length=4, drafted=40,
                      ctx_used=1234, ctx_size=4096, state="generating", exact=True, draft_state="off", speedup=0.78)  # fmt: skip
    ram = 3 * 2**30
    wide = fit_status(info, ram, 200).plain
    assert LONG_MAIN in wide and LONG_DRAFT in wide and "RAM 3.0 GiB" in wide  # the speedup estimate went first
    assert "(0.78x plain)" in fit_status(info, ram, 220).plain
    for width in range(60, 200):
        text = fit_status(info, ram, width).plain
        assert_figures(text, width)
        assert "41.3 tok/s" in text and "62%" in text and "ctx 1234/4096" in text and "off" in text
    at_80 = fit_status(info, ram, 80).plain
    assert "RAM" not in at_80 and "…" in at_80  # names are shortened, memory goes


async def test_key_hints_show_what_fits_with_f1_first(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.engine is not None)
        hints = app.query_one(KeyHints)
        text = hints.render().plain
        assert text.lstrip().startswith("F1  Help") and "…" not in text and cell_len(text) <= 80
        for key in ("F2", "F3", "F4", "Esc"):
            assert f" {key} " in text
        shown = hints.shown(80)
        assert len(shown) < len(hints.hints)  # the rest are in F1's list
        await pilot.resize_terminal(60, 24)
        await pilot.pause()
        assert hints.render().plain.lstrip().startswith("F1  Help")
        await pilot.resize_terminal(200, 45)
        await pilot.pause()
        assert len(hints.shown(200)) == len(hints.hints) and "Serve" in hints.render().plain


async def open_screen(pilot, app: TandemApp, key: str, screen: type) -> None:
    """Once the models are loaded, press `key` and wait for `screen` to be on top."""
    await until(pilot, lambda: app.engine is not None)
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, screen))


async def test_f1_lists_every_key_once_with_what_it_does(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_screen(pilot, app, "f1", HelpScreen)
        sections = app.screen.sections()
        rows = [row for _, section in sections for row in section if row[0]]
        keys = [k for label, _ in rows for k in label.split(" / ")]
        for title, section in sections:  # each key once (Enter sends in the prompt, expands in the debug pane)
            in_section = [k for label, _ in section if label for k in label.split(" / ")]
            assert len(in_section) == len(set(in_section)), (title, in_section)
        assert keys.count("Ctrl+P") == 1 and keys.count("F1") == 1 and keys.count("Esc") == 1
        for binding in TandemApp.BINDINGS:  # every binding of the app, with more than its one-word description
            for key in binding.key.split(","):
                label = next(what for keys_, what in rows if key_name(key) in keys_.split(" / "))
                assert len(label.split()) > 2, (key, label)
        labels = dict(rows)
        assert "scroll the chat" in labels["PageUp / PageDown"].lower()
        assert "expand" in labels["Enter / Space"].lower()  # the debug pane's expand key
        assert "Send" in labels["Enter"] and "Ctrl+P" in keys and "Tab / Shift+Tab" in labels
        assert "near-tie" in labels["exact / ≈plain"] and "draft length" in labels["k 4"]  # the status bar's words too
        assert "checked" in labels["accept 62% of 40"] and "would not have paid" in labels["off / idle"]
        shown = "\n".join(screen_text(app)[0].splitlines())
        assert "Tandem keys" in shown


# ---- the debug pane ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (160, 45)])
async def test_each_round_is_one_line(home: Path, size: tuple[int, int]) -> None:
    app = make_app(home, adaptive=False, draft_max=4)  # a fixed draft length: every round drafts
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        await pilot.press("f4")
        await pilot.pause()
        pane = app.debug_pane
        width = pane.scrollable_content_region.width
        assert width >= size[0] * 0.4  # at 80 columns the pane goes under the chat, full width
        lines = [strip.text for strip in pane.lines]
        header = next(i for i, line in enumerate(lines) if line.startswith("── reply 1"))
        rounds = lines[header + 1 : header + 1 + app.last_finished.stats.rounds]
        assert all(line.startswith("#") for line in rounds), rounds  # no line wrapped onto a second row
        assert not lines[header + 1 + len(rounds)].startswith("#")  # then the summary
        for line in rounds:
            assert cell_len(line) <= width
            assert re.match(r"#\d+ +(PASS|FAIL|----) k=\d+ +(\d+/\d+|-) ", line), line
            assert "→" in line
        fails = [line for line in rounds if " FAIL " in line]
        assert fails and all(re.search(r"→ .+ fix", line) for line in fails)

        # token boundaries are not spaces: the drafted run is the tokens' texts end to end, where it fits
        for number, round_event in enumerate(pane_events(pane), start=1):
            run = "".join(token_label(round_event.drafted_piece(i)) for i in range(len(round_event.drafted)))
            line = rounds[number - 1]
            if run and cell_len(line) < width - 30:
                assert run in line, (run, line)


def pane_events(pane: DebugPane) -> list[RoundEvent]:
    return [entry.event for entry in pane._entries if hasattr(entry, "event")]


async def test_tokens_are_shaded_not_spaced_and_discarded_ones_struck(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 45)) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f4")
        pane = app.debug_pane
        pane.add_rounds([
            event([b"O", b"range", b" juice"], 3, b" is"),
            event([b" the", b" cat", b" sat", b" on", b" a"], 2, b" mat"),
        ])  # fmt: skip
        await pilot.pause()
        strips = [strip for strip in pane.lines if strip.text.startswith("#")]
        passed, failed = strips
        assert "Orange juice" in passed.text and "O range" not in passed.text
        assert " PASS k=3  3/3 " in passed.text and "→  is bonus" in passed.text
        shades = [seg.style.bgcolor for seg in passed if seg.text in ("O", "range", " juice")]
        assert len(shades) == 3 and shades[0] != shades[1] and shades[0] == shades[2]  # alternating

        assert " the cat sat on a" in failed.text and " FAIL k=5  2/5 " in failed.text and "→  mat fix" in failed.text
        struck = [seg.text for seg in failed if seg.style and seg.style.strike]
        assert struck == [" sat", " on", " a"]  # the rejected token and the two after it, discarded
        kept = [seg.text for seg in failed if seg.style and seg.style.bgcolor and not seg.style.strike]
        assert kept[:2] == [" the", " cat"]
        assert "pays 1.31x" in failed.text  # the reason, short: the tokens come first


def test_one_line_at_any_width_never_cutting_the_verdict() -> None:
    long = event([f" token{i}".encode() for i in range(16)], 5, b" main", decision=Decision("none", 0, PLAIN, rate=41))
    for width in range(40, 200):
        line = format_round(1234, long, width).plain
        assert "\n" not in line and cell_len(line) <= width, (width, line)
        assert line.startswith("#1234 FAIL k=16 5/16 draft"), line
        assert "→  main fix" in line, (width, line)
        assert " token5" in line or width < 52, (width, line)  # the rejected token stays in view first
    assert "…" in format_round(1, long, 80).plain
    wide = format_round(1, long, 400).plain
    assert "".join(f" token{i}" for i in range(16)) in wide and "plain: drafting would not pay" in wide


def test_accepted_drafts_past_the_reply_end_are_not_a_rejection() -> None:
    # the reply ended inside the accepted drafts (a stop string): the two after it agreed but were ignored
    past_end = event([b"a", b"b", b"c", b"d"], 2, b"e", n_past_end=2, ended=True)
    fate = fates(past_end)
    assert (fate.verdict, fate.accepted, fate.unused, fate.rejected, fate.discarded) == ("PASS", 2, 2, 0, 0)
    line = format_round(1, past_end, 100)
    assert " PASS " in line.plain and "end" in line.plain and not any(span.style and "strike" in str(span.style) for span in line.spans)
    # an end-of-generation token drafted and accepted: it is not in the reply's tokens
    eog = event([b"a", b"", b"c"], 2, b"x", n_past_end=1, ended=True)
    eog = replace(eog, tokens=eog.tokens[:1])
    assert fates(eog).verdict == "PASS"
    # a rejection whose correction ends the reply (the main model's end-of-generation token): still a FAIL
    rejected = event([b"a", b"b"], 1, b"", n_past_end=0, ended=True)
    assert fates(rejected).verdict == "FAIL" and fates(rejected).rejected == 1
    assert fates(event([], 0, b"x", decision=Decision("none", 0, PLAIN, rate=41), source="none")).verdict == "----"


def test_the_controller_reason_in_words() -> None:
    """The debug pane words the controller's decision from its code and figures; the engine's own words stay
    what --json and the logs show."""
    plain = Decision("none", 0, PLAIN, rate=41)
    assert explain(plain).line == "plain: drafting would not pay" and "41 tok/s" in explain(plain).full
    assert plain.reason == "plain 41 tok/s"
    assert explain(PAYING, "model").line == "pays: 1.31x plain, 62% accepted"
    assert PAYING.reason == "expects 62% accepted: 1.31x plain"
    assert "tried again" in explain(Decision("lookup", 4, PROBE, acceptance=0.4, speedup=1.8), "lookup").full
    assert explain(Decision("none", 0, FIRST_TOKEN)).line == "first token: always plain"
    explore = Decision("model", 2, EXPLORE, acceptance=0.84, speedup=1.41, plausible=0.93)
    assert explore.reason == "explore: 84% accepted so far, 93% would be 1.41x plain"
    assert explain(explore, "model").line == "explore: the draft model may pay"
    assert "93% is still plausible" in explain(explore, "model").full
    near = Decision("none", 0, NEAR_END, left=2, draft_min=3)
    assert explain(near).line == "plain: too near the end" and "under draft-min 3" in explain(near).full
    off = Decision("none", 0, OFF, detail="--exact: drafting off, no verify batch is bit-identical")
    assert explain(off).short == "draft off" and explain(off).full == off.detail == off.reason
    assert explain(Decision("model", 3, "a-new-code", detail="something new")).line == "something new"
    assert explain(None).line == ""


async def test_a_round_expands_by_key_and_by_click(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f4")
        pane = app.debug_pane
        pane.note("── reply 1: test")
        pane.add_rounds([
            event([b" the", b" cat", b" sat", b" on"], 2, b" mat"),
            event([b"O", b"range"], 2, b" juice", decision=Decision("model", 2, FIXED)),
        ])  # fmt: skip
        await pilot.pause()
        rows = len(pane.lines)
        await pilot.press("tab", "tab")  # the prompt, the chat, the debug pane
        assert app.focused is pane
        await pilot.press("end", "up", "enter")  # the first round
        await pilot.pause()
        assert pane.expanded_rounds() == [1]
        text = "\n".join(strip.text for strip in pane.lines)
        assert len(pane.lines) > rows + 4
        for expected in ("drafted 4 tokens", "accepted 2", "rejected 1", "1 after it discarded", "' sat'", "' on'",
                         "main model's token: ' mat'", "why: drafting should pay", "time: draft 2.10 ms + verify 5.20 ms"):  # fmt: skip
            assert expected in text, (expected, text)
        await pilot.press("enter")  # folds it back
        await pilot.pause()
        assert pane.expanded_rounds() == [] and len(pane.lines) == rows

        await pilot.press("tab")  # away from the pane; a click selects and expands the round clicked
        target = next(i for i, strip in enumerate(pane.lines) if strip.text.startswith("#2 "))
        y = target - pane.scroll_offset.y
        assert 0 <= y < pane.scrollable_content_region.height
        await pilot.click(DebugPane, offset=(3, 1 + y))  # inside the border
        await pilot.pause()
        assert pane.expanded_rounds() == [2] and app.focused is pane
        assert any("bonus" in strip.text and "' juice'" in strip.text for strip in pane.lines)


# ---- reference screenshots ----------------------------------------------------------------------------------------


def screen_text(app: TandemApp) -> tuple[str, str]:
    """The screen as text and as SVG (what App.export_screenshot draws)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens, simplify=True))
    text = console.export_text(clear=False)
    return text, console.export_svg(title=f"Tandem {width}x{height}")


VOLATILE = [
    (re.compile(r"\d+(\.\d+)?\+\d+(\.\d+)?(?= ms)"), "#"),
    (re.compile(r"\d+(\.\d+)?(?= ?(tok/s|ms|GiB))"), "#"),
]


def normalized(text: str) -> str:
    """The text of a screenshot without what may differ from run to run: speeds, timings, memory; runs of spaces
    (a wider figure shifts what follows it) count as one."""
    lines = []
    for line in text.splitlines():
        for pattern, mask in VOLATILE:
            line = pattern.sub(mask, line)
        lines.append(re.sub(r" {2,}", " ", line).rstrip())
    return "\n".join(lines).rstrip() + "\n"


# a scripted reply: the screenshots show the same rounds on every machine (the tiny models' greedy text may differ
# where their logits nearly tie), and rounds of every kind: plain, passed, failed with discarded tokens, a probe,
# accepted drafts past the reply's end (an end-of-generation token)
SCRIPT = [
    ([], 0, b"Here", "none", Decision("none", 0, FIRST_TOKEN)),
    ([b" is", b" a", b" short", b" one"], 4, b":", "model", Decision("model", 4, PAYS, acceptance=0.71, speedup=1.42)),
    ([b"\n\n", b"```", b"py"], 2, b"python", "lookup", Decision("lookup", 3, PAYS, acceptance=0.80, speedup=1.65)),
    ([b"\n", b"def", b" sort", b"_list", b"(items"], 5, b"):", "model", Decision("model", 5, PAYS, acceptance=0.71, speedup=1.42)),
    ([b"\n   ", b" return", b" sorted", b"(list", b")\n", b"```"], 3, b"(items", "model",
     Decision("model", 6, PAYS, acceptance=0.74, speedup=1.51)),
    ([], 0, b")\n", "none", Decision("none", 0, PLAIN, rate=41)),
    ([b"```", b"\n", b"", b"That"], 3, b" is", "lookup", Decision("lookup", 4, PROBE, acceptance=0.40, speedup=1.80)),
]
STREAMING_AFTER = 5  # rounds shown when the "streaming" screenshot is taken


def scripted_sequence(gate: threading.Event):
    def sequence(self, seq, prompt, config, cancel=None):
        reply: list[int] = []
        texts = []
        for number, (pieces, accepted, main, source, decision) in enumerate(SCRIPT, start=1):
            yield Verify(seq, [], logits=False)  # a step: the host hands each round's events on as it comes
            if number == STREAMING_AFTER + 1:
                gate.wait(30)
            ended = number == len(SCRIPT)  # the drafted end-of-generation token ends the reply
            emitted = [p for p in pieces[:accepted] if p] + ([] if ended else [main])
            tokens = tuple(range(len(reply), len(reply) + len(emitted)))
            reply += tokens
            text = b"".join(emitted).decode()
            texts.append(text)
            yield RoundEvent(
                drafted=tuple(range(500, 500 + len(pieces))), n_accepted=accepted, main_token=9,
                n_ignored=1 if ended else 0, n_past_end=1 if ended else 0, tokens=tokens, text=text, draft_seconds=0.0004 * len(pieces),
                verify_seconds=0.021 + 0.002 * len(pieces), draft_source=source, why=decision,
                pieces=(*pieces, main), context=len(prompt) + len(reply),
            )  # fmt: skip
        stats = GenerationStats(
            tokens_per_second=38.2, time_to_first_token=0.182, generation_time=0.6, stop_reason="eos",
            draft_model=self.draft_name, total_draft_tokens_count=23, accepted_draft_tokens_count=17,
            rejected_draft_tokens_count=4, ignored_draft_tokens_count=1, prompt_tokens_count=30,
            prompt_tokens_evaluated=30, predicted_tokens_count=len(reply), rounds=len(SCRIPT), mean_draft_length=3.14,
        )  # fmt: skip
        yield Finished(text="".join(texts), tail="", tokens=tuple(reply), stats=stats, context=len(prompt) + len(reply))

    return sequence


def steady(monkeypatch: pytest.MonkeyPatch, gate: threading.Event) -> None:
    """What differs between machines and runs held still: the reply, the kernel self-check, speeds, memory."""
    monkeypatch.setattr(speculative.SpeculativeEngine, "sequence", scripted_sequence(gate))
    kernels = KernelCheck(exact=True, max_difference=0.0, differing_sizes=[], exact_up_to=64)
    monkeypatch.setattr(speculative, "profile_main", lambda model, n_threads, **_: MainProfile(kernels, {1: 0.001, 2: 0.0011, 5: 0.0013}))
    monkeypatch.setattr(LiveStats, "tokens_per_second", property(lambda self: 37.5))
    monkeypatch.setattr(status_module, "process_memory", lambda: 512 * 2**20)
    monkeypatch.setattr("app.engine.backend.gpu_memory", lambda: None)
    # which llama.cpp build runs and where the weights go differ from CPU to CPU
    monkeypatch.setattr(speculative.SpeculativeEngine, "backend", property(lambda self: "CPU haswell, main weights repacked"))


@pytest.mark.parametrize("size", [(80, 24), (160, 45)], ids=["80x24", "160x45"])
async def test_screenshots_match_the_references(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size) -> None:
    gate = threading.Event()
    steady(monkeypatch, gate)
    app = make_app(home)
    shots: dict[str, tuple[str, str]] = {}

    async def shoot(name: str) -> None:
        app.clear_notifications()
        await pilot.pause(0.1)
        shots[name] = screen_text(app)

    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press(*"Sort a list in Python", "enter")
        await until(pilot, lambda: app.live.rounds == STREAMING_AFTER)
        await shoot("streaming")
        gate.set()
        await until(pilot, lambda: app.last_finished is not None and app.generation is None)
        await shoot("chat")
        await pilot.press("f4")
        await shoot("debug")
        app.debug_pane.focus()
        await pilot.press("end", "up", "up", "enter")  # the round that failed, with tokens discarded
        await shoot("expanded")
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await shoot("help")

    name = f"{size[0]}x{size[1]}"
    update = os.environ.get("TANDEM_UPDATE_SNAPSHOTS") == "1"
    problems = []
    for state, (text, svg) in shots.items():
        stem = f"{state}-{name}"
        reference = SNAPSHOTS / f"{stem}.txt"
        if update:
            SNAPSHOTS.mkdir(exist_ok=True)
            reference.write_text(normalized(text))
            (SNAPSHOTS / f"{stem}.svg").write_text(svg)
            continue
        if not reference.exists():
            problems.append(f"{reference} is missing: TANDEM_UPDATE_SNAPSHOTS=1 writes it")
            continue
        if normalized(text) != reference.read_text():
            (tmp_path / f"{stem}.svg").write_text(svg)
            (tmp_path / f"{stem}.txt").write_text(normalized(text))
            diff = difflib.unified_diff(reference.read_text().splitlines(), normalized(text).splitlines(), "reference", "now", lineterm="")
            problems.append(f"{stem} changed (new screenshot: {tmp_path / stem}.svg):\n" + "\n".join(diff))
    assert not problems, "\n\n".join(problems)


async def test_the_status_bar_says_what_drafting_does_and_how_much_was_drafted(home: Path) -> None:
    """Closed (cannot pay here), idle (the last round drafted nothing), drafting; the acceptance rate beside how
    many tokens it is of; a new chat clears the last reply's figures."""
    app = make_app(home)
    async with app.run_test(size=(160, 45)) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        await until(pilot, lambda: app.last_finished is not None and app.generation is None)
        stats = app.last_finished.stats
        drafted = stats.accepted_draft_tokens_count + stats.rejected_draft_tokens_count
        assert (f"of {drafted:,}" in status_text(app)) == bool(drafted)
        assert ("(off: cannot pay here, F4)" in status_text(app)) == ("model" in stats.closed_sources)

        app.last_finished = replace(app.last_finished, stats=replace(stats, closed_sources=()))
        app.live = LiveStats()
        app.live.add(event([], 0, source="none"))  # the last round: nothing worth drafting
        app.refresh_status()
        assert "(idle: would not pay this round)" in status_text(app)
        app.live.add(event([b"a", b"b"], 1))
        app.refresh_status()
        assert "idle" not in status_text(app) and "off" not in status_text(app)
        app.last_finished = replace(app.last_finished, stats=replace(stats, closed_sources=("model",)))
        app.refresh_status()
        assert "(off: cannot pay here, F4)" in status_text(app)

        await pilot.press("ctrl+n")
        await until(pilot, lambda: app.last_finished is None)
        text = status_text(app)
        assert "0.0 tok/s" in text and "accept —" in text and "off" not in text


def test_a_token_that_ends_inside_a_character_shows_its_bytes() -> None:
    assert token_label("ä".encode()[:1]) == "\\xc3" and token_label("日本".encode()[:4]) == "日\\xe6"
    assert token_label(b"\n") == "⏎" and token_label("é".encode()) == "é"


async def test_a_streaming_reply_is_never_much_taller_than_its_text() -> None:
    """At every length, fewer than HEIGHT_STEP blank lines under a streaming reply's text (there were up to 15)."""
    from textual.app import App

    from app.engine.transcript import ReplyTranscript
    from app.tui.widgets.chat import HEIGHT_STEP, AssistantMessage, LiveReply

    class One(App):
        def compose(self):
            yield AssistantMessage("tiny-main", transcript=ReplyTranscript())

    app = One()
    async with app.run_test(size=(80, 24)) as pilot:
        reply = app.query_one(AssistantMessage)
        live = reply.query_one(LiveReply)
        for line in range(30):
            reply.append(f"line {line} of the reply\n\n")
            await pilot.pause()
            assert len(live._strips) <= live.size.height < len(live._strips) + HEIGHT_STEP <= len(live._strips) + 4


async def test_f6_says_a_whole_reason_at_80_columns(home: Path) -> None:
    from app.tui.screens.settings import SettingsScreen

    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_screen(pilot, app, "f6", SettingsScreen)
        app.screen.query_one("#set-max_tokens").value = "-3"
        await pilot.press("ctrl+s")
        await pilot.pause()
        reason = app.screen.query_one("#error-max_tokens")
        assert reason.region.right <= 80 and reason.region.height >= 2  # wrapped, not cut at the screen's edge
        assert str(reason.render()) == "Max tokens must be a whole number, at least 1"
        await pilot.press("backspace", "backspace", "3", "3")  # keys right after Backspace all arrive
        assert app.screen.query_one("#set-max_tokens").value == "33"
