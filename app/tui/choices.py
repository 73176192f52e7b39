"""What the pickers list, built from the model catalog (no widgets here: tested on its own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.engine.catalog import ModelEntry
from app.engine.compat import metadata_compatibility
from app.engine.gguf_info import GGUFInfo
from app.engine.loading import LOOKUP, NO_DRAFT

DEMO = ""  # the main-model choice meaning "the demo pair" (fetched on first use)


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    detail: str = ""
    enabled: bool = True  # a disabled choice is listed with the reason it cannot be picked


def model_choices(entries: list[ModelEntry], demo_fetched: bool) -> list[Choice]:
    choices = []
    if not demo_fetched:
        choices.append(Choice(DEMO, "Demo pair: SmolLM2-135M-Instruct F16 + Q4_1 draft", "fetched from PyPI on first use"))
    for entry in entries:
        label = entry.info.name if entry.info else entry.path.name
        detail = f"{entry.describe()}  {entry.path.parent}"
        choices.append(Choice(str(entry.path), f"{label}  ({entry.path.name})", detail, enabled=entry.info is not None))
    return choices


def draft_choices(main_path: Path, main_info: GGUFInfo, entries: list[ModelEntry]) -> list[Choice]:
    """No draft and prompt lookup first, then compatible drafts, then the rest with the reason."""
    fixed = [
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
            compatible.append(Choice(str(entry.path), f"{entry.info.name}  ({entry.path.name})", detail))
    compatible.sort(key=lambda c: c.label.lower())
    return fixed + compatible + other
