"""The chat app driven by Textual's Pilot over tiny real models: every path a user takes by keyboard."""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import socket
import time
import tomllib
import weakref
from pathlib import Path

import httpx
import pytest
from textual.widgets import Label

from app.config import default_config_path, load_config
from app.engine import speculative
from app.engine.events import PromptProgress, RoundEvent
from app.engine.probe import DraftProfile
from app.engine.speculative import CANCELLED
from app.history import HistoryStore, read_conversation
from app.tui.app import LaunchOptions, TandemApp
from app.tui.generation import HostGeneration
from app.tui.screens.help import HelpScreen
from app.tui.screens.picker import PickerScreen
from app.tui.screens.settings import SettingsScreen
from app.tui.widgets.chat import AssistantMessage, UserMessage
from app.tui.widgets.debug import DebugPane

SIZE = (140, 45)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> Path:
    """A fresh user: empty config and history, the tiny models in ./models, nothing else found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TANDEM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TANDEM_MODELS_CACHE", str(tmp_path / "cache"))
    for var in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    for path in (tiny.main, tiny.draft, tiny.twin, tiny.foreign):
        shutil.copy(path, models / path.name)
    (models / "broken.gguf").write_bytes(tiny.main.read_bytes()[:4000])  # a truncated download
    return tmp_path


def make_app(home: Path, parallel: int = 1, **settings) -> TandemApp:
    models = home / "models"
    options = LaunchOptions(
        config_path=default_config_path(),
        main=str(models / "main.gguf"),
        draft=str(models / "draft.gguf"),
        settings={"temperature": 0.0, "max_tokens": 40, "threads": 2, "ctx_size": 512, **settings},
        parallel=parallel,
    )
    return TandemApp(options)


async def until(pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)


def picker_options(app: TandemApp) -> dict:
    """The open picker's options by id (a model's path, "none", "lookup")."""
    options = app.screen.query_one("OptionList")
    return {options.get_option_at_index(i).id: options.get_option_at_index(i) for i in range(options.option_count)}


async def send(pilot, app: TandemApp, text: str) -> None:
    await pilot.press(*text, "enter")
    await until(pilot, lambda: app.last_finished is not None and app.generation is None)


async def test_prompt_streams_a_reply_and_saves_it(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        reply = app.query(AssistantMessage).last()
        assert reply.text == app.last_finished.text and app.last_finished.stats.predicted_tokens_count > 0
        assert [m.role for m in app.session.messages] == ["user", "assistant"]
        assert "tok/s" in str(reply.border_subtitle)
        status = str(app.query_one("#status").render())
        assert "main.gguf" in status and "draft.gguf" in status  # both named by the file picked
    saved = HistoryStore().conversations()
    assert len(saved) == 1 and saved[0].messages[0].content == "the cat sat"
    assert saved[0].messages[1].content == app.last_finished.text


def pace(monkeypatch: pytest.MonkeyPatch, kind: type, seconds: float) -> None:
    """Slow the engine's replies down (each `kind` item waits `seconds`), on the host's worker as it runs them."""
    real = speculative.SpeculativeEngine.sequence

    def paced(self, *args, **kwargs):
        for item in real(self, *args, **kwargs):
            if isinstance(item, kind):
                time.sleep(seconds)
            yield item

    monkeypatch.setattr(speculative.SpeculativeEngine, "sequence", paced)


async def test_escape_cancels_and_keeps_the_partial_reply(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pace(monkeypatch, RoundEvent, 0.02)  # the tiny model is too fast to catch: 20 ms per round
    app = make_app(home, max_tokens=100_000, ctx_size=1024)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press(*"the dog", "enter")
        await until(pilot, lambda: app.live.rounds >= 3)
        await pilot.press("f1")  # a modal screen over a streaming reply: the stream goes on underneath
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        rounds = app.live.rounds
        await until(pilot, lambda: app.live.rounds > rounds + 3)
        await pilot.press("escape")  # closes the help screen
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen))
        await pilot.press("escape")  # stops the reply
        await until(pilot, lambda: app.last_finished is not None)
        stats = app.last_finished.stats
        assert stats.stop_reason == CANCELLED
        reply = app.query(AssistantMessage).last()
        assert reply.has_class("cancelled") and "stopped" in str(reply.border_subtitle)
        assert app.session.messages[-1].content == app.last_finished.text  # the partial reply stays in the chat
    saved = HistoryStore().conversations()[0]
    assert saved.cancelled == {1}


async def test_debug_pane_shows_drafted_and_accepted_tokens(home: Path) -> None:
    app = make_app(home, adaptive=False, draft_max=4)  # a fixed draft length: the adaptive choice depends on timings
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "hello world")
        await pilot.press("f4")
        pane = app.query_one(DebugPane)
        assert pane.display
        lines = [strip.text for strip in pane.lines]
        rounds = [line for line in lines if line.startswith("#")]
        assert len(rounds) == app.last_finished.stats.rounds
        assert any(" PASS " in line or " FAIL " in line for line in rounds)
        assert all("k=" in line and "→" in line for line in rounds)
        await pilot.press("f4")
        assert not pane.display


async def test_accepted_token_view_toggles(home: Path) -> None:
    app = make_app(home, draft_max=4, adaptive=False)  # always draft: the test needs accepted tokens
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat")
        reply = app.query(AssistantMessage).last()
        assert reply.markdown.display and not reply.plain.display
        await pilot.press("f5")
        assert reply.plain.display and not reply.markdown.display
        shown = reply.plain.content
        assert str(shown) == app.last_finished.text
        assert app.last_finished.stats.accepted_draft_tokens_count > 0
        assert any("5fd787" in str(span.style) for span in shown.spans)


async def test_model_and_draft_pickers_by_keyboard(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat")  # replies and debug-pane rounds that must not pin the old model
        await pilot.press("f4")
        old_main = weakref.ref(app.engine.main)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        labels = [str(option.prompt) for option in picker_options(app).values()]
        assert any("broken.gguf" in label and "truncated" in label for label in labels)
        await pilot.press(*"twin", "enter")
        await until(pilot, lambda: app.spec is not None and app.spec.main.name == "twin.gguf" and not app.loading)
        assert app.engine.main.name == "tiny-twin"
        gc.collect()
        assert old_main() is None  # the old weights are freed, not kept alive by what is on screen

        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        texts = picker_options(app)
        foreign = texts[str(home / "models" / "foreign.gguf")]
        assert foreign.disabled and "incompatible" in str(foreign.prompt)
        assert not texts[str(home / "models" / "draft.gguf")].disabled
        await pilot.press(*"lookup", "enter")
        await until(pilot, lambda: app.spec.draft == "lookup" and not app.loading)
        assert app.engine.drafter is None and app.engine.lookup is not None

        await pilot.press("escape")  # nothing streaming: Esc is harmless
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        await pilot.press("down", "down", "escape")  # leaving the picker changes nothing
        await until(pilot, lambda: not isinstance(app.screen, PickerScreen))
        assert app.spec.draft == "lookup"
    config = tomllib.loads(default_config_path().read_text())
    assert config["default_drafts"][str(home / "models" / "twin.gguf")] == "lookup"


async def test_a_failed_load_keeps_the_previous_models(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        engine = app.engine
        await send(pilot, app, "the cat")
        app.load_pair(str(home / "models" / "main.gguf"), str(home / "models" / "foreign.gguf"))
        await until(pilot, lambda: not app.loading)
        assert app.engine is engine
        assert any("cannot be used" in n.message for n in app._notifications)
        app.load_pair(str(home / "models" / "broken.gguf"), "lookup")
        await until(pilot, lambda: not app.loading)
        assert app.engine is engine and len(app.query(UserMessage)) == 1
        assert any("truncated" in n.message for n in app._notifications)


async def test_settings_persist_across_restarts(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        field = app.screen.query_one("#set-top_k")
        field.value = "7"
        app.screen.query_one("#set-max_tokens").value = "-3"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # a bad value keeps the form open
        app.screen.query_one("#set-max_tokens").value = "33"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.config.settings.top_k == 7
    again = TandemApp(LaunchOptions(config_path=default_config_path()))  # no models named: it opens on the saved ones
    async with again.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: again.engine is not None)
        assert again.config.settings.top_k == 7 and again.config.settings.max_tokens == 33
        assert again.spec.main == home / "models" / "main.gguf" and again.spec.draft == str(home / "models" / "draft.gguf")
    assert load_config(default_config_path()).settings.top_k == 7


async def reopen(pilot, app, typed: str) -> None:
    """Once the models are loaded, F7 and pick the saved conversation that `typed` finds (it has one question)."""
    await until(pilot, lambda: app.engine is not None)
    await pilot.press("f7")
    await until(pilot, lambda: isinstance(app.screen, PickerScreen))
    await pilot.press(*typed, "enter")
    await until(pilot, lambda: len(app.query(UserMessage)) == 1)


async def test_history_reopens_a_conversation(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "first question")
        first_reply = app.last_finished.text
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query(UserMessage))
        assert app.session.messages == []

    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await reopen(pilot, app, "first")
        assert [m.content for m in app.session.messages] == ["first question", first_reply]
        app.last_finished = None
        await send(pilot, app, "second")  # the reopened chat goes on in the same file
        assert len(app.session.messages) == 4
    saved = HistoryStore().conversations()
    assert [len(c.messages) for c in saved] == [4]


async def test_a_reply_cut_short_by_a_killed_app_reopens_marked(home: Path) -> None:
    log = HistoryStore().new_log()
    log.user("tell me a story")
    log.assistant("Once upon a")  # then the app was killed: no end record
    log.close()
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await reopen(pilot, app, "story")
        reply = app.query(AssistantMessage).last()
        assert "interrupted" in str(reply.border_subtitle) and reply.has_class("cancelled")


async def test_help_and_quit(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = dict(app.screen.key_rows)
        assert keys["F2 / CTRL+O"] == "Model" and keys["CTRL+Q"] == "Quit"
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen))
        await pilot.press("ctrl+q")
    assert app.return_code in (0, None)


async def test_status_bar_says_why_the_draft_is_off_and_whether_output_is_exact(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A draft that costs far more than the main model can never pay, and the app says so. The context
    figure is the context in use, not every token ever evaluated. The draft's cost is set, not timed: on
    a fast machine the tiny draft may well pay, and this test is about what the app shows, not timing."""
    monkeypatch.setattr(speculative, "profile_draft", lambda model, n_threads: DraftProfile(1.0, 1.0))
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat")
        stats = app.last_finished.stats
        assert "draft model off" in stats.speculation and app.engine.drafter.ctx.n_evaluated == 0  # never fed
        status = app.status_bar.render().plain
        assert "(off: cannot pay here, F4)" in status and " exact " in status
        assert f"ctx {len(app.engine.main_ctx.tokens)}/" in status
        app.last_finished = None
        await send(pilot, app, "the dog")
        used = len(app.engine.main_ctx.tokens)
        assert used > len(app.last_finished.tokens) and f"ctx {used}/" in app.status_bar.render().plain
        await pilot.press("f4")
        lines = [strip.text for strip in app.query_one(DebugPane).lines]
        assert any("draft model off" in line for line in lines)  # the reason, with its figures

        await pilot.press("ctrl+n")  # nothing of the new chat is in the context
        await until(pilot, lambda: not app.query(UserMessage))
        assert " ctx 0/" in app.status_bar.render().plain
        await pilot.press("f7")  # nor of a reopened one, until its next turn reads it
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        await pilot.press(*"the cat", "enter")
        await until(pilot, lambda: len(app.query(UserMessage)) == 2)
        assert " ctx 0/" in app.status_bar.render().plain
        app.last_finished = None
        await send(pilot, app, "the mat")
        used = len(app.engine.main_ctx.tokens)
        assert used >= app.last_finished.stats.prompt_tokens_count - 1 and f"ctx {used}/" in app.status_bar.render().plain
        await pilot.pause(2.1)  # the status bar's own refresh says the same
        assert f"ctx {used}/" in app.status_bar.render().plain


async def test_a_corrupt_config_is_left_alone_until_the_user_saves(home: Path) -> None:
    """The app opens on the defaults and leaves the user's file as it is; the first save keeps a copy."""
    path = default_config_path()
    path.parent.mkdir(parents=True)
    broken = "[settings\ntop_k = 3  # my notes\n"
    path.write_text(broken)
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.pause(1.6)  # well past the autosave after loading
        assert path.read_text() == broken and [p.name for p in path.parent.iterdir()] == ["config.toml"]
        assert any("not valid TOML" in n.message and "left as it is" in n.message for n in app._notifications)
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#set-top_k").value = "7"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        backups = [p for p in path.parent.iterdir() if p.name != "config.toml"]
        assert len(backups) == 1 and backups[0].read_text() == broken
        assert load_config(path).settings.top_k == 7
        assert any(backups[0].name in n.message for n in app._notifications)


async def test_unwritable_history_warns_once_and_chat_goes_on(home: Path) -> None:
    """The data dir is a regular file (root ignores chmod): the history cannot be created there."""
    (home / "data").write_text("not a folder")
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat")
        app.last_finished = None
        await send(pilot, app, "the dog")
        assert [m.role for m in app.session.messages] == ["user", "assistant"] * 2
        assert len(app.query(AssistantMessage)) == 2
        warnings = [n.message for n in app._notifications if "history" in n.message.lower()]
        assert len(warnings) == 1 and str(home / "data" / "history") in warnings[0] and "Not a directory" in warnings[0]


async def start_serving(pilot, app: TandemApp) -> str:
    """F9 on any free port; the API's base URL, read from the status bar."""
    app.serve_port = 0
    await pilot.press("f9")
    await until(pilot, lambda: app.serving is not None and not app.serving_starting)
    return served_url(app)


def served_url(app: TandemApp) -> str:
    """The API's base URL as the status bar shows it (whole, or as "API :port" where the line is short of room)."""
    found = re.search(r"(?:http://127\.0\.0\.1)?:(\d+)(?:/v1)? served", app.status_bar.render().plain)
    assert found, app.status_bar.render().plain
    return f"http://127.0.0.1:{found.group(1)}"


async def test_f9_serves_the_loaded_pair_and_chat_shares_its_host(home: Path) -> None:
    """F9 serves the app's own engine: an HTTP request is answered and counted in the status bar, its rounds
    show in the debug pane; a chat turn meanwhile goes through the same host and replies as plain chat does;
    F9 again stops the server (connection refused) and the chat goes on with the same engine."""
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        plain = app.last_finished.text
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query(UserMessage))
        engine = app.engine

        base = await start_serving(pilot, app)
        assert "served 0 queued 0" in app.status_bar.render().plain
        assert app.serving.engine_host.engine is engine
        body = {"model": "main", "messages": [{"role": "user", "content": "the dog ran"}], "temperature": 0, "max_tokens": 16}
        answer = await asyncio.to_thread(httpx.post, f"{base}/api/v0/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 16
        await until(pilot, lambda: "served 1 queued 0" in app.status_bar.render().plain)
        await until(pilot, lambda: app.debug_pane.rounds_seen >= reply["stats"]["rounds"])

        app.last_finished = None
        await send(pilot, app, "the cat sat")  # through the host's worker, as a job among the requests
        assert app.host is app.serving.engine_host
        assert app.last_finished.text == plain  # temperature 0: what plain chat gave
        assert app.query(AssistantMessage).last().text == plain
        assert [m.content for m in app.session.messages] == ["the cat sat", plain]
        assert "served 1 queued 0" in app.status_bar.render().plain  # the app's own turns are not requests

        await pilot.press("f4")
        lines = [strip.text for strip in app.debug_pane.lines]
        api = next(i for i, line in enumerate(lines) if line.startswith("── API request 1: the dog ran"))
        chat = next(i for i, line in enumerate(lines) if line.startswith("── reply 1: the cat sat") and i > api)
        assert len([line for line in lines[api:chat] if line.startswith("#")]) == reply["stats"]["rounds"]
        assert any("tokens" in line and "tok/s" in line for line in lines[api:chat])  # the request's summary
        assert len([line for line in lines[chat:] if line.startswith("#")]) == app.last_finished.stats.rounds
        rounds = app.debug_pane.rounds_seen  # with the pane open, a request's rounds are written as they come
        second = await asyncio.to_thread(httpx.post, f"{base}/v1/completions", json={"prompt": "the mat", "max_tokens": 8}, timeout=60)
        assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 8
        await until(pilot, lambda: "served 2 queued 0" in app.status_bar.render().plain)
        await until(pilot, lambda: any(strip.text.startswith("── API request 2: the mat") for strip in app.debug_pane.lines))
        assert app.debug_pane.rounds_seen > rounds

        await pilot.press("f9")
        await until(pilot, lambda: app.serving is None)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=5)
        assert "served" not in app.status_bar.render().plain
        app.last_finished = None
        host = app.host
        await send(pilot, app, "the dog")  # the same host and engine: serving came and went around them
        assert app.host is host and not host.stopped and app.engine is engine
        assert app.last_finished.stats.predicted_tokens_count > 0 and len(app.session.messages) == 4


async def test_with_parallel_sequences_the_app_turn_shares_the_requests_batch(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launched with --parallel 2 and serving: an API request and the app's own turn run at once, in shared
    decodes, and each gets the text it gets alone (temperature 0, the tiny models' exact kernels)."""
    pace(monkeypatch, RoundEvent, 0.03)  # long enough for the two to overlap
    app = make_app(home, parallel=2, max_tokens=60, ctx_size=1024)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        assert app.engine.n_seq == 2
        await send(pilot, app, "the cat sat")
        alone = app.last_finished
        base = await start_serving(pilot, app)
        body = {"messages": [{"role": "user", "content": "the dog ran"}], "temperature": 0, "max_tokens": 300}
        request = asyncio.create_task(asyncio.to_thread(httpx.post, f"{base}/api/v0/chat/completions", json=body, timeout=60))
        await until(pilot, lambda: app.serving.engine_host.active)
        assert app.host is app.serving.engine_host
        app.last_finished = None
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query(UserMessage))
        await send(pilot, app, "the cat sat")
        answer = (await request).json()
        assert app.last_finished.text == alone.text and answer["choices"][0]["message"]["content"]
        widest = (app.last_finished.stats.widest_batch, answer["stats"]["widest_batch"])
        own = (1 + max(app.last_finished.stats.draft_length_histogram), 1 + max(int(k) for k in answer["stats"]["draft_length_histogram"]))
        assert widest[0] > own[0] or widest[1] > own[1]  # a decode carried both
        await pilot.press("f9")
        await until(pilot, lambda: app.serving is None)


async def test_serving_refuses_a_busy_port_and_model_switches_and_stops_on_quit(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = make_app(home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.engine is not None)
            app.serve_port = port
            await pilot.press("f9")
            await until(pilot, lambda: any(f"port {port} is in use" in n.message for n in app._notifications))
            await until(pilot, lambda: app.serving is None)
            base = await start_serving(pilot, app)
            server = app.serving
            assert "served 0 queued 0" in app.status_bar.render().plain[:80]  # seen on an 80-column terminal
            await pilot.press("f2")  # a new pair would replace the engine the server's worker uses
            await until(pilot, lambda: any("stop serving first (F9)" in n.message for n in app._notifications))
            await pilot.pause(0.3)
            assert not isinstance(app.screen, PickerScreen)
            await pilot.press("f1")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            assert dict(app.screen.key_rows)["F9"] == "Serve"
            await pilot.press("escape")
            await send(pilot, app, "the cat")  # a chat turn while serving
            assert app.last_finished.stats.predicted_tokens_count > 0
            await pilot.press("ctrl+q")  # quitting while serving stops the server
    assert server.engine_host.stopped and not server._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5)


async def test_escape_stops_a_reply_that_runs_on_the_serving_host(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pace(monkeypatch, RoundEvent, 0.02)  # the tiny model is too fast to catch: 20 ms per round
    app = make_app(home, max_tokens=100_000, ctx_size=1024)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await start_serving(pilot, app)
        await pilot.press(*"the dog", "enter")
        await until(pilot, lambda: app.live.rounds >= 3)
        assert isinstance(app.generation, HostGeneration)
        await pilot.press("escape")
        await until(pilot, lambda: app.last_finished is not None and app.generation is None)
        assert app.last_finished.stats.stop_reason == CANCELLED
        assert app.session.messages[-1].content == app.last_finished.text  # the partial reply stays in the chat
        assert app.query(AssistantMessage).last().has_class("cancelled")
    saved = HistoryStore().conversations()[0]
    assert saved.cancelled == {1} and saved.messages[1].content == app.last_finished.text


async def test_reading_a_reopened_conversation_shows_progress_and_esc_stops_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reopened chat is read again on its next turn (a new engine has none of it): the loading row and the
    reply say how far, with an estimate, while it runs; Esc stops the reading, and the next turn goes on from
    what was read. Made slow enough to watch: any prompt counts as long, read 16 tokens at a time, 0.3 s a batch."""
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat on the mat")
        app.last_finished = None
        await send(pilot, app, "the dog ran to the cat")

    monkeypatch.setattr(speculative, "PROMPT_PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(speculative, "PROMPT_CHUNK", 16)
    pace(monkeypatch, PromptProgress, 0.3)
    app = make_app(home, ctx_size=1024)  # the whole conversation fits, with room for a reply: it is read from its start
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f7")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        await pilot.press("enter")
        await until(pilot, lambda: len(app.query(UserMessage)) == 2)
        await pilot.press(*"and then", "enter")
        label = app.loading_row.query_one(Label)
        await until(pilot, lambda: app.loading_row.display and "Reading the conversation: 16/" in str(label.content))
        assert re.search(r"Reading the conversation: 16/\d+ tokens, about .+ left · Esc stops", str(label.content))
        assert str(app.reply.border_subtitle).startswith("reading the conversation: 16/")
        assert app.status_bar.render().plain.startswith(" reading ")
        await until(pilot, lambda: app.reading is not None and app.reading.done >= 32)  # it moves on
        assert f"Reading the conversation: {app.reading.done}/{app.reading.total} tokens" in str(label.content)
        await pilot.press("escape")
        await until(pilot, lambda: app.last_finished is not None and app.generation is None)
        assert app.last_finished.stats.stop_reason == CANCELLED and not app.loading_row.display
        read = len(app.engine.main_ctx.tokens)
        assert 32 <= read < app.last_finished.stats.prompt_tokens_count - 1
        reply = app.query(AssistantMessage).last()
        assert "stopped while reading the conversation" in str(reply.border_subtitle) and reply.has_class("cancelled")
        assert f"ctx {read}/" in app.status_bar.render().plain

        monkeypatch.setattr(speculative, "PROMPT_PROGRESS_AFTER", 60.0)  # a quick read says nothing
        app.last_finished = None
        await send(pilot, app, "the end")
        stats = app.last_finished.stats
        assert stats.prompt_tokens_evaluated < stats.prompt_tokens_count - read + 16  # went on from what was read
        assert stats.predicted_tokens_count > 0 and not app.loading_row.display
        assert "tok/s" in str(app.query(AssistantMessage).last().border_subtitle)


async def test_settings_open_on_the_first_field_and_say_what_is_wrong_in_words(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        await pilot.pause()
        form = app.screen
        assert app.focused is form.query_one("#set-temperature")
        await pilot.press(*"0.5")  # the first keystrokes go into the first field (its old value selected)
        assert form.query_one("#set-temperature").value == "0.5"
        form.query_one("#set-draft_max").value = "100"
        form.query_one("#set-top_k").value = "many"
        await pilot.press("ctrl+s")
        assert app.screen is form  # not saved: the reasons under their fields, the first bad one focused
        errors = {name: str(form.query_one(f"#error-{name}", Label).content) for name in ("draft_max", "top_k", "min_p")}
        assert errors == {"draft_max": "Draft max must be a whole number between 0 and 64",
                          "top_k": "Top-k must be a whole number, at least 0", "min_p": ""}  # fmt: skip
        assert form.query_one("#error-draft_max").display and not form.query_one("#error-min_p").display
        assert form.query_one("#set-draft_max").has_class("-invalid")
        assert app.focused is form.query_one("#set-top_k")
        assert not any("'" in n.message or "draft_max" in n.message for n in app._notifications)
        form.query_one("#set-top_k").value = "20"
        await pilot.pause()
        assert not form.query_one("#error-top_k").display  # a corrected value loses its reason
        form.query_one("#set-draft_max").value = "4"
        form.query_one("#set-draft_min").value = "6"
        await pilot.press("ctrl+s")
        assert app.screen is form
        assert str(form.query_one("#error-draft_min", Label).content) == "Draft min must not be more than draft max (4)"
        form.query_one("#set-draft_min").value = "2"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        settings = app.config.settings
        assert (settings.temperature, settings.top_k, settings.draft_max, settings.draft_min) == (0.5, 20, 4, 2)


async def test_pickers_tell_quantizations_apart_and_a_main_model_gets_its_draft_back(home: Path) -> None:
    """Two files of one model show their quantization; going to another main model and back brings back the
    draft last used with it (a path typed on the command line and the picker's are the same model)."""
    import llama_cpp

    from tests import tiny_models

    models = home / "models"
    tiny_models.quantize(models / "main.gguf", models / "main-q8.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        assert app.spec.draft == str(models / "draft.gguf")
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        labels = {Path(key).name: str(option.prompt).split("\n")[0] for key, option in picker_options(app).items() if key}
        assert labels["main.gguf"].startswith("tiny-main · F32  (main.gguf)")
        assert labels["main-q8.gguf"] == "tiny-main · Q8_0  (main-q8.gguf)"
        await pilot.press(*"twin", "enter")
        await until(pilot, lambda: app.spec.main.name == "twin.gguf" and not app.loading)
        assert app.spec.draft == "lookup"  # nothing remembered for it
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        await pilot.press(*"main.gguf", "enter")
        await until(pilot, lambda: app.spec.main.name == "main.gguf" and not app.loading)
        assert app.spec.draft == str(models / "draft.gguf")

        from app.engine.demo import demo_paths

        demo_main, demo_draft = demo_paths()
        assert app.default_draft_for("") == app.default_draft_for(str(demo_main)) == str(demo_draft)
        app.config.default_drafts[""] = "none"  # the demo pair was last used with no draft
        assert app.default_draft_for(str(demo_main)) == "none"


async def test_reopened_chats_keep_their_stats_and_tell_apart_in_the_list(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await send(pilot, app, "the cat sat")
        first_note = str(app.query(AssistantMessage).last().border_subtitle)
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query(UserMessage))
        app.last_finished = None
        await send(pilot, app, "the cat sat")  # a second chat that starts alike
        app.last_finished = None
        await send(pilot, app, "hello world")
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query(UserMessage))

        await pilot.press("f7")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        shown = [str(option.prompt) for option in picker_options(app).values()]
        assert len(shown) == 2 and all(text.startswith("the cat sat") for text in shown)
        newest, oldest = shown
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d · 4 messages · last: hello world", newest)
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d · 2 messages · reply: ", oldest)
        await pilot.press("down", "enter")  # the older one
        await until(pilot, lambda: len(app.query(UserMessage)) == 1)
        reply = app.query(AssistantMessage).last()
        assert str(reply.border_subtitle) == first_note and "tok/s" in first_note  # its stats line is back


async def test_page_keys_scroll_the_chat_while_typing(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        for i in range(6):
            await app.chat_log.mount(UserMessage("\n".join(f"line {i}.{n}" for n in range(12))))
        await pilot.pause()
        app.chat_log.scroll_end(animate=False)
        await pilot.pause()
        await pilot.press(*"half a mess")
        assert app.focused is app.prompt_box
        bottom = app.chat_log.scroll_y
        assert bottom > 0
        await pilot.press("pageup")
        await until(pilot, lambda: app.chat_log.scroll_y < bottom)
        await pilot.press("pagedown")
        await until(pilot, lambda: app.chat_log.scroll_y == bottom)
        assert app.prompt_box.value == "half a mess" and app.focused is app.prompt_box


async def test_palette_lists_tandems_commands_and_the_ready_toast_leaves_the_status_bar_clear(home: Path) -> None:
    from textual.command import CommandPalette
    from textual.widgets._toast import Toast

    app = make_app(home)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await until(pilot, lambda: any(toast.region.height for toast in app.screen.query(Toast)))
        ready = [n for n in app._notifications if n.title == "Ready"]
        assert len(ready) == 1 and ready[0].timeout <= 3 and "tiny-main · F32 with draft.gguf" in ready[0].message
        for toast in app.screen.query(Toast):
            assert not toast.region.overlaps(app.status_bar.region)
            assert not toast.region.overlaps(app.prompt_box.region)

        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert titles[0] == "New chat" and "Quit" in titles
        assert not {"Theme", "Change theme", "Screenshot", "Save screenshot", "Maximize", "Keys"} & set(titles)
        await send(pilot, app, "the cat")
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"new chat")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: not app.query(UserMessage))


async def test_quitting_while_models_load_stops_the_load_and_keeps_nothing(home, monkeypatch, tmp_path) -> None:
    """A first load measures this CPU's kernels in child processes and runs a self-check (seconds); quitting
    in the middle ends the load at its next step, kills any trial child, and never touches a half-loaded model."""
    import psutil

    from tests import tiny_models

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "fresh-cache"))  # nothing measured yet: the load is long
    model = tiny_models.k_quant_model(home / "models", seed=11, name="slow-q4km")
    options = LaunchOptions(config_path=default_config_path(), main=str(model), draft="lookup",
                            settings={"threads": 2, "ctx_size": 512})  # fmt: skip
    app = TandemApp(options)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.loading and app.load_thread is not None)
        await pilot.pause(0.3)
        started = time.monotonic()
        app.exit()
    assert not app.unfinished_load and time.monotonic() - started < 15
    assert app.engine is None  # nothing half-loaded was adopted
    assert not [p for p in psutil.Process().children(recursive=True) if "--kernel-trial" in " ".join(p.cmdline())]


async def test_a_very_long_conversation_reopens_without_freezing_the_app(home, monkeypatch) -> None:
    """2,500 turns (a 20 MB file, read as if from a slow disk): read off the UI thread, keys answered meanwhile,
    the last messages shown, and the next turn reads only the latest turns that fit in the context."""
    import app.tui.app as tui_app
    from tests.test_config_history import long_conversation

    def slow_read(path: Path):
        time.sleep(2.0)
        return read_conversation(path)

    monkeypatch.setattr(tui_app, "read_conversation", slow_read)

    history = home / "data" / "history"
    history.mkdir(parents=True)
    long_conversation(history / "20200101-000000.jsonl", turns=2500, reply_rounds=300)
    app = make_app(home, max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f7")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen))
        await pilot.press("enter")
        await until(pilot, lambda: app.history_busy, timeout=2)
        started = time.monotonic()
        await pilot.press("x")  # typed while the conversation is read
        await until(pilot, lambda: app.prompt_box.value == "x", timeout=5)
        assert time.monotonic() - started < 1.0 and app.history_busy  # answered before the conversation is in
        await until(pilot, lambda: app.query(UserMessage), timeout=60)
        assert len(app.query(UserMessage)) + len(app.query(AssistantMessage)) <= 60
        assert "4,972 earlier messages are not shown" in str(app.query_one(".earlier-note").render())
        app.last_finished = None
        await pilot.press("backspace")
        await send(pilot, app, "and the dog")
        await until(pilot, lambda: app.last_finished is not None, timeout=60)
        assert app.last_finished.stats.prompt_tokens_count <= 512
        lines = [strip.text for strip in app.query_one(DebugPane).lines]
        assert any("the model reads the last" in line and "of 5,001 messages" in line for line in lines)


async def test_settings_take_rpc_workers_by_the_same_rule_as_the_flag(home: Path) -> None:
    """F6 sets the workers the main model runs on (--rpc) and says in words what a bad list should look like;
    a valid list is saved with the configuration."""
    app = make_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        form = app.screen
        form.query_one("#set-rpc").value = "worker-without-port"
        await pilot.press("ctrl+s")
        assert app.screen is form
        assert str(form.query_one("#error-rpc", Label).content).startswith("RPC workers must be HOST:PORT worker addresses")
        form.query_one("#set-rpc").value = "127.0.0.1:50052"
        form.query_one("#set-tensor_split").value = "3,1"
        assert form.query_one("#set-tensor_split").value == "3,1"
        await pilot.press("escape")  # a reload onto a worker that is not there is the loading tests' business
        await until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.config.settings.rpc == ""
