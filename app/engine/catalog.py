"""Finding GGUF models on disk and judging draft/main pairs from metadata alone (no weights loaded).

The pickers list what they find here: ./models, the demo cache, LM Studio's model folder, the
Hugging Face cache and any directory the user names. A header read takes milliseconds, so a
folder of models is indexed while the picker opens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.engine.errors import ModelFileError
from app.engine.gguf_info import GGUFInfo, read_gguf_info

MAX_DEPTH = 6  # the HF cache nests models/<name>/snapshots/<hash>/file.gguf


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    info: GGUFInfo | None  # None when the header could not be read
    error: str = ""

    @property
    def size_text(self) -> str:
        size = self.info.file_size if self.info else (self.path.stat().st_size if self.path.exists() else 0)
        return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"

    @property
    def params_text(self) -> str:
        n = self.info.n_params if self.info else 0
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"

    def describe(self) -> str:
        if self.info is None:
            return f"{self.size_text}  unreadable: {self.error}"
        return f"{self.info.architecture}  {self.params_text} params  {self.info.quantization}  {self.size_text}"


def default_search_dirs(extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Where models usually live, in the order they are listed; only existing directories."""
    from app.engine.demo import models_dir

    candidates = [Path(p).expanduser() for p in extra]
    candidates += [Path.cwd() / "models", models_dir(), Path.home() / ".lmstudio" / "models"]
    if os.environ.get("HF_HUB_CACHE"):
        candidates.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        candidates.append(Path(os.environ["HF_HOME"]) / "hub")
    candidates.append(Path.home() / ".cache" / "huggingface" / "hub")
    seen: set[Path] = set()
    found = []
    for directory in candidates:
        resolved = directory.resolve()
        if resolved not in seen and resolved.is_dir():
            seen.add(resolved)
            found.append(directory)
    return found


def _walk_gguf(directory: Path, depth: int = 0) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name.lower())
    except OSError:
        return  # unreadable folder: skip it, the others still count
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(".gguf"):
            yield Path(entry.path)
        elif entry.is_dir() and depth < MAX_DEPTH:
            yield from _walk_gguf(Path(entry.path), depth + 1)


def find_models(directories: Iterable[Path]) -> list[ModelEntry]:
    """Every GGUF file under `directories` (symlinks such as the HF cache's resolved once each)."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()
    for directory in directories:
        for path in _walk_gguf(Path(directory)):
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                entries.append(ModelEntry(path, read_gguf_info(path)))
            except ModelFileError as exc:
                entries.append(ModelEntry(path, None, str(exc).replace(str(path), path.name)))
    return entries
