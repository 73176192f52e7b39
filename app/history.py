"""Conversations saved as they happen: one JSON-lines file per conversation in the user data dir.

Every round's text is appended and flushed by the generating thread, so killing the app loses at
most the round in flight. A line is one record: {"user": text}, {"assistant": text-so-far delta},
{"end": {...stats}}. Reading folds consecutive assistant deltas into one message; a torn last line
(a kill mid-write) is skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import platformdirs

from app.engine.chat import Message


def history_dir() -> Path:
    override = os.environ.get("TANDEM_DATA_DIR")
    base = Path(override) if override else Path(platformdirs.user_data_dir("tandem"))
    return base / "history"


@dataclass
class Conversation:
    path: Path
    messages: list[Message] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)  # indexes of replies the user stopped
    interrupted: set[int] = field(default_factory=set)  # indexes of replies cut short with no end record (a killed app)
    stats: dict[int, dict[str, object]] = field(default_factory=dict)  # a reply's index -> its end record (stats)

    @property
    def title(self) -> str:
        first = next((m.content for m in self.messages if m.role == "user"), "(empty)")
        first = " ".join(first.split())
        return first if len(first) <= 60 else first[:59] + "…"


class ConversationLog:
    """Appends one conversation's records. Lines are written whole and flushed (no fsync:
    a killed process keeps what it flushed; a power cut is not what we guard against).

    A history that cannot be written (a read-only or full disk, a data dir that is a file) must not
    stop the chat: the first OSError is kept in `error`, later records are dropped, and the app
    reports `problem()` once."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        # a new conversation's file is created at its first record, and must be its own: another app on the same
        # data folder may have picked the same name meanwhile (HistoryStore.new_log), so it is created exclusively,
        # the next free name taken if need be. A reopened conversation appends to its file.
        self.fresh = fresh
        self._file: IO[str] | None = None
        self.error: OSError | None = None

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.fresh:
            return open(self.path, "a", encoding="utf-8")  # kept open across turns
        stem, n = self.path.stem, 1
        while True:
            try:
                return open(self.path, "x", encoding="utf-8")
            except FileExistsError:
                n += 1
                self.path = self.path.with_name(f"{stem}-{n}.jsonl")

    def _write(self, record: dict[str, object]) -> None:
        if self.error is not None:
            return  # one record missing would fold the next ones into the wrong message
        try:
            if self._file is None:
                self._file = self._open()
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except OSError as exc:
            self.error = exc
            self.close()

    def problem(self) -> str:
        """One line for the user: where the history should have gone and what the OS said."""
        if self.error is None:
            return ""
        reason = self.error.strerror or str(self.error)
        return f"History cannot be saved in {self.path.parent}: {reason}. The chat goes on, but it is not kept."

    def user(self, text: str) -> None:
        self._write({"user": text})

    def assistant(self, delta: str) -> None:
        if delta:
            self._write({"assistant": delta})

    def end(self, stats: dict[str, object], cancelled: bool) -> None:
        self._write({"end": {"cancelled": cancelled, **stats}})

    def failed(self) -> None:
        """The turn raised before any reply: drop the user message on reopen (the engine did too)."""
        self._write({"failed": True})

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # flushes what is buffered: a full disk may only say so now
            except OSError as exc:
                self.error = self.error or exc


class HistoryStore:
    def __init__(self, directory: Path | None = None):
        self.directory = directory or history_dir()

    def new_log(self) -> ConversationLog:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.directory / f"{stamp}.jsonl"
        n = 1
        while path.exists():
            n += 1
            path = self.directory / f"{stamp}-{n}.jsonl"
        return ConversationLog(path, fresh=True)

    def conversations(self) -> list[Conversation]:
        """Saved conversations, newest first (empty and unreadable files left out)."""
        return [c for c in (read_conversation(s.path) for s in self.summaries()) if c.messages]

    def summaries(self) -> list[Summary]:
        """What the F7 picker lists, newest first: each file scanned once per change (cached in memory)."""
        if not self.directory.is_dir():
            return []
        found = [s for s in map(summarize, self.directory.glob("*.jsonl")) if s is not None]
        return sorted(found, key=lambda s: s.modified, reverse=True)


def read_conversation(path: Path) -> Conversation:
    conversation = Conversation(path)
    messages = conversation.messages
    reply: list[str] | None = None  # the deltas of the reply being read: joined once, not re-concatenated per line

    def settle() -> None:
        nonlocal reply
        if reply is not None:
            messages.append(Message("assistant", "".join(reply)))
            reply = None

    ended: set[int] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line torn by a kill mid-write (or not ours)
                if not isinstance(record, dict):
                    continue
                if "assistant" in record:
                    reply = reply if reply is not None else []
                    reply.append(str(record["assistant"]))
                    continue
                settle()
                if "user" in record:
                    messages.append(Message("user", str(record["user"])))
                elif "end" in record:
                    if messages and messages[-1].role == "user":  # a turn ended with no text at all
                        messages.append(Message("assistant", ""))
                    ended.add(len(messages) - 1)
                    if isinstance(record["end"], dict):
                        conversation.stats[len(messages) - 1] = record["end"]
                        if record["end"].get("cancelled"):
                            conversation.cancelled.add(len(messages) - 1)
                elif "failed" in record and messages and messages[-1].role == "user":
                    messages.pop()
    except OSError:
        return conversation
    settle()
    # a reply with no end record was cut short: the app was killed (or crashed) while it streamed
    conversation.interrupted = {i for i, m in enumerate(messages) if m.role == "assistant" and i not in ended}
    return conversation


@dataclass(frozen=True)
class Summary:
    """What the F7 picker shows of a saved conversation, read without building its messages."""

    path: Path
    modified: float  # st_mtime
    messages: int
    questions: int  # of those messages, the user's
    first_question: str
    last_question: str
    first_reply: str  # its start (SNIPPET characters at most)


SNIPPET = 120
_summaries: dict[Path, tuple[int, int, Summary]] = {}  # path -> (mtime_ns, size, Summary): a file read once per change


def summarize(path: Path) -> Summary | None:
    """The picker's view of one file (None when it holds no message or cannot be read). Only user records and
    the start of the first reply are decoded: assistant deltas, most of a file's lines, are only counted."""
    try:
        stat = path.stat()
    except OSError:
        return None
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _summaries.get(path)
    if cached is not None and cached[:2] == version:
        return cached[2]
    questions: list[str] = []
    roles: list[str] = []  # each message's role, as read_conversation would build them
    open_reply, replies, first_reply = False, 0, ""  # open_reply: the next delta continues the last message
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                # a delta (ConversationLog wrote it): decoded only where it starts a reply or the first reply's snippet
                if line.startswith('{"assistant"') and (open_reply or "assistant" in _record(line)):
                    if not open_reply:
                        roles.append("assistant")
                        open_reply, replies = True, replies + 1
                    if replies == 1 and len(first_reply) < SNIPPET:
                        first_reply += str(_record(line).get("assistant", ""))
                    continue
                record = _record(line)
                if not record:
                    continue
                open_reply = False
                if "user" in record:
                    questions.append(str(record["user"]))
                    roles.append("user")
                elif "end" in record and roles[-1:] == ["user"]:  # a turn that ended with no text at all
                    roles.append("assistant")
                elif "failed" in record and roles[-1:] == ["user"]:
                    questions.pop()
                    roles.pop()
    except OSError:
        return None
    if not roles:
        return None
    first, last = (questions[0], questions[-1]) if questions else ("", "")
    summary = Summary(path, stat.st_mtime, len(roles), len(questions), first, last, first_reply[:SNIPPET])
    _summaries[path] = (*version, summary)
    return summary


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return {}  # a line torn by a kill mid-write (or not ours: nested beyond what the parser takes)
    return record if isinstance(record, dict) else {}
