"""Thin, allocation-aware wrappers over llama-cpp-python's low-level API: a model and a context.

Only what the speculative loop needs: decode a batch with logits at chosen positions, read those
logits as a numpy view over llama.cpp's own buffer (no copy), and cut the KV cache back to n tokens.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp
import numpy as np
import psutil

from app.engine import backends, kernels
from app.engine.errors import ContextOverflowError, LoadCancelled, ModelFileError, TandemError
from app.engine.gguf_info import GGUFInfo, read_gguf_info
from app.engine.kernels import KernelChoice, placement

_init_lock = threading.Lock()
_initialised = False
# llama.cpp's recent log lines: quoted back to the user when a load fails
_log_tail: deque[str] = deque(maxlen=40)
_log_verbose = bool(os.environ.get("TANDEM_LLAMA_LOG"))


# Ctrl+C that arrived while llama.cpp was calling back into Python (a log line, load progress). Raised
# there, KeyboardInterrupt would be printed as "Exception ignored" and lost: the callback records it,
# makes a load stop, and it is raised again once llama.cpp has returned (raise_if_interrupted).
_interrupted = threading.Event()


def raise_if_interrupted() -> None:
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    try:
        line = text.decode("utf-8", errors="replace")
        _log_tail.append(line)
        if _log_verbose:
            os.write(2, text)
    except KeyboardInterrupt:
        _interrupted.set()


def init_backend() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            backends.load()  # the CPU build that fits this CPU, and any GPU/RPC backend (backends.py)
            llama_cpp.llama_backend_init()
            _initialised = True


def _last_llama_error() -> str:
    lines = list(_log_tail)
    for line in reversed(lines):  # the loader's own reason, e.g. "unknown model architecture: 'x'"
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip()
    errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return errors[-1] if errors else "llama.cpp gave no reason (TANDEM_LLAMA_LOG=1 shows its log)"


@functools.cache
def amx_cpu() -> bool:
    """llama.cpp's loaded CPU backend uses Intel AMX (Xeon Sapphire Rapids and later)."""
    init_backend()
    return backends.backends().amx


def choose_kernels(path: Path, n_gpu_layers: int, n_threads: int, role: str,
                   progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
                   sequences: int = 1, drafting: bool = True) -> KernelChoice:  # fmt: skip
    """Where this model's weights go (kernels.py): measured on this CPU for the batches it will decode (`sequences`
    replies at once, drafted for or not), llama.cpp's default on a GPU."""
    init_backend()
    if n_gpu_layers != 0 and supports_gpu_offload():
        return kernels.DEFAULT
    return kernels.forced() or kernels.cached_choice(path, n_threads, role, progress, cancel, sequences, drafting)


def supports_gpu_offload() -> bool:
    """A GPU is there to take layers. (llama.cpp's llama_supports_gpu_offload also says yes for a build that
    merely has the RPC backend, with no worker attached: no layer would go anywhere.)"""
    init_backend()
    return backends.has_gpu()


class Model:
    """A loaded GGUF model (weights and vocabulary)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_gpu_layers: int = 0,
        progress: Callable[[float], None] | None = None,
        kernels: KernelChoice | None = None,  # None: measured on this CPU (choose_kernels), cached
        role: str = "main",  # or "draft": a draft may run on kernels safe only one token at a time
        cancel: threading.Event | None = None,  # set: the load stops at llama.cpp's next progress call (LoadCancelled)
        devices: Sequence[int] = (),  # where its layers go (RPC workers first, rpc.py); empty: this machine's GPUs
        tensor_split: Sequence[float] = (),  # each device's share of the layers; empty: by free memory
        where: str = "",  # where `devices` are, in words ("RPC 10.0.0.2:50052"): stats and the status bar
        mtp: bool = False,  # load the file's MTP head, if it has one llama.cpp runs (drafting with it: MtpContext)
    ):
        self.info: GGUFInfo = read_gguf_info(path)
        self.path = Path(path).expanduser().resolve()
        init_backend()
        self.devices = tuple(devices)
        self.where = where  # empty: this machine
        self._check_memory(n_gpu_layers)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        self.n_gpu_layers = n_gpu_layers
        if self.devices:  # a NULL-terminated list, kept alive as long as the model (llama.cpp reads it at load)
            self._device_list = (ctypes.c_void_p * (len(self.devices) + 1))(*self.devices, None)
            params.devices = ctypes.addressof(self._device_list)
        if tensor_split:
            self._split = (ctypes.c_float * max(len(tensor_split), llama_cpp.LLAMA_MAX_DEVICES))(*tensor_split)
            params.tensor_split = self._split
        # the model's own draft head (MtpContext), loaded only to draft with: on a GPU an MoE model's MTP block is a
        # whole expert layer of VRAM (llama-server too loads it only for draft-mtp)
        self.mtp_layers = self.info.mtp_layers if mtp else 0
        params.load_mtp = self.mtp_layers > 0
        self.kernels = kernels or choose_kernels(self.path, n_gpu_layers, os.cpu_count() or 1, role)
        params.use_extra_bufts, overrides = placement(self.info, self.kernels.bufts)
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.addressof(overrides)  # kept alive by `overrides` until the load returns
        def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            try:
                if progress is not None:
                    progress(fraction)
            except KeyboardInterrupt:
                _interrupted.set()
            return not (_interrupted.is_set() or (cancel is not None and cancel.is_set()))  # False: llama.cpp abandons the load

        callback = llama_cpp.llama_progress_callback(on_progress)  # must outlive the load: ctypes does not keep it
        params.progress_callback = callback
        _log_tail.clear()
        ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if _interrupted.is_set():
            if ptr:
                llama_cpp.llama_model_free(ptr)
            raise_if_interrupted()
        if cancel is not None and cancel.is_set():
            if ptr:
                llama_cpp.llama_model_free(ptr)
            raise LoadCancelled(f"{self.path.name}: loading was called off")
        if not ptr:
            raise ModelFileError(f"llama.cpp could not load {self.path} ({self.info.architecture} architecture): {_last_llama_error()}")
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer: int = llama_cpp.llama_model_n_layer(ptr)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(ptr)
        self.bos: int = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos: int = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        # Mamba, RWKV, LFM2, Granite-H, Qwen3.5, Nemotron-H...: a recurrent state, not a cache of positions. It
        # forgets its last tokens only through snapshots (n_rs_seq) or a saved checkpoint (Context.truncate)
        self.recurrent: bool = bool(llama_cpp.llama_model_is_recurrent(ptr) or llama_cpp.llama_model_is_hybrid(ptr))
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def _check_memory(self, n_gpu_layers: int) -> None:
        """Refuse a model that cannot fit in RAM before llama.cpp tries (and the OS kills us)."""
        if n_gpu_layers != 0 and (self.devices or supports_gpu_offload()):
            return  # weights go to the GPU or the workers; llama.cpp reports a shortfall itself
        need, free = self.info.file_size, psutil.virtual_memory().available
        if need > free:
            raise TandemError(
                f"{self.path.name} needs about {need / 2**30:.1f} GiB of memory but only {free / 2**30:.1f} GiB is free;"
                " pick a smaller quantization or close other programs"
            )

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def on_cpu(self) -> bool:
        return self.n_gpu_layers == 0 or not (self.devices or supports_gpu_offload())

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def abandon(self) -> None:
        """Never free it: its memory is on a worker that was lost, and freeing it would wait for that worker
        forever (rpc.py). Leaked until the process ends."""
        self.ptr = None

    def __del__(self) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as empty, like a chat UI shows them)."""
        cached = self._pieces.get(token)
        if cached is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
            cached = self._piece_buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def token_text(self, token: int) -> str:
        """The vocabulary entry itself (used to compare two vocabularies)."""
        return (llama_cpp.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        tmpl = llama_cpp.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8", errors="replace") if tmpl else None


# A recurrent (or hybrid) model's context keeps this many snapshots of each sequence's state, llama.cpp's n_rs_seq:
# after a decode, its last ROLLBACK_SNAPSHOTS tokens can be dropped (once) by llama_memory_seq_rm, as llama-server
# rolls back a verify. One snapshot costs one more copy of the recurrent state per sequence, so a draft sent to
# such a model is capped here (SpeculativeEngine), not at --draft-max.
class _Staging:
    """llama.cpp's staging API for MTP (src/llama-ext.h: C++ linkage, so called by the mangled names libllama exports;
    common/speculative.cpp's draft-mtp uses the same four): a context's last hidden states, row by row."""

    def __init__(self) -> None:
        lib = llama_cpp.llama_cpp._lib
        ctx, row = ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)
        self.set_embeddings_nextn = self._bind(lib, "_Z26llama_set_embeddings_nextnP13llama_contextbb",
                                               [ctx, ctypes.c_bool, ctypes.c_bool], None)  # fmt: skip
        self.get_embeddings_nextn = self._bind(lib, "_Z26llama_get_embeddings_nextnP13llama_context", [ctx], row)
        self.get_embeddings_nextn_ith = self._bind(lib, "_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
                                                   [ctx, ctypes.c_int32], row)  # fmt: skip

    @staticmethod
    def _bind(lib: ctypes.CDLL, name: str, argtypes: list, restype: object) -> Callable:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise TandemError(f"this llama.cpp build has no {name.split('llama_', 1)[-1].split('P13')[0]}: "
                              "MTP drafting needs llama-cpp-python 0.3.36 or later") from None  # fmt: skip
        fn.argtypes, fn.restype = argtypes, restype
        return fn


@functools.cache
def _staging() -> _Staging:
    return _Staging()


ROLLBACK_SNAPSHOTS = 8
# Beyond the snapshots, a recurrent sequence goes back to a saved checkpoint of its state (llama_state_seq_*,
# llama-server's context checkpoints): taken at the end of each prompt read, every CHECKPOINT_EVERY tokens of a
# long one and before a recurrent draft model drafts; the newest MAX_CHECKPOINTS per sequence are kept.
CHECKPOINT_EVERY = 256
MAX_CHECKPOINTS = 8
_PARTIAL = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: a hybrid model's recurrent part alone (its KV cache is cut by seq_rm)


class Context:
    """One llama.cpp context over a model: a KV cache of `n_seq` sequences of `tokens`, a reusable batch,
    logits views. Each sequence holds up to `n_ctx` tokens (the cache is one pool of n_ctx * n_seq cells,
    llama.cpp's unified KV cache, so one decode may carry tokens of every sequence). A recurrent model's
    context keeps rollback snapshots and checkpoints (ROLLBACK_SNAPSHOTS, CHECKPOINT_EVERY): truncate works
    for it too."""

    def __init__(self, model: Model, n_ctx: int, n_threads: int, n_batch: int = 512, n_seq: int = 1,
                 hidden: bool = False, head_of: Context | None = None, unified: bool = True):  # fmt: skip
        """`hidden`: keep every decoded token's last hidden state (hidden()), which an MTP head drafts from;
        `head_of`: this is the MTP head's context of that main context (MtpContext); `unified`: several sequences
        share one pool of KV cells (else each has its own stream, see shared_cells)."""
        self.model = model
        if model.on_cpu:  # no batch wider than the kernel trial checked (kernels.WIDEST): as cheap per token on a CPU
            n_batch = min(n_batch, kernels.WIDEST)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        params.n_seq_max = n_seq
        # One pool by default: a split cache breaks a mixed batch into one ubatch per sequence and cannot share a
        # prefix. But in one pool a sequence's cells sit among the others', and attention sums a row over all
        # of them in SIMD lanes: where its cells fall changes the rounding (a tiny Q4_K_M model, plain kernels,
        # another sequence decoded beside it: logits up to 1e-5 apart). --exact therefore takes a stream per
        # sequence, where its cells lie as they would alone (bit-identical, tests/test_exactness.py).
        self.shared_cells = n_seq > 1 and unified
        params.kv_unified = self.shared_cells
        params.no_perf = True
        # the MTP head's context holds only its own attention layer's KV cache, whatever the trunk is
        self.recurrent: bool = model.recurrent and head_of is None
        if self.recurrent:
            params.n_rs_seq = ROLLBACK_SNAPSHOTS
        if head_of is not None:  # the main model's multi-token-prediction head, run against the main context
            params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
            params.ctx_other = head_of.ptr
        if model.on_cpu:
            # llama.cpp's CPU flash attention is slower for one token at a time (21.7 vs 18.4 ms for the demo
            # main model at depth 300, 2 threads); "auto" turns it on. llama-bench's default is off too.
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if head_of is None:
            _check_cache_memory(model, n_ctx, n_seq)
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            shared = f" ({n_seq} sequences of {n_ctx}: lower --parallel or --ctx-size)" if n_seq > 1 else ""
            raise TandemError(f"llama.cpp could not create a context of {params.n_ctx} tokens{shared} for {model.path.name}: "
                              f"{_last_llama_error()}")  # fmt: skip
        self.ptr = ptr
        self.n_seq = n_seq
        self.n_ctx: int = llama_cpp.llama_n_ctx(ptr) // n_seq  # per sequence
        self.n_batch: int = llama_cpp.llama_n_batch(ptr)  # llama.cpp caps it at n_ctx; a bigger batch aborts
        self._memory = llama_cpp.llama_get_memory(ptr)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):
            self._batch.n_seq_id[i] = 1
        self.seqs: list[list[int]] = [[] for _ in range(n_seq)]  # per sequence: the tokens cached, position = index
        self.n_evaluated = 0  # tokens run through the model since creation (tests check draft sync with it)
        self.decode_seconds = 0.0  # time inside llama_decode: the rest of a generation is our own overhead
        self._n_outputs = 0
        self._logits_address = 0
        self._logits_view = np.empty((0, model.n_vocab), dtype=np.float32)
        # the most tokens one truncate may drop without a checkpoint (None: any number, a KV cache; 0: a recurrent
        # architecture llama.cpp keeps no snapshots for, Mamba, RWKV, Jamba, Granite-H...: every rollback is a checkpoint's)
        self.rollback_limit: int | None = llama_cpp.llama_n_rs_seq(ptr) if self.recurrent else None
        # per sequence: (tokens, state: a ctypes byte array holding llama_state_seq_get_data_ext's output)
        self.checkpoints: list[list[tuple[int, ctypes.Array]]] = [[] for _ in range(n_seq)]
        self._transient: list[tuple[int, ctypes.Array] | None] = [None] * n_seq  # this round's rollback point
        # per sequence: tokens of its last decode, while no rollback came since: a recurrent model's snapshots cover them
        self._last_decoded = [0] * n_seq
        self.restored = 0  # tokens re-read after going back to a checkpoint (tests check which way a rollback went)
        self._n_decoded = 0  # tokens in the last decode (rows of hidden())
        self.n_embd: int = llama_cpp.llama_model_n_embd_out(model.ptr)
        if hidden:  # unmasked: a row for every token of a batch, not only those with logits (llama.cpp's MTP process hook)
            _staging().set_embeddings_nextn(ptr, True, False)

    @property
    def tokens(self) -> list[int]:
        """Sequence 0's tokens (a one-sequence context's)."""
        return self.seqs[0]

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def abandon(self) -> None:
        """Never free it (a lost RPC worker holds part of it: Model.abandon)."""
        self.ptr = None

    def __del__(self) -> None:
        self.close()

    def set_threads(self, n_threads: int) -> None:
        """The threads the next decodes run on (cores.FreeCores). A row's logits do not depend on it: each output
        is computed by one thread whatever their number (tests/test_engine.py checks it)."""
        llama_cpp.llama_set_n_threads(self.ptr, n_threads, n_threads)

    def decode(self, tokens: Sequence[int], all_logits: bool = False, seq: int = 0) -> None:
        """Append `tokens` to sequence `seq`. Logits are kept for the last token, or for every token."""
        if len(self.seqs[seq]) + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"the context is full ({self.n_ctx} tokens); start a new chat or raise --ctx-size"
            )
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            self._decode([(seq, chunk, (len(chunk) if all_logits else 1) if last_chunk else 0)])

    def decode_parts(self, parts: Sequence[tuple[int, Sequence[int], int]]) -> list[np.ndarray]:
        """One llama_decode over several sequences' tokens: (seq, tokens, rows wanted: logits for the last that
        many tokens). Returns each part's logits rows, views valid until the next decode."""
        self._check_room([(seq, tokens) for seq, tokens, _ in parts])
        self._decode(parts)
        return self._rows_by_part([(tokens, wanted) for _, tokens, wanted in parts])

    def _check_room(self, parts: Sequence[tuple[int, Sequence[int]]]) -> None:
        """(seq, tokens) about to be decoded together: one batch, and room in every sequence."""
        width = sum(len(tokens) for _, tokens in parts)
        if width > self.n_batch:
            raise ValueError(f"{width} tokens in one decode, over n_batch {self.n_batch}")
        for seq, tokens in parts:
            if len(self.seqs[seq]) + len(tokens) > self.n_ctx:
                raise ContextOverflowError(f"the context is full ({self.n_ctx} tokens); start a new chat or raise --ctx-size")

    def _rows_by_part(self, parts: Sequence[tuple[Sequence[int], int]]) -> list[np.ndarray]:
        """(tokens, rows wanted) of the last decode, in its order: each part's logits rows (views)."""
        if not any(min(wanted, len(tokens)) for tokens, wanted in parts):
            return [self._logits_view[:0] for _ in parts]
        rows, views, at = self.logits(), [], 0
        for tokens, wanted in parts:
            n = min(wanted, len(tokens))
            views.append(rows[at : at + n])
            at += n
        return views

    def _decode(self, parts: Sequence[tuple[int, Sequence[int], int]]) -> None:
        """(seq, tokens, logits for the last that many tokens): one llama_decode."""
        batch = self._batch
        i = outputs = 0
        for seq, tokens, wanted in parts:
            pos0 = len(self.seqs[seq])
            first_out = len(tokens) - wanted
            for j, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = pos0 + j
                batch.seq_id[i][0] = seq
                batch.logits[i] = j >= first_out
                outputs += j >= first_out
                i += 1
        if not i:
            return
        batch.n_tokens = i
        self._evaluate(lambda: llama_cpp.llama_decode(self.ptr, batch), [(seq, tokens) for seq, tokens, _ in parts], outputs)

    def _evaluate(self, run: Callable[[], int], parts: Sequence[tuple[int, Sequence[int]]], outputs: int) -> None:
        """Run one llama.cpp evaluation of `parts` (seq, tokens), already in its batch, and account for it."""
        width = sum(len(tokens) for _, tokens in parts)
        started = time.perf_counter()
        rc = run()
        # a GPU's or an RPC worker's decode only starts here: wait for it, so that every timing (the probe, the
        # verify curve, the stats) is the decode's own (the logits read next would wait anyway; free on a CPU)
        llama_cpp.llama_synchronize(self.ptr)
        self.decode_seconds += time.perf_counter() - started
        raise_if_interrupted()
        if rc != 0:
            raise TandemError(f"llama.cpp failed to evaluate {width} tokens (code {rc}): {_last_llama_error()}")
        # llama.cpp may move a recurrent sequence's state to another cell when a decode carries other sequences
        # (find_slot's re-ordering) and its snapshots stay behind: they are trusted only for a sequence decoded alone,
        # and until the next decode of any sequence
        if self.recurrent:
            self._last_decoded = [0] * self.n_seq
            if len(parts) == 1:
                self._last_decoded[parts[0][0]] = len(parts[0][1])
        for seq, tokens in parts:
            self.seqs[seq].extend(tokens)
        self.n_evaluated += width
        self._n_outputs, self._n_decoded = outputs, width

    def hidden(self) -> np.ndarray:
        """(tokens of the last decode, n_embd): each token's last hidden state, in batch order (a context made with
        hidden=True); a view valid until the next decode."""
        ptr = _staging().get_embeddings_nextn(self.ptr)
        if not ptr:
            raise TandemError("llama.cpp kept no hidden states for this context")
        return np.ctypeslib.as_array(ptr, shape=(self._n_decoded, self.n_embd))

    def logits(self) -> np.ndarray:
        """A (n_outputs, n_vocab) float32 view over llama.cpp's logits buffer: valid until the next decode."""
        ptr = llama_cpp.llama_get_logits(self.ptr)
        address = ctypes.addressof(ptr.contents)
        if address != self._logits_address or self._n_outputs > len(self._logits_view):
            # building a view costs ~50 us; llama.cpp keeps its buffer between decodes, so one is reused
            self._logits_view = np.ctypeslib.as_array(ptr, shape=(self._n_outputs, self.model.n_vocab))
            self._logits_address = address
        return self._logits_view[: self._n_outputs]

    def truncate(self, n: int, seq: int = 0, exact: bool = True) -> bool:
        """Forget every cached position >= n of sequence `seq` (rollback after rejected draft tokens). A recurrent
        model drops up to rollback_limit tokens of its last decode through llama.cpp's snapshots; further back it
        restores its newest checkpoint at or before n, then (exact) reads the tokens from there to n again, or
        (not exact) stays there: the caller reads on from len(seqs[seq]). False when neither can: nothing changed."""
        tokens = self.seqs[seq]
        if n >= len(tokens):
            return True
        recurrent = self.recurrent
        if (not self.replays(n, seq) or not recurrent) and llama_cpp.llama_memory_seq_rm(self._memory, seq, n, -1):
            self._last_decoded[seq] = 0  # llama.cpp's rollback is single-use until the next decode
            del tokens[n:]
            self._drop_checkpoints(seq, n)
            return True
        if not recurrent:
            return False
        return self._restore(n, seq, exact)

    def replays(self, n: int, seq: int = 0) -> bool:
        """Whether truncate(n, seq) goes back to a checkpoint and decodes again (a recurrent model whose snapshots
        do not reach back to n): that decode overwrites the logits of the one before it."""
        tokens = self.seqs[seq]
        if not self.recurrent or n >= len(tokens):
            return False
        # a snapshot holds the state after each of the last decode's tokens but its last: never the state before it
        return len(tokens) - n > min(self._last_decoded[seq] - 1, self.rollback_limit or 0)

    def checkpoint(self, seq: int = 0, transient: bool = False) -> None:
        """Save sequence `seq`'s recurrent state at its current length (a no-op for an attention-only model).
        `transient`: a rollback point for this round only (before a verify or a draft), kept apart so that rounds
        never push the prompt's and the turns' checkpoints out."""
        if not self.recurrent or not self.seqs[seq]:
            return
        n = len(self.seqs[seq])
        marks = self.checkpoints[seq]
        if transient and self._transient[seq] is not None and self._transient[seq][0] == n:
            return
        if not transient and marks and marks[-1][0] == n:
            return
        size = llama_cpp.llama_state_seq_get_size_ext(self.ptr, seq, _PARTIAL)
        # a round's rollback point reuses the last one's buffer (Mamba-2 stand-in: 660 KB a round, allocated, zeroed
        # and copied twice, was a cost of drafting no timing saw); a kept checkpoint gets its own
        old = self._transient[seq]
        reuse = transient and old is not None and len(old[1]._buffer) >= size  # type: ignore[attr-defined]
        buf = old[1]._buffer if reuse else (ctypes.c_uint8 * size)()  # type: ignore[union-attr]
        written = llama_cpp.llama_state_seq_get_data_ext(self.ptr, buf, size, seq, _PARTIAL)
        if written == 0:
            if reuse:  # the buffer held the last rollback point, now half overwritten
                self._transient[seq] = None
            return
        state = (ctypes.c_uint8 * written).from_buffer(buf)  # a view of the state's bytes, no copy
        state._buffer = buf  # type: ignore[attr-defined]  # (keeps the whole buffer for reuse)
        if transient:
            self._transient[seq] = (n, state)
            return
        marks.append((n, state))
        del marks[:-MAX_CHECKPOINTS]

    def rollback_point(self, seq: int = 0) -> None:
        """Before a verify: a transient checkpoint where llama.cpp's snapshots may not take its rejected drafts back,
        i.e. an architecture it keeps none for (Mamba, RWKV, Jamba...) or a context whose verify may share its decode
        with other sequences (snapshots are trusted only for a sequence decoded alone, _decode). A rejection then goes
        back to it and reads the accepted tokens again (llama-server's replay)."""
        if self.rollback_limit == 0 or (self.rollback_limit and self.n_seq > 1):
            self.checkpoint(seq, transient=True)

    def checkpoint_due(self, seq: int = 0) -> None:
        """A checkpoint once CHECKPOINT_EVERY tokens were read since the last one (called between prompt chunks)."""
        marks = self.checkpoints[seq]
        if self.recurrent and len(self.seqs[seq]) - (marks[-1][0] if marks else 0) >= CHECKPOINT_EVERY:
            self.checkpoint(seq)

    def _drop_checkpoints(self, seq: int, n: int) -> None:
        marks = self.checkpoints[seq]
        while marks and marks[-1][0] > n:
            marks.pop()
        if self._transient[seq] is not None and self._transient[seq][0] > n:
            self._transient[seq] = None

    def _restore(self, n: int, seq: int, exact: bool) -> bool:
        self._drop_checkpoints(seq, n)
        candidates = [*self.checkpoints[seq][-1:], *([self._transient[seq]] if self._transient[seq] else [])]
        if not candidates:
            return False
        at, state = max(candidates, key=lambda mark: mark[0])
        if not llama_cpp.llama_state_seq_set_data_ext(self.ptr, state, len(state), seq, _PARTIAL):
            self.clear(seq)  # llama.cpp has already emptied the sequence's recurrent state: the tokens must go too
            return False
        # the recurrent part is now at `at`; cut the attention part (a hybrid's KV cells) to match, as llama-server does
        llama_cpp.llama_memory_seq_rm(self._memory, seq, at, -1)
        tokens = self.seqs[seq]
        replay = tokens[at:n]
        del tokens[at:]
        self._last_decoded[seq] = 0
        if exact and replay:
            self.decode(replay, seq=seq)
            self.restored += len(replay)
        return True

    def borrow_prefix(self, tokens: Sequence[int], seq: int, least: int) -> int:
        """Let sequence `seq` share the longest cached prefix of `tokens` that another sequence holds, when it is
        at least `least` tokens longer than its own: a new request whose prompt (a shared system prompt, a
        conversation continued on another sequence) sits in a busy sequence reads none of it again. In the
        unified cache the cells are shared (llama.cpp's seq_cp), not copied. Returns the tokens it now holds."""
        own = self.common_prefix(tokens, seq)
        best, source = own, seq
        for other in range(self.n_seq):
            if other != seq and (n := self.common_prefix(tokens, other)) > best:
                best, source = n, other
        # a recurrent state is not a prefix of positions: it cannot be shared from part of another sequence; nor can
        # part of another stream's cells (llama.cpp copies only whole streams)
        if best - own < least or self.recurrent or not self.shared_cells:
            return own
        llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source, seq, 0, best)
        self.seqs[seq] = self.seqs[source][:best]
        return best

    def clear(self, seq: int | None = None) -> None:
        """Empty one sequence, or the whole cache."""
        if seq is None:
            llama_cpp.llama_memory_clear(self._memory, True)
            for tokens in self.seqs:
                tokens.clear()
            for marks in self.checkpoints:
                marks.clear()
            self._transient = [None] * self.n_seq
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
            self.seqs[seq].clear()
            self.checkpoints[seq].clear()
            self._transient[seq] = None
            self._last_decoded[seq] = 0

    def sync(self, tokens: Sequence[int], seq: int = 0) -> int:
        """Make sequence `seq` hold exactly `tokens`, evaluating only what differs; logits end on the last one.

        Returns how many tokens were evaluated. This is how the draft catches up on the tokens the
        main model accepted: usually one or two per round, never the whole prompt again.
        """
        return self._extend_from_common_prefix(tokens, min(len(self.seqs[seq]), len(tokens) - 1), seq)

    def sync_prefix(self, tokens: Sequence[int], seq: int = 0) -> int:
        """Like sync, but logits are not needed: a fully cached sequence costs nothing (new chat turns)."""
        return self._extend_from_common_prefix(tokens, min(len(self.seqs[seq]), len(tokens)), seq)

    def common_prefix(self, tokens: Sequence[int], seq: int = 0) -> int:
        """How many leading `tokens` sequence `seq` already holds."""
        cached = self.seqs[seq]
        limit = min(len(cached), len(tokens))
        keep = 0
        while keep < limit and cached[keep] == tokens[keep]:
            keep += 1
        return keep

    def keep_common_prefix(self, tokens: Sequence[int], limit: int | None = None, seq: int = 0) -> int:
        """Drop what follows the longest cached prefix of `tokens` (at most `limit` tokens kept); returns
        how many are kept (a recurrent model may go back further, to its checkpoint). The caller evaluates the
        rest (sync_prefix does it in one go)."""
        keep = self.common_prefix(tokens, seq)
        if limit is not None:
            keep = min(keep, limit)
        if not self.truncate(keep, seq, exact=False):  # no checkpoint before `keep`: start over, never a wrong state
            self.clear(seq)
        return len(self.seqs[seq])

    def _extend_from_common_prefix(self, tokens: Sequence[int], limit: int, seq: int) -> int:
        keep = self.keep_common_prefix(tokens, limit, seq)
        self.decode(tokens[keep:], seq=seq)
        return len(tokens) - keep


def usable_context(requested: int, trained: int) -> int:
    """The context a sequence gets: what was asked, but never past what the model was trained for (0: unknown)."""
    return min(requested, trained) if trained > 0 else requested


def _check_cache_memory(model: Model, n_ctx: int, n_seq: int) -> None:
    """The last guard before llama.cpp allocates a context's cache (load_engine checks the pair from the headers first)."""
    if model.on_cpu:
        check_cache_memory(model.path.name, (model.info.kv_bytes_per_token or 0) * n_ctx * n_seq, n_ctx, n_seq)


def check_cache_memory(name: str, need: int, n_ctx: int, n_seq: int) -> None:
    """Refuse a KV cache that would not fit in the memory free now, in one line, before anything allocates it: the
    kernel's OOM killer ends the process without a word (`--parallel 64 --ctx-size 32768` on the demo pair: 48 GB of
    cache on a 24 GiB machine). On a GPU the cache goes to VRAM, where llama.cpp reports a shortfall itself."""
    free = psutil.virtual_memory().available
    if need > free:
        sizes = f"{n_seq} sequences of {n_ctx} tokens" if n_seq > 1 else f"{n_ctx} tokens"
        raise TandemError(f"{name}: a cache for {sizes} needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of memory "
                          f"is free: lower {'--parallel or ' if n_seq > 1 else ''}--ctx-size")  # fmt: skip


class SingleTokenContext(Context):
    """A context that evaluates every batch one token at a time: a draft model's whose fastest kernels are
    safe only that way (kernels.choose).

    On AMX CPUs llama.cpp's AMX kernels ran a Q4_1 draft token twice as fast as its plain CPU kernels
    (5.3 vs 11 ms for the demo draft, 2 threads) but crash on batches of 2+ tokens. A draft decodes one
    or two tokens per round, and even a prompt was cheaper token by token through AMX than batched
    without it (7.3 ms per token at any batch size).
    """

    def decode(self, tokens: Sequence[int], all_logits: bool = False, seq: int = 0) -> None:
        if all_logits and len(tokens) > 1:
            raise ValueError("a single-token context keeps logits for its last token only")
        for token in tokens:
            super().decode([token], seq=seq)

    def decode_parts(self, parts: Sequence[tuple[int, Sequence[int], int]]) -> list[np.ndarray]:
        raise ValueError("a single-token context decodes one sequence's token at a time")


class MtpContext(Context):
    """The main model's multi-token-prediction head in its own llama.cpp context (LLAMA_CONTEXT_TYPE_MTP, llama.cpp's
    draft-mtp): a KV cache of its one attention layer, filled as the main context's is. Each position p holds
    token p paired with the main model's last hidden state at p - 1 (Context.hidden); from the last such pair the
    head predicts token p + 1, and from its own hidden state there, the next. Weights are the main model's."""

    def __init__(self, main: Context, n_threads: int):
        super().__init__(main.model, main.n_ctx, n_threads, n_batch=main.n_batch, n_seq=main.n_seq, head_of=main,
                         unified=main.shared_cells)  # fmt: skip
        _staging().set_embeddings_nextn(self.ptr, True, True)  # masked: hidden rows only where logits are asked
        self._ext = llama_cpp.llama_batch_ext_init(self.ptr)
        self._pos = (ctypes.c_int32 * 4)()

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_batch_ext_free(self._ext)
        super().close()

    def decode(self, tokens: Sequence[int], all_logits: bool = False, seq: int = 0) -> None:
        raise ValueError("an MTP head decodes tokens with the main model's hidden states: feed()")

    def feed(self, parts: Sequence[tuple[int, Sequence[int], np.ndarray, int]]) -> list[np.ndarray]:
        """One decode over several sequences' (seq, tokens, hidden: one float32 row per token, rows of logits wanted
        for the last that many tokens); returns each part's logits rows (views valid until the next decode)."""
        self._check_room([(seq, tokens) for seq, tokens, _, _ in parts])
        ext, pos = self._ext, self._pos
        llama_cpp.llama_batch_ext_clear(ext)
        outputs = 0
        for seq, tokens, hidden, wanted in parts:
            rows = np.ascontiguousarray(hidden, dtype=np.float32)
            pos0, first_out = len(self.seqs[seq]), len(tokens) - wanted
            for j, token in enumerate(tokens):
                idx = llama_cpp.llama_batch_ext_add_token(ext, seq, token)
                pos[0] = pos0 + j
                row = llama_cpp.llama_embd(rows[j].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
                if idx < 0:
                    raise TandemError(f"llama.cpp refused a token for the MTP head (code {idx}): {_last_llama_error()}")
                if not llama_cpp.llama_batch_ext_set_pos(ext, idx, pos) or not llama_cpp.llama_batch_ext_set_embd_token(ext, idx, row):
                    raise TandemError(f"llama.cpp refused the MTP head's input at position {pos0 + j}: {_last_llama_error()}")
                if j >= first_out:
                    llama_cpp.llama_batch_ext_set_output_logits(ext, idx, True)
                    outputs += 1
        self._evaluate(lambda: llama_cpp.llama_process(self.ptr, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, ext),
                       [(seq, tokens) for seq, tokens, _, _ in parts], outputs)  # fmt: skip
        return self._rows_by_part([(tokens, wanted) for _, tokens, _, wanted in parts])

    def hidden_row(self, index: int) -> np.ndarray:
        """The head's own hidden state at token `index` of the last feed (one with logits): what it drafts the next
        token from."""
        ptr = _staging().get_embeddings_nextn_ith(self.ptr, index)
        if not ptr:
            raise TandemError("llama.cpp kept no hidden state for the MTP head's draft")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()


def draft_context(model: Model, n_ctx: int, n_threads: int, n_seq: int = 1) -> Context:
    """The context a draft model decodes in: token by token where its kernels are safe only that way."""
    kind = Context if model.kernels.batches else SingleTokenContext
    return kind(model, n_ctx, n_threads, n_seq=n_seq)


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes summed over GPU devices; None on a CPU-only build or when ggml won't say."""
    init_backend()
    try:
        return backends.gpu_memory()
    except (OSError, AttributeError):
        return None
