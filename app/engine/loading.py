"""Turning a choice of files into a running engine: validate both headers first, then load.

Shared by the CLI and the chat app, so both fail the same way with the same sentence.
A draft choice is a GGUF path, "mtp" (the main model's own multi-token-prediction head), "lookup" (prompt lookup,
no draft model) or "none" (plain decoding).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.engine import backends, kernels, rpc
from app.engine.backend import Model, check_cache_memory, choose_kernels, supports_gpu_offload, usable_context
from app.engine.compat import metadata_compatibility, require_compatible
from app.engine.errors import LoadCancelled, ModelFileError, TandemError
from app.engine.gguf_info import GGUFInfo, read_gguf_info
from app.engine.probe import PLAIN_ONLY, MainProfile
from app.engine.sources import LOOKUP, MTP, NO_DRAFT, SOURCES, draws_on
from app.engine.speculative import SpeculativeEngine

LoadProgress = Callable[[str, float], None]  # (what is loading, fraction done)
# the once-per-machine measurements (kernel trials, the self-check): (what is measured, steps done, steps in all)
StepProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EngineSpec:
    main: Path
    draft: str = LOOKUP  # a GGUF path, MTP, LOOKUP or NO_DRAFT
    gpu_layers: int = -1  # main-model layers offloaded; -1 all
    draft_on_gpu: bool = True  # the draft goes fully on the GPU or fully on the CPU
    ctx_size: int = 4096
    threads: int = os.cpu_count() or 1
    exact: bool = False  # batch-invariant kernels for the main model (no repacking): output identical to plain decoding
    parallel: int = 1  # replies generated together, one sequence each (--parallel, llama.cpp's -np)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers (HOST:PORT) the main model's layers go to (rpc.py)
    tensor_split: tuple[float, ...] = ()  # their shares of the layers (then this machine's GPUs'); empty: by memory

    @property
    def draft_path(self) -> Path | None:
        return None if self.draft in SOURCES else Path(self.draft)


def _main_on_workers(spec: EngineSpec, progress: Callable[[float], None] | None, cancel: threading.Event | None) -> Model:
    """The main model with its layers on the RPC workers (then this machine's GPUs), as llama.cpp's --rpc places
    them; the layers --gpu-layers leaves out, and the draft, stay here. Layers kept here get plain memory: safe
    at any batch on every CPU (AMX's repacked kernels are not), and a worker's own are plain too (ggml's RPC server
    allocates its backend's default buffers)."""
    workers = rpc.attach(spec.rpc)
    devices = [w.device for w in workers] + backends.gpu_devices()
    if len(spec.tensor_split) > len(devices):
        raise rpc.WorkerUnavailable(f"--tensor-split has {len(spec.tensor_split)} shares for {len(devices)} devices"
                                    f" ({', '.join(w.endpoint for w in workers)} and this machine's GPUs)")  # fmt: skip
    return Model(spec.main, n_gpu_layers=spec.gpu_layers, progress=progress, kernels=kernels.PLAIN_CHOICE, cancel=cancel,
                 devices=devices, tensor_split=spec.tensor_split, where=rpc.describe(workers), mtp=spec.draft == MTP)  # fmt: skip


def default_draft(info: GGUFInfo) -> str:
    """A main model's own draft when nothing else is chosen: its MTP head when it carries one (as llama-server's
    draft-mtp and LM Studio do), else prompt lookup."""
    return MTP if info.mtp_layers else LOOKUP


def own_draft(main: Path) -> str:
    """default_draft of the file at `main`; prompt lookup when it cannot be read (the load says why, in one place)."""
    try:
        return default_draft(read_gguf_info(main))
    except (TandemError, OSError):
        return LOOKUP


def describe_draft(choice: str) -> str:
    if choice == NO_DRAFT:
        return "no draft (plain decoding)"
    if choice == LOOKUP:
        return "prompt lookup"
    if choice == MTP:
        return "the model's MTP head"
    return Path(choice).name


def load_engine(
    spec: EngineSpec,
    progress: LoadProgress | None = None,
    reuse_main: Model | None = None,  # the main model already loaded for `spec` (only the draft changes)
    main_profile: MainProfile | None = None,
    measuring: StepProgress | None = None,  # default: reported through `progress`
    cancel: threading.Event | None = None,  # set: the load stops at its next step (LoadCancelled), nothing kept
) -> SpeculativeEngine:
    """Load the pair described by `spec`. Raises a TandemError subclass with a readable reason."""
    main_info = read_gguf_info(spec.main)  # both headers checked before either model loads: fail fast, fail clearly
    draft_info = read_gguf_info(spec.draft_path) if spec.draft_path is not None else None
    if spec.draft == MTP and not main_info.mtp_layers:
        raise ModelFileError(f"{spec.main.name} has no MTP head (no nextn layers this llama.cpp runs): pick a draft model "
                             "or prompt lookup")  # fmt: skip
    on_cpu = not spec.rpc and (spec.gpu_layers == 0 or not supports_gpu_offload())
    if on_cpu:  # both caches, from the headers, before any weight is read or any kernel trial runs
        n_ctx = usable_context(spec.ctx_size, main_info.context_length)
        per_token = sum(info.kv_bytes_per_token or 0 for info in (main_info, draft_info) if info is not None)
        names = " and ".join(info.path.name for info in (main_info, draft_info) if info is not None)
        check_cache_memory(names, per_token * n_ctx * spec.parallel, n_ctx, spec.parallel)
    if reuse_main is not None and bool(reuse_main.mtp_layers) != (spec.draft == MTP):
        raise ValueError("the loaded main model's MTP head does not match the draft choice: load it again")
    if draft_info is not None:  # before any kernel trial or load: an incompatible draft costs nothing
        require_compatible(spec.main.name, draft_info.path.name, metadata_compatibility(main_info, draft_info))

    def report(name: str) -> Callable[[float], None] | None:
        return None if progress is None else (lambda fraction: progress(name, fraction))

    if measuring is None and progress is not None:
        measuring = lambda what, done, total: progress(f"{what} {done}/{total}", done / max(total, 1))  # noqa: E731

    def called_off() -> None:
        if cancel is not None and cancel.is_set():
            raise LoadCancelled("loading was called off")

    def steps(what: str) -> Callable[[int, int], None] | None:
        def step(done: int, total: int) -> None:
            called_off()  # between measuring steps: a quit mid-measurement returns within one step
            if measuring is not None:
                measuring(what, done, total)

        return step if measuring is not None or cancel is not None else None

    main = reuse_main
    if main is None and spec.rpc:
        main = _main_on_workers(spec, report(spec.main.name), cancel)
    elif main is None:
        # --exact: plain memory, whose kernels compute a row the same way at any batch size (the repacked ones
        # do not); the engine's self-check confirms it or turns drafting off. Otherwise measured (kernels.py).
        choice = kernels.PLAIN_CHOICE if spec.exact else choose_kernels(
            spec.main, spec.gpu_layers, spec.threads, "main", steps(f"{spec.main.name}: trying this CPU's kernels"), cancel,
            sequences=spec.parallel, drafting=bool(draws_on(spec.draft)))
        main = Model(spec.main, n_gpu_layers=spec.gpu_layers, progress=report(spec.main.name), kernels=choice, cancel=cancel,
                     mtp=spec.draft == MTP)  # fmt: skip
    draft = None
    check = steps(f"{spec.main.name}: measuring this CPU's kernels (once), batch sizes")
    try:
        if draft_info is not None:
            on_cpu = not spec.draft_on_gpu or not supports_gpu_offload()
            layers = 0 if on_cpu else -1
            choice = choose_kernels(draft_info.path, layers, spec.threads, "draft",
                                    steps(f"{draft_info.path.name}: trying this CPU's kernels"), cancel)  # fmt: skip
            draft = Model(draft_info.path, n_gpu_layers=layers, progress=report(draft_info.path.name), kernels=choice,
                          role="draft", cancel=cancel)  # fmt: skip
        called_off()
        # prompt lookup rides along with a draft model (the controller picks per round) and stands in when there is none
        return SpeculativeEngine(
            main, draft, n_ctx=spec.ctx_size, n_threads=spec.threads, lookup=LOOKUP in draws_on(spec.draft), exact=spec.exact,
            main_profile=None if main_profile is PLAIN_ONLY else main_profile,  # a plain-only engine never probed
            progress=check, n_seq=spec.parallel, mtp=spec.draft == MTP,
        )  # fmt: skip
    except BaseException:
        if reuse_main is None:
            main.close()
        if draft is not None:
            draft.close()
        raise
