"""Settings files, conversation history, model discovery and accepted-token attribution."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from app.config import Config, ConfigError, Settings, dump_config, load_config, save_config
from app.engine.catalog import find_models
from app.engine.compat import metadata_compatibility
from app.engine.events import Finished, GenerationStats, RoundEvent
from app.engine.gguf_info import read_gguf_info
from app.engine.transcript import DRAFT, MAIN, ReplyTranscript
from app.history import ConversationLog, HistoryStore, read_conversation


def test_config_round_trips(tmp_path: Path) -> None:
    config = Config(main="/models/a \"quoted\" ü.gguf", draft="lookup", dirs=["/x", "~/y"])
    config.settings.set("temperature", 0.25)
    config.settings.set("adaptive", "off")
    config.settings.set("seed", 7)
    config.default_drafts["/models/a.gguf"] = "/models/b.gguf"
    path = tmp_path / "c" / "config.toml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert not path.with_name("config.toml.tmp").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[settings]\ntemperature = -1\n", "temperature' must be at least 0.0"),
        ("[settings]\ntop_p = 2\n", "between 0.0 and 1.0"),
        ("[settings]\nmax_tokens = 1.5\n", "must be a int"),
        ("[settings]\nadaptive = 3\n", "must be a bool"),
        ("[settings]\nwarp = 9\n", "unknown setting 'warp'"),
        ("[settings]\nrepeat_penalty = 0\n", "'repeat_penalty' must be at least 0.01"),  # 0 would divide logits by zero
        ("[settings]\ndraft_min = 9\ndraft_max = 4\n", "larger than draft_max"),
        ("[models\n", "not valid TOML"),
        ("models = 3\n", "[models] must be a table"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_settings_may_come_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[settings]\ndraft_min = 9\ndraft_max = 12\n")  # draft_min above the default draft_max, until the next line
    settings = load_config(path).settings
    assert (settings.draft_min, settings.draft_max) == (9, 12)


def test_missing_config_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nope.toml") == Config()
    assert "[settings]" in dump_config(Config()) and Settings().draft_max == 16


def test_save_config_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """A device, a FIFO or a directory named as the config file is refused, never replaced by a file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "null"
    device.symlink_to("/dev/null")  # written through: the device itself is the target
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, kind in ((fifo, "FIFO"), (device, "character device"), (folder, "directory")):
        with pytest.raises(ConfigError) as info:
            save_config(Config(), path)
        message = str(info.value)
        assert str(path) in message and kind in message and "\n" not in message
    assert fifo.is_fifo() and device.is_symlink() and Path("/dev/null").is_char_device() and folder.is_dir()
    assert not list(tmp_path.glob("*.tmp")) and not list(folder.iterdir())


def test_save_config_writes_through_a_symlink(tmp_path: Path) -> None:
    """A config kept in a dotfiles folder and linked into place stays linked."""
    real = tmp_path / "dotfiles" / "tandem.toml"
    real.parent.mkdir()
    real.write_text(dump_config(Config()))
    real.chmod(0o640)
    link = tmp_path / "config" / "config.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    save_config(Config(main="/m.gguf"), link)
    assert link.is_symlink() and link.resolve() == real
    assert load_config(real).main == "/m.gguf" and real.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_save_leaves_no_temp_file_and_the_old_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    save_config(Config(main="/old.gguf"), path)

    def full(fd: int) -> None:  # a full disk often shows only when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ConfigError, match="No space left on device") as info:
        save_config(Config(main="/new.gguf"), path)
    assert str(path) in str(info.value)
    assert load_config(path).main == "/old.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_saving_over_an_unreadable_config_keeps_a_backup(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[models\nmain = 'my hand-written notes'\n")
    backup = save_config(Config(main="/m.gguf"), path)
    assert backup is not None and backup.parent == tmp_path and backup.name.startswith("config.toml.")
    assert backup.read_text() == "[models\nmain = 'my hand-written notes'\n"
    assert load_config(path).main == "/m.gguf"
    assert save_config(Config(main="/n.gguf"), path) is None  # a valid file is simply replaced
    assert len(list(tmp_path.iterdir())) == 2


def test_history_that_cannot_be_written_is_reported_not_raised(tmp_path: Path) -> None:
    """The data dir is a file here (chmod does not stop root): every write fails with an OSError."""
    (tmp_path / "data").write_text("not a folder")
    store = HistoryStore(tmp_path / "data" / "history")
    assert store.conversations() == []
    log = store.new_log()
    log.user("hi")  # no exception: the chat goes on without history
    log.assistant("hello")
    log.end({}, cancelled=False)
    log.close()
    assert isinstance(log.error, OSError) and log.error.strerror
    assert str(tmp_path / "data" / "history") in log.problem() and log.error.strerror in log.problem()


def test_history_write_errors_midway_are_kept_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = ConversationLog(tmp_path / "c.jsonl")
    log.user("hi")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(log._file, "write", denied)
    log.assistant("hello")
    log.assistant("again")  # dropped quietly after the first failure
    log.close()
    assert isinstance(log.error, PermissionError) and "Permission denied" in log.problem()
    assert [m.content for m in read_conversation(log.path).messages] == ["hi"]


def test_history_survives_a_torn_last_line(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    log = store.new_log()
    log.user("hi")
    log.assistant("Hel")
    log.assistant("lo")
    log.end({"tokens_per_second": 1.0}, cancelled=True)
    log.user("again")
    log.failed()  # the engine refused this turn: it is not part of the chat
    log.user("more")
    log.assistant("partial")
    log.close()
    with open(log.path, "a") as f:
        f.write('{"assistant": "cut mid-wr')  # a kill while writing
    conversation = read_conversation(log.path)
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "hi"), ("assistant", "Hello"), ("user", "more"), ("assistant", "partial"),
    ]  # fmt: skip
    assert conversation.cancelled == {1}
    assert conversation.interrupted == {3}  # the last reply has no end record: the app was killed while it streamed
    assert [c.path for c in store.conversations()] == [log.path]
    assert conversation.title == "hi"


def test_two_apps_on_one_data_folder_keep_their_conversations_apart(tmp_path: Path) -> None:
    """Two processes pick the same file name in the same second (neither has written yet): each conversation
    still gets a file of its own."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "time.strftime = lambda *a: '20261130-120000'  # the same second for both\n"
        "from app.history import HistoryStore\n"
        "log = HistoryStore(Path(sys.argv[1])).new_log()\n"
        "Path(sys.argv[1], sys.argv[2] + '.picked').touch()\n"
        "while len(list(Path(sys.argv[1]).glob('*.picked'))) < 2: time.sleep(0.01)  # both have picked a name\n"
        "log.user('question from ' + sys.argv[2]); log.assistant('answer for ' + sys.argv[2]); log.end({}, False); log.close()\n"
    )
    root = Path(__file__).resolve().parents[1]
    apps = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name], cwd=root) for name in ("a", "b")]
    assert [app.wait(timeout=60) for app in apps] == [0, 0]
    conversations = HistoryStore(tmp_path).conversations()
    assert sorted(c.path.name for c in conversations) == ["20261130-120000-2.jsonl", "20261130-120000.jsonl"]
    for conversation in conversations:
        name = conversation.messages[0].content.removeprefix("question from ")
        assert [m.content for m in conversation.messages] == [f"question from {name}", f"answer for {name}"]
        assert conversation.stats.keys() == {1} and not conversation.interrupted


def test_catalog_finds_models_and_judges_drafts(tiny, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "nested"
    folder.mkdir(parents=True)
    for path in (tiny.main, tiny.draft, tiny.foreign):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not a model")
    (folder / "empty.gguf").write_bytes(b"")
    entries = {e.path.name: e for e in find_models([tmp_path / "models"])}
    assert set(entries) == {"main.gguf", "draft.gguf", "foreign.gguf", "empty.gguf"}
    assert entries["empty.gguf"].info is None and "not a GGUF" in entries["empty.gguf"].error
    assert "llama" in entries["main.gguf"].describe()
    main = read_gguf_info(tiny.main)
    assert metadata_compatibility(main, read_gguf_info(tiny.draft)).ok
    verdict = metadata_compatibility(main, read_gguf_info(tiny.foreign))
    assert not verdict.ok and "differs" in verdict.reason
    assert read_gguf_info(tiny.main).token_texts([1, 2, 10_000]) == {1: "<s>", 2: "</s>"}


PIECES = {1: b"ab", 2: b"c", 3: "é".encode()[:1], 4: "é".encode()[1:] + b"!", 5: b"zz"}


def _round(tokens: tuple[int, ...], n_accepted: int, text: str) -> RoundEvent:
    return RoundEvent(drafted=tokens[:n_accepted], n_accepted=n_accepted, main_token=tokens[-1], n_ignored=0,
                      tokens=tokens, text=text, draft_seconds=0, verify_seconds=0, draft_source="model",
                      pieces=tuple(PIECES[t] for t in tokens[:n_accepted] + tokens[-1:]))  # fmt: skip


def test_transcript_credits_characters_to_draft_or_main() -> None:
    transcript = ReplyTranscript()
    transcript.add(_round((1, 2), 1, "abc"))
    transcript.add(_round((3,), 0, ""))  # half a character
    transcript.add(_round((4,), 0, "é!"))
    transcript.add(_round((5,), 0, ""))  # held back (could start a stop string)
    assert transcript.runs() == [(DRAFT, "ab"), (MAIN, "cé!")]
    transcript.add(Finished(text="abcé!z", tail="z", tokens=(), stats=GenerationStats()))
    assert transcript.runs() == [(DRAFT, "ab"), (MAIN, "cé!z")]
    assert json.dumps(transcript.runs())


def test_draft_choices_put_compatible_first_and_say_why_not(tiny, tmp_path: Path) -> None:
    from app.tui.choices import draft_choices, model_choices

    for path in (tiny.main, tiny.draft, tiny.foreign):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    entries = find_models([tmp_path])
    choices = draft_choices(tmp_path / "main.gguf", read_gguf_info(tiny.main), entries)
    assert [c.value for c in choices[:3]] == ["none", "lookup", str(tmp_path / "draft.gguf")]
    rest = {Path(c.value).name: c for c in choices[3:]}
    assert not rest["main.gguf"].enabled and "main model" in rest["main.gguf"].detail
    assert not rest["foreign.gguf"].enabled and rest["foreign.gguf"].detail.startswith("incompatible: token")
    assert "not smaller" in choices[2].detail  # the tiny draft is as big as the tiny main
    listed = model_choices(entries, demo_fetched=False)
    assert listed[0].value == "" and len(listed) == 4


def write_records(path: Path, records: list[dict | str]) -> Path:
    """A history file as ConversationLog writes it (a str is written as it is: a torn line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def test_the_pickers_summary_agrees_with_reading_the_whole_conversation(tmp_path: Path) -> None:
    """The F7 list decodes only what it shows; on any mix of records (torn lines, failed turns, empty replies)
    it counts and quotes what read_conversation builds."""
    import random

    from app.history import summarize

    rng = random.Random(5)
    kinds = [{"user": "q"}, {"assistant": "a"}, {"assistant": "é"}, {"end": {"cancelled": False}}, {"failed": True},
             '{"assistant": "tor', '{"us']  # fmt: skip
    for i in range(1500):
        records = [rng.choice(kinds) for _ in range(rng.randint(0, 12))]
        records = [{k: f"{v}{n}" for k, v in r.items()} if isinstance(r, dict) and ("user" in r or "assistant" in r) else r
                   for n, r in enumerate(records)]  # fmt: skip
        path = write_records(tmp_path / f"{i}.jsonl", records)
        whole, summary = read_conversation(path), summarize(path)
        if not whole.messages:
            assert summary is None, records
            continue
        questions = [m.content for m in whole.messages if m.role == "user"]
        replies = [m.content for m in whole.messages if m.role == "assistant" and m.content]
        assert summary is not None and summary.messages == len(whole.messages), records
        assert (summary.questions, summary.first_question, summary.last_question) == (
            len(questions), questions[0] if questions else "", questions[-1] if questions else ""), records  # fmt: skip
        assert summary.first_reply == (replies[0][:120] if replies else ""), records


def long_conversation(path: Path, turns: int, reply_rounds: int) -> Path:
    """A conversation of `turns` questions, each reply written as `reply_rounds` deltas (as it streamed)."""
    with open(path, "w", encoding="utf-8") as out:
        for turn in range(turns):
            out.write(json.dumps({"user": f"question {turn}: the cat sat on the mat"}) + "\n")
            out.writelines(json.dumps({"assistant": "the cat sat on the mat "}) + "\n" for _ in range(reply_rounds))
            out.write(json.dumps({"end": {"cancelled": False, "predicted_tokens_count": reply_rounds}}) + "\n")
    return path


def test_five_thousand_saved_chats_are_listed_quickly_and_read_once(tmp_path: Path) -> None:
    for i in range(5000):
        long_conversation(tmp_path / f"2026{i:08d}.jsonl", turns=4, reply_rounds=30)
    store = HistoryStore(tmp_path)
    started = time.monotonic()
    summaries = store.summaries()
    first = time.monotonic() - started
    assert len(summaries) == 5000 and summaries[0].messages == 8 and summaries[0].questions == 4
    assert first < 4.0  # it took 6 s when every file was decoded whole (2.4 s here, 0.6 s now, on 2 busy cores)
    started = time.monotonic()
    assert store.summaries() == summaries and time.monotonic() - started < first / 3  # unchanged files: not read again


def test_a_long_reply_is_read_in_linear_time(tmp_path: Path) -> None:
    """Deltas are joined once per reply: concatenating them one by one was quadratic (minutes for a 50 MB chat)."""
    path = long_conversation(tmp_path / "long.jsonl", turns=20, reply_rounds=20_000)
    started = time.monotonic()
    conversation = read_conversation(path)
    assert len(conversation.messages) == 40 and len(conversation.messages[1].content) == 20_000 * 23
    assert time.monotonic() - started < 10
