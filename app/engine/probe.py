"""What this machine's kernels do with a model, measured once and cached.

Two questions decide whether speculative decoding keeps its promises here, and neither can be read
from a spec sheet: llama.cpp picks its CPU kernels per quantization, CPU and build (repacked K-quants on
AVX2/AVX-512, AMX on Xeons, llamafile's sgemm, GPU kernels), and they differ in both respects.

- Exactness: does a verify batch give bit-identical logits to one-token decoding? If not, speculative
  output can differ from plain output where the main model's two best tokens are within rounding of
  each other (a near-tie). Checked by decoding a fixed sequence token by token, then again as batches
  of every verify size, and comparing the logits bitwise (and the next token's, which reads the K/V the
  batch wrote).
- Cost: what does a batch of n tokens cost against one? On a small CPU a verify batch is compute-bound
  (9 tokens can cost 5x one) and a draft model may never pay; on a GPU or AMX it is nearly free.

Both cost a few seconds once per model file, llama.cpp build, CPU and settings; the results live in the
user cache (`$TANDEM_CACHE_DIR`, else the platform's cache folder), so later launches start instantly.

How far the logits can move matters as much as whether they move: a speculative reply's cache is written by
verify batches all along, so differences add up with depth. The check therefore also reads DEPTH tokens
both ways, one at a time and in verify batches of every width in turn, and the bound it reports
(max_difference) is the largest difference seen anywhere along that run, as deep as a chat's reply.

A timing taken while the machine was busy would mislead every later launch: a cached curve that is not
plausible (dearer for fewer tokens beyond noise) is measured again, and so is one that live decoding
contradicts for a sustained stretch (SpeculativeEngine.check_profile).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import platformdirs

from app.engine.backend import Context, Model, draft_context

PROBE_TEXT = (
    "def merge(left, right):\n    out = []\n    while left and right:\n        out.append(left.pop(0))\n"
    "The quick brown fox jumps over the lazy dog, and the dog sat on the mat."
)
PREFIX = 8  # tokens cached before the checked positions: a verify batch never starts at an empty cache
VERIFY_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 16, 17)  # up to 16 drafted tokens + the last one
# the depth run: a reply's worth of tokens whose cache is written by verify batches (see the module doc)
DEPTH = 96
DRAFT_TOKENS = 6  # single-token draft evaluations timed
CATCH_UP = 32  # tokens of a batched draft catch-up timed
PROBE_VERSION = 5  # bump when what is measured changes: old cache entries are then ignored (5: recurrent models with snapshots)
# a verify curve whose cost falls by more than this when the batch grows was timed on a busy machine
# (measured curves dip by up to 15%: 12 tokens 9.78x one, 16 tokens 8.30x on an AMD EPYC, repacked kernels)
PLAUSIBLE_DIP = 0.7
Progress = Callable[[int, int], None]  # (steps done, steps in all)
# a measurement in which this process got less than this share of its threads' CPU time ran beside other
# work (a busy machine): used once, never cached. Quiet, llama.cpp's threads get 0.9-1.0 of theirs.
QUIET_SHARE = 0.6
SHARE_AFTER = 0.5  # seconds of decoding: a shorter measurement (a tiny model) is too short to judge, and too cheap to matter


class CpuShare:
    """The share of its threads' CPU time this process got while llama.cpp decoded (CLOCK_PROCESS_CPUTIME counts
    every thread; llama.cpp's threads, the caller's included, work or spin through a decode): well under 1
    means other programs took the cores, and the timings are theirs as much as ours. Only the decode calls
    count (`with share.decoding():`), not Python between them. Meaningless for a model on a GPU."""

    def __init__(self, n_threads: int):
        self.n_threads = max(1, min(n_threads, os.cpu_count() or 1))
        self.cpu = self.wall = 0.0

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu += time.process_time() - cpu
            self.wall += time.perf_counter() - wall

    @property
    def share(self) -> float:
        return self.cpu / (self.wall * self.n_threads) if self.wall >= SHARE_AFTER else 1.0

    @property
    def quiet(self) -> bool:
        return self.share >= QUIET_SHARE


@dataclass
class KernelCheck:
    exact: bool  # every batched row bit-identical to one-token decoding, at every checked size
    max_difference: float  # largest |logit| difference seen between the two (0.0 when exact)
    differing_sizes: list[int] = field(default_factory=list)  # batch sizes whose rows differed
    # the largest verify batch below the first differing size: kernels often switch by batch size
    # (repacked K-quants at 4 rows, llama.cpp's tiled K-quant matmul at 8), so small batches can be exact
    exact_up_to: int = 1

    @property
    def rounding_bound(self) -> float:
        """How far apart two logits can be and still swap order between batched and one-token decoding:
        each may move by max_difference. Where plain decoding's two best tokens are closer than this, a
        speculative reply may take the other one: the main model's own choice up to rounding."""
        return 2.0 * self.max_difference

    def describe(self) -> str:
        if self.exact:
            return "batch-invariant: verify batches give the same logits as one-token decoding (self-check)"
        if not self.differing_sizes:
            return "not checked: plain decoding verifies one token at a time"
        return (
            f"verify batches of {self.differing_sizes[0]}+ tokens differ from one-token decoding by up to "
            f"{self.max_difference:.2g} in the logits (batches up to {self.exact_up_to} are identical): output may "
            "differ from plain decoding where its two best tokens are that close; --exact keeps it identical"
        )


@dataclass
class MainProfile:
    kernels: KernelCheck
    verify_seconds: dict[int, float]  # batch size -> seconds (the fastest of the timed runs)
    quiet: bool = True  # measured with the CPU to itself (CpuShare); a busy machine's figures are not cached

    def ratio(self, n: int) -> float:
        return self.verify_seconds[n] / self.verify_seconds[1]

    @property
    def plausible(self) -> bool:
        """No batch measured much cheaper than a narrower one: a curve timed on a quiet machine."""
        dearest = 0.0
        for n in sorted(self.verify_seconds):
            if self.verify_seconds[n] < PLAUSIBLE_DIP * dearest:
                return False
            dearest = max(dearest, self.verify_seconds[n])
        return True


@dataclass
class DraftProfile:
    token_seconds: float  # one draft-model evaluation (a drafted token)
    catch_up_seconds: float  # per token, when the draft catches up on many tokens in one batch


# an engine that never drafts (--no-draft) verifies one token per round: nothing to check or time
PLAIN_ONLY = MainProfile(KernelCheck(exact=False, max_difference=0.0, differing_sizes=[], exact_up_to=1), {1: 1.0})


def cache_path() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or platformdirs.user_cache_dir("tandem")
    return Path(root) / "probes.json"


def file_identity(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(identity: dict[str, object]) -> str:
    """A cache key: what was measured, with this llama.cpp build and this machine's CPU backend."""
    identity = {
        **identity,
        "version": PROBE_VERSION,
        "llama_cpp": llama_cpp.__version__,
        "system": llama_cpp.llama_print_system_info().decode(errors="replace"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _key(kind: str, model: Model, n_threads: int, extra: dict[str, object]) -> str:
    identity = {"kind": kind, "file": file_identity(model.path), "kernels": list(model.kernels.bufts),
                "single_token": not model.kernels.batches, "gpu_layers": model.n_gpu_layers, "threads": n_threads,
                "where": model.where}  # fmt: skip
    return cache_key({**identity, **extra})


def load_cache() -> dict[str, dict]:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def store(key: str, value: dict) -> None:
    """Best effort: a cache that cannot be written costs a re-measurement next launch, never an error."""
    path = cache_path()
    data = load_cache()
    data[key] = value
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a read-only folder refuses the clean-up too (EROFS)
            tmp.unlink(missing_ok=True)


def probe_tokens(model: Model, n: int) -> list[int]:
    tokens = model.tokenize(PROBE_TEXT, add_special=False, parse_special=False)
    tokens = [t for t in tokens if not model.is_eog(t)] or [max(model.bos, 0)]
    while len(tokens) < n:
        tokens += tokens
    return tokens[:n]


def _main_key(model: Model, n_threads: int, sizes: tuple[int, ...]) -> str:
    return _key("main", model, n_threads, {"sizes": list(sizes)})


def _store_main(key: str, profile: MainProfile) -> None:
    store(key, {"kernels": asdict(profile.kernels), "verify_seconds": profile.verify_seconds, "measured": time.time()})


def profile_main(model: Model, n_threads: int, sizes: tuple[int, ...] = VERIFY_SIZES, progress: Progress | None = None) -> MainProfile:
    """Exactness and verify cost of `model` on this machine (cached; an implausible cached curve is measured again)."""
    key = _main_key(model, n_threads, sizes)
    cached = load_cache().get(key)
    if cached:
        try:
            profile = MainProfile(KernelCheck(**cached["kernels"]), {int(n): s for n, s in cached["verify_seconds"].items()})
            if profile.plausible:
                return profile
        except (KeyError, TypeError, ValueError):
            pass
    profile = measure_main(model, n_threads, sizes, progress)
    if profile.plausible and profile.quiet:  # a busy machine's curve is used this once, not kept
        _store_main(key, profile)
    return profile


def retime_main(model: Model, n_threads: int, profile: MainProfile, sizes: tuple[int, ...] = VERIFY_SIZES) -> MainProfile:
    """The verify curve timed again (the kernels' check is unchanged by load), replacing the cached one."""
    ctx = Context(model, n_ctx=PREFIX + max(sizes) + 8, n_threads=n_threads, n_batch=max(max(sizes), PREFIX))
    try:
        tokens = probe_tokens(model, PREFIX + max(sizes))
        ctx.decode(tokens[:PREFIX])
        ctx.checkpoint()  # a recurrent model goes back to the prefix through it (Context.truncate)
        cpu = CpuShare(n_threads)
        seconds = {n: _time_batch(ctx, tokens[PREFIX : PREFIX + n], runs=3, cpu=cpu) for n in sizes}
    finally:
        ctx.close()
    fresh = MainProfile(profile.kernels, seconds, quiet=cpu.quiet or not model.on_cpu)
    if fresh.plausible and fresh.quiet:
        _store_main(_main_key(model, n_threads, sizes), fresh)
    return fresh


def _time_batch(ctx: Context, tokens: list[int], runs: int, cpu: CpuShare) -> float:
    timings = []
    for _ in range(runs):
        ctx.truncate(PREFIX)
        started = time.perf_counter()
        with cpu.decoding():
            ctx.decode(tokens, all_logits=True)
        timings.append(time.perf_counter() - started)
    return min(timings)


def measure_main(model: Model, n_threads: int, sizes: tuple[int, ...] = VERIFY_SIZES, progress: Progress | None = None) -> MainProfile:
    longest = max(sizes)
    depth = max(DEPTH, longest + 1)
    tokens = probe_tokens(model, PREFIX + depth)
    ctx = Context(model, n_ctx=PREFIX + depth + 8, n_threads=n_threads, n_batch=max(longest, PREFIX))
    steps, done = len(sizes) + 1, 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    try:
        ctx.decode(tokens[:PREFIX])
        ctx.checkpoint()  # a recurrent model goes back to the prefix through it (Context.truncate)
        reference = []  # the logits of one-token decoding at positions PREFIX .. PREFIX + depth - 1
        singles = []
        cpu = CpuShare(n_threads)
        for token in tokens[PREFIX:]:
            started = time.perf_counter()
            with cpu.decoding():
                ctx.decode([token], all_logits=True)
            singles.append(time.perf_counter() - started)
            reference.append(ctx.logits()[0].copy())
        reference_rows = np.stack(reference)
        seconds = {1: statistics.median(singles[1:])}  # the first one warms caches up
        step()
        max_difference, differing = 0.0, []
        for n in sizes:
            if n == 1:
                continue
            timings = []
            for attempt in range(2):  # the first run also checks, both are timed: the faster one counts
                ctx.truncate(PREFIX)
                started = time.perf_counter()
                ctx.decode(tokens[PREFIX : PREFIX + n], all_logits=True)
                timings.append(time.perf_counter() - started)
                if attempt == 0:
                    rows = ctx.logits()
                    difference = float(np.max(np.abs(rows - reference_rows[:n])))
                    # the next token reads the K/V this batch wrote: it must not differ either
                    ctx.decode([tokens[PREFIX + n]], all_logits=True)
                    difference = max(difference, float(np.max(np.abs(ctx.logits()[0] - reference_rows[n]))))
                    if difference > 0.0 or not np.isfinite(difference):
                        differing.append(n)
                        max_difference = max(max_difference, difference)
            seconds[n] = min(timings)
            step()
        if differing:  # how far apart the logits drift when every batch writes the cache, as in a reply
            max_difference = max(max_difference, _depth_difference(ctx, tokens, reference_rows, [n for n in sizes if n > 1]))
        step()
        exact_up_to = min(differing) - 1 if differing else max(sizes)
        quiet = cpu.quiet or not model.on_cpu
        return MainProfile(KernelCheck(not differing, max_difference, differing, exact_up_to), seconds, quiet)
    finally:
        ctx.close()


def _depth_difference(ctx: Context, tokens: list[int], reference_rows: np.ndarray, widths: list[int]) -> float:
    """The largest logit difference along DEPTH tokens read in verify batches of each width in turn."""
    ctx.truncate(PREFIX)
    position, largest, turn = 0, 0.0, 0
    while position < len(reference_rows):
        n = min(widths[turn % len(widths)], len(reference_rows) - position)
        turn += 1
        ctx.decode(tokens[PREFIX + position : PREFIX + position + n], all_logits=True)
        largest = max(largest, float(np.max(np.abs(ctx.logits() - reference_rows[position : position + n]))))
        position += n
    return largest


def profile_draft(model: Model, n_threads: int) -> DraftProfile:
    """What a draft-model evaluation costs on this machine (cached)."""
    key = _key("draft", model, n_threads, {})
    cached = load_cache().get(key)
    if cached:
        try:
            return DraftProfile(float(cached["token_seconds"]), float(cached["catch_up_seconds"]))
        except (KeyError, TypeError, ValueError):
            pass
    profile = measure_draft(model, n_threads)
    store(key, {**asdict(profile), "measured": time.time()})
    return profile


def measure_draft(model: Model, n_threads: int) -> DraftProfile:
    tokens = probe_tokens(model, CATCH_UP + DRAFT_TOKENS + 1)
    ctx = draft_context(model, n_ctx=CATCH_UP + DRAFT_TOKENS + 16, n_threads=n_threads)
    try:
        ctx.decode(tokens[:1])  # warm-up
        started = time.perf_counter()
        ctx.decode(tokens[1 : CATCH_UP + 1])
        catch_up = (time.perf_counter() - started) / CATCH_UP
        singles = []
        for token in tokens[CATCH_UP + 1 :]:
            started = time.perf_counter()
            ctx.decode([token])
            singles.append(time.perf_counter() - started)
        return DraftProfile(statistics.median(singles), catch_up)
    finally:
        ctx.close()
