"""Where a model's weights live on this CPU, and so which kernels multiply them: chosen by measurement.

llama.cpp's CPU backend offers "extra" weight buffers besides plain memory: AMX tiles on Intel Xeons since
Sapphire Rapids, and CPU_REPACK (weights interleaved for AVX2/AVX-512 kernels) on most x86 CPUs. By default
a weight goes to the first extra buffer that takes it. Which is fastest, and which is even safe, depends on
the CPU, the build and the file's tensor types: on AMX CPUs llama.cpp's AMX kernels crash or compute garbage
on batches of quantized weights (ggml-org/llama.cpp#20824, #16315), while the repacked AVX-512 kernels beside
them are as fast for one token and cheap per row in a batch. No fixed rule gets all of that right.

So each candidate placement is tried in a child process first, where a crash costs nothing but that child:
the model is loaded that way and decodes every batch width the engine uses (every verify width, the
prompt chunks), each batch's rows checked against one-token decoding (finite, and the same ranking of
tokens up to rounding: garbage is not), then timed for one token and for verify batches. The fastest safe
candidate is used, cached per model file, llama.cpp build, CPU backend and thread count (probe.py's cache).
A candidate safe only one token at a time can still serve a draft model, which decodes token by token.

Candidates, in llama.cpp's order of preference: every extra buffer (llama.cpp's default), then each one
alone with those before it left out (on an AMX CPU: repacked without AMX), then plain memory.
`--exact` takes plain memory (batch-invariant kernels; the self-check confirms it). TANDEM_CPU_EXTRA_BUFFERS=1
or 0 forces llama.cpp's default or plain memory without measuring.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.engine import backends
from app.engine.errors import LoadCancelled
from app.engine.gguf_info import GGUFInfo

PLAIN: tuple[str, ...] = ()  # no extra buffer: plain memory
VERIFY_WIDTHS = tuple(range(2, 18))  # up to 16 drafted tokens + the last one
PROMPT_WIDTHS = (32, 64)  # a prompt is read in chunks of 16, then 64 tokens on a CPU (speculative.py)
WIDEST = max(PROMPT_WIDTHS)  # CPU contexts decode no wider batch (backend.Context)
TIMED_WIDTHS = (4, 8, 16)
MEASURED_WIDTHS = (1, *VERIFY_WIDTHS, *PROMPT_WIDTHS)
PREFIX = 8  # tokens cached before the checked ones: a batch never starts on an empty cache
TRIAL_TIMEOUT = 600.0  # seconds: a child that hangs is a candidate that fails
SAME_SPEED = 0.03  # costs this close are a tie (a trial times each width once or twice)
PLAIN_SHARE = 0.5  # of a drafting main model's decodes, those priced at plain decoding's width (decode_widths)
MIN_CORRELATION = 0.99  # a batch row against the one-token row: rounding moves logits a little, garbage a lot
TRIAL_FLAG = "--kernel-trial"  # the hidden command line of the child (app.cli)
TRIAL_VERSION = 3  # bump when what a trial checks changes: cached choices are then made again (3: recurrent models roll back)


@dataclass(frozen=True)
class KernelChoice:
    bufts: tuple[str, ...]  # extra buffer types in order of preference (names as llama.cpp gives them); () plain
    batches: bool = True  # False: only one token per decode is safe (SingleTokenContext)
    reason: str = ""  # how it was chosen, for --benchmark and stats

    @property
    def name(self) -> str:
        return display_name(self.bufts)


def display_name(bufts: Sequence[str]) -> str:
    if not bufts:
        return "plain"
    return {"CPU_REPACK": "repacked"}.get(bufts[0], bufts[0].lower())


DEFAULT = KernelChoice(("*",), reason="llama.cpp's default")  # every extra buffer llama.cpp offers, its own way
PLAIN_CHOICE = KernelChoice(PLAIN, reason="plain memory")


@dataclass
class Trial:
    """What one candidate did in its child process."""

    bufts: tuple[str, ...]
    token_seconds: float = 0.0  # one token
    width_seconds: dict[int, float] = field(default_factory=dict)
    safe_widths: list[int] = field(default_factory=list)  # batch widths that ran and gave sound rows
    failure: str = ""  # why it stopped early (a crash, garbage rows), or ""
    cpu_share: float = 1.0  # the child's share of its threads' CPU time while timed (probe.CpuShare)

    @property
    def batches(self) -> bool:
        return not self.failure

    @property
    def usable(self) -> bool:
        return self.token_seconds > 0.0


# --- llama.cpp's buffer types, through ggml's C API ----------------------------------------------------


def extra_buffer_types() -> dict[str, int]:
    """The CPU device's extra buffer types, in llama.cpp's order of preference: name -> buffer type."""
    lib, device = backends.ggml(), backends.cpu_device()
    if device is None:
        return {}
    address = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_dev_backend_reg(device), b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return {}
    array = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    out = {}
    for i in range(16):  # NULL-terminated
        if not array[i]:
            break
        out[lib.ggml_backend_buft_name(array[i]).decode()] = array[i]
    return out


_TENSOR_BUFFER_OFFSET = 8  # struct ggml_tensor { enum ggml_type type; struct ggml_backend_buffer * buffer; ...


def supported_tensors(info: GGUFInfo, buft_name: str) -> list[str]:
    """The weight matrices llama.cpp would put in `buft_name`: the same question its loader asks
    (llama-model-loader.cpp weight_buft_supported): can the CPU device multiply by the tensor in that buffer?"""
    lib, device, buft = backends.ggml(), backends.cpu_device(), extra_buffer_types().get(buft_name)
    if not buft or device is None:
        return []
    out = []
    for tensor in info.tensors:
        # matrices only; the token embedding is read by rows (GET_ROWS), which no extra buffer does
        if len(tensor.dims) != 2 or tensor.name.startswith("token_embd"):
            continue
        ctx = lib.ggml_init(backends.InitParams(lib.ggml_tensor_overhead() * 8, None, True))
        try:
            weight = lib.ggml_new_tensor_4d(ctx, tensor.ggml_type, *tensor.dims, 1, 1)
            batch = lib.ggml_new_tensor_4d(ctx, 0, tensor.dims[0], 512, 1, 1)  # F32 activations, 512 rows as llama.cpp asks
            product = lib.ggml_mul_mat(ctx, weight, batch)
            dummy = lib.ggml_backend_buft_alloc_buffer(buft, 0)  # supports_op reads the weight's buffer type
            slot = ctypes.c_void_p.from_address(weight + _TENSOR_BUFFER_OFFSET)
            slot.value = dummy
            if lib.ggml_backend_dev_supports_op(device, product):
                out.append(tensor.name)
            slot.value = None
            lib.ggml_backend_buffer_free(dummy)
        finally:
            lib.ggml_free(ctx)
    return out


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def placement(info: GGUFInfo, bufts: Sequence[str]) -> tuple[bool, ctypes.Array | None]:
    """llama.cpp's use_extra_bufts and tensor_buft_overrides for a candidate. Every extra buffer (or DEFAULT) is
    llama.cpp's own placement and none is plain memory; otherwise each weight goes to the first of `bufts` that
    takes it, the rest to plain memory."""
    available = extra_buffer_types()
    if tuple(bufts) in (DEFAULT.bufts, tuple(available)):
        return True, None
    if not bufts:
        return False, None
    taken: set[str] = set()
    patterns: list[tuple[bytes, int]] = []
    for name in bufts:
        if name not in available:
            continue
        names = [t for t in supported_tensors(info, name) if t not in taken]
        taken.update(names)
        patterns += [(p.encode(), available[name]) for p in _name_patterns(names)]
    array = (_Override * (len(patterns) + 1))()  # NULL-terminated
    for i, (pattern, buft) in enumerate(patterns):
        array[i].pattern, array[i].buft = pattern, buft
    return False, array


def _name_patterns(names: Sequence[str]) -> list[str]:
    """Few short regexes for a set of tensor names (llama.cpp compiles every pattern for every tensor):
    one per role, listing its layers, e.g. ^blk\\.(?:0|3|7)\\.ffn_down\\.weight$."""
    by_role: dict[str, list[str]] = {}
    exact = []
    for name in names:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if match:
            by_role.setdefault(match.group(2), []).append(match.group(1))
        else:
            exact.append(name)
    patterns = [f"^blk\\.(?:{'|'.join(layers)})\\.{re.escape(role)}$" for role, layers in by_role.items()]
    return patterns + [f"^{re.escape(name)}$" for name in exact]


# --- candidates, trials and the choice -----------------------------------------------------------------


def candidates() -> list[tuple[str, ...]]:
    """Every extra buffer (llama.cpp's default), each suffix of that list, then plain memory."""
    names = list(extra_buffer_types())
    return [tuple(names[i:]) for i in range(len(names))] + [PLAIN]


def run_trial(path: str, bufts: tuple[str, ...], n_threads: int, out=sys.stdout) -> None:
    """The child's side: load `path` with `bufts`, then print one JSON line per width that ran soundly
    (the parent reads as far as the child got, whether it ends or crashes)."""
    from app.engine.backend import Context, Model
    from app.engine.probe import CpuShare, probe_tokens

    def say(**record: object) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    model = Model(path, n_gpu_layers=0, kernels=KernelChoice(bufts))
    say(stage="loaded")
    tokens = probe_tokens(model, PREFIX + WIDEST)
    ctx = Context(model, n_ctx=PREFIX + WIDEST + 8, n_threads=n_threads, n_batch=WIDEST)
    reference, singles = [], []
    cpu = CpuShare(n_threads)
    # one token at a time first: kernels that fail only on batches may still serve a draft
    for i, token in enumerate(tokens[: PREFIX + max(VERIFY_WIDTHS)]):
        started = time.perf_counter()
        with cpu.decoding():
            ctx.decode([token], all_logits=True)
        if i == PREFIX - 1:
            ctx.checkpoint()  # a recurrent model goes back to the prefix through it (Context.truncate)
        if i >= PREFIX:
            singles.append(time.perf_counter() - started)
            reference.append(ctx.logits()[0].copy())
    say(width=1, seconds=statistics.median(singles[1:]), cpu_share=cpu.share)
    for width in (*VERIFY_WIDTHS, *PROMPT_WIDTHS):
        timings = []
        for _ in range(2 if width in TIMED_WIDTHS else 1):
            ctx.truncate(PREFIX)
            started = time.perf_counter()
            ctx.decode(tokens[PREFIX : PREFIX + width], all_logits=True)
            timings.append(time.perf_counter() - started)
        problem = _unsound(ctx.logits(), reference)
        if problem:
            say(width=width, failure=problem)
            return
        say(width=width, seconds=min(timings))


def _unsound(rows: np.ndarray, reference: list[np.ndarray]) -> str:
    if not np.all(np.isfinite(rows)):
        return "non-finite logits"
    for i in range(min(len(rows), len(reference))):
        correlation = float(np.corrcoef(rows[i], reference[i])[0, 1])
        if not correlation >= MIN_CORRELATION:
            return f"rows unlike one-token decoding (correlation {correlation:.3f} at row {i})"
    return ""


def _self_command() -> list[str]:
    """This program: the frozen executable, or python -m app."""
    return [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "app"]


def trial(path: Path, bufts: tuple[str, ...], n_threads: int, cancel: threading.Event | None = None) -> Trial:
    """Run one candidate in a child process and read what it got through (the child is killed when the load
    is called off: LoadCancelled)."""
    result, loaded = Trial(bufts), False
    command = [*_self_command(), TRIAL_FLAG, json.dumps({"path": str(path), "bufts": list(bufts), "threads": n_threads})]
    deadline = time.monotonic() + TRIAL_TIMEOUT
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        while True:
            try:
                stdout, _ = child.communicate(timeout=0.25)  # retried: no output is lost
                break
            except BaseException as exc:  # Ctrl+C or an error here: no trial child is left running
                if not isinstance(exc, subprocess.TimeoutExpired):
                    child.kill()
                    raise
                called_off = cancel is not None and cancel.is_set()
                if called_off or time.monotonic() > deadline:
                    child.kill()
                    child.communicate()
                    if called_off:
                        raise LoadCancelled(f"{path.name}: loading was called off") from None
                    result.failure = f"no answer within {TRIAL_TIMEOUT:.0f} s"
                    return result
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "width" not in record:
            loaded = loaded or (isinstance(record, dict) and record.get("stage") == "loaded")
            continue
        if record.get("failure"):
            result.failure = f"batches of {record['width']}: {record['failure']}"
            return result
        width, seconds = int(record["width"]), float(record["seconds"])
        if width == 1:
            result.token_seconds, result.cpu_share = seconds, float(record.get("cpu_share", 1.0))
        else:
            result.safe_widths.append(width)
            result.width_seconds[width] = seconds
    if child.returncode != 0:
        what = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
        widths = [w for w in (*VERIFY_WIDTHS, *PROMPT_WIDTHS) if w not in result.safe_widths]
        if not result.token_seconds:
            stage = "loading" if not loaded else "one token"
        else:
            stage = f"a batch of {widths[0]} tokens" if widths else "its way out, after every width"
        result.failure = f"crashed ({what}) on {stage}"
    return result


def decode_widths(role: str, sequences: int = 1, drafting: bool = True) -> dict[int, float]:
    """The batch widths a model will decode, each with its share of the decodes: what its kernels are chosen for.
    A draft model decodes one token at a time. A main model decodes one token per sequence a round when nothing is
    drafted (always under --no-draft; where drafting does not pay, the controller stops it), and verify batches of
    2-9 tokens per sequence when drafts are made: half of each, since which one a reply gets is known only later."""
    if role == "draft":
        return {1: 1.0}
    plain = _nearest_measured(sequences)
    if not drafting:
        return {plain: 1.0}
    verify = sorted({_nearest_measured(sequences * n) for n in range(2, 10)})
    weights = {plain: PLAIN_SHARE}
    for width in verify:
        weights[width] = weights.get(width, 0.0) + (1 - PLAIN_SHARE) / len(verify)
    return weights


def _nearest_measured(width: int) -> int:
    return min(MEASURED_WIDTHS, key=lambda w: abs(math.log(w / width)))


def _seconds(trial: Trial, width: int) -> float | None:
    return trial.token_seconds if width == 1 else trial.width_seconds.get(width)


def workload_cost(trials: Sequence[Trial], widths: dict[int, float]) -> dict[int, float]:
    """Per trial (by index): the weighted geometric mean of its time over the best trial's at each width, 1.0 for
    the fastest everywhere. Widths some trial did not time are left out of every trial's cost."""
    shared = {w: share for w, share in widths.items() if all(_seconds(t, w) for t in trials)}
    if not shared:
        shared = {1: 1.0}
    best = {w: min(_seconds(t, w) or math.inf for t in trials) for w in shared}
    total = sum(shared.values())
    return {i: math.exp(sum(share * math.log(_seconds(t, w) / best[w]) for w, share in shared.items()) / total)
            for i, t in enumerate(trials)}  # fmt: skip


def choose(trials: Sequence[Trial], role: str, sequences: int = 1, drafting: bool = True) -> KernelChoice:
    """The safe candidate that decodes the widths this model will decode fastest (decode_widths): for a main model
    that drafts, one token and its verify batches both count (on an AMX Xeon, the real pair's Q4_K_M main model
    ran one token 4% faster repacked than through AMX, but batches of 4 and 8 tokens a third slower). A draft may
    take one that is safe only token by token, if it is the fastest."""
    safe = [t for t in trials if t.usable and t.batches]
    widths = decode_widths(role, sequences, drafting)
    fastest = None
    if safe:
        cost = workload_cost(safe, widths)
        close = [i for i in cost if cost[i] <= min(cost.values()) * (1 + SAME_SPEED)]
        # a tie (noise) is settled by a drafting main model's batches, which a draft and plain decoding meet too
        # when prompts are read and when --parallel grows
        batches = workload_cost([safe[i] for i in close], decode_widths("main", sequences))
        fastest = safe[close[min(batches, key=batches.__getitem__)]]
    if role == "draft":
        single = [t for t in trials if t.usable and not t.batches]
        best_single = min(single, key=lambda t: t.token_seconds) if single else None
        if best_single and (fastest is None or best_single.token_seconds < fastest.token_seconds * (1 - SAME_SPEED)):
            return KernelChoice(best_single.bufts, batches=False, reason=_summary(trials, best_single, widths))
    if fastest is None:
        failures = "; ".join(f"{display_name(t.bufts)} {t.failure}" for t in trials)
        return KernelChoice(PLAIN, reason=f"no candidate ran soundly in a trial: {failures}")
    return KernelChoice(fastest.bufts, reason=_summary(trials, fastest, widths))


def _summary(trials: Sequence[Trial], chosen: Trial, widths: dict[int, float]) -> str:
    parts = []
    for t in trials:
        text = f"{display_name(t.bufts)} {t.token_seconds * 1000:.1f} ms/token" if t.usable else display_name(t.bufts)
        if 8 in t.width_seconds and t.token_seconds:
            text += f", 8 tokens {t.width_seconds[8] / t.token_seconds:.2f}x"
        if t.failure:
            text += f" ({t.failure})"
        parts.append(text)
    sizes = sorted(widths)
    wanted = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    way = ", one token at a time" if not chosen.batches else f", for decodes of {wanted} tokens"
    return f"{display_name(chosen.bufts)}{way}; measured: " + "; ".join(parts)


def measure(path: Path, n_threads: int, progress: Callable[[int, int], None] | None = None,
            cancel: threading.Event | None = None) -> list[Trial]:  # fmt: skip
    options = candidates()
    trials = []
    for i, bufts in enumerate(options):
        if progress is not None:
            progress(i, len(options))
        trials.append(trial(path, bufts, n_threads, cancel))
    if progress is not None:
        progress(len(options), len(options))
    return trials


def forced() -> KernelChoice | None:
    value = os.environ.get("TANDEM_CPU_EXTRA_BUFFERS")
    if value in ("0", "1"):
        return DEFAULT if value == "1" else PLAIN_CHOICE
    return None


def cached_choice(path: Path, n_threads: int, role: str, progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None, sequences: int = 1, drafting: bool = True) -> KernelChoice:  # fmt: skip
    """The choice for this file on this machine (choose), from its trials: cached, else run now. The trials are
    kept, not the choice, so a load with another number of sequences or without drafting chooses again for free."""
    from app.engine import probe

    if len(candidates()) <= 1:
        return PLAIN_CHOICE  # nothing to choose between (a CPU backend without extra buffers)
    key = probe.cache_key({"kind": "kernels", "trial": TRIAL_VERSION, "file": probe.file_identity(path), "threads": n_threads,
                           "backend": backends.backends().cpu_variant, "candidates": candidates()})  # fmt: skip
    cached = probe.load_cache().get(key)
    try:
        trials = [Trial(**{**t, "bufts": tuple(t["bufts"]), "width_seconds": {int(w): s for w, s in t["width_seconds"].items()}})
                  for t in cached["trials"]]  # fmt: skip
    except (KeyError, TypeError, AttributeError):
        trials = measure(path, n_threads, progress, cancel)
        # a machine that could not run any trial, or was busy with other work meanwhile, is not one to remember
        if any(t.usable for t in trials) and all(t.cpu_share >= probe.QUIET_SHARE for t in trials if t.usable):
            probe.store(key, {"trials": [asdict(t) for t in trials], "measured": time.time()})
    return choose(trials, role, sequences, drafting)


def trial_main(argument: str) -> int:
    """The child: `tandem --kernel-trial '{"path": ..., "bufts": [...], "threads": N}'`."""
    request = json.loads(argument)
    run_trial(request["path"], tuple(request["bufts"]), int(request["threads"]))
    return 0
