"""The llama.cpp build that fits this CPU, weight placement chosen by trial, and measurements that heal.

These run on whatever machine runs the tests (an AMX Xeon, an AVX-512 EPYC...): they check what llama.cpp
offers there, never a fixed answer for one CPU.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.engine import backends, kernels, probe
from app.engine.backend import Context, Model, init_backend
from app.engine.kernels import KernelChoice, Trial
from app.engine.loading import EngineSpec, load_engine
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig, SpeculativeEngine
from tests import tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kquant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.k_quant_model(tmp_path_factory.mktemp("kernels"))


def _score(path: Path) -> int:
    lib = ctypes.CDLL(str(path))
    lib.ggml_backend_score.restype = ctypes.c_int
    return lib.ggml_backend_score()


def test_the_cpu_backend_loaded_is_the_best_for_this_cpu() -> None:
    init_backend()
    variants = sorted(backends.library_dir().glob("libggml-cpu-*.so"))
    if not variants:
        pytest.skip("a build with its CPU backend linked in (not the Makefile's)")
    scores = {p.name.removeprefix("libggml-cpu-").removesuffix(".so"): _score(p) for p in variants}
    best = max(scores, key=scores.__getitem__)
    assert scores["x64"] > 0  # the baseline runs on any x86-64 CPU
    assert backends.backends().cpu_variant == best, scores
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2 " in flags:
        assert "AVX2" in backends.backends().features


def test_version_names_the_backend_in_use() -> None:
    out = subprocess.run([sys.executable, "-m", "app", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    init_backend()
    assert re.search(rf"CPU backend {re.escape(backends.backends().cpu_variant)} on ", out.stdout), out.stdout


def test_a_gpu_build_on_a_machine_without_a_gpu_answers_on_its_cpu(tiny) -> None:
    """A CUDA build (`CMAKE_ARGS=-DGGML_CUDA=on make setup`) run where there is no GPU or driver: the CUDA backend
    is skipped, the CPU variant answers. Runs in a venv that has such a build (skipped in the CPU-only CI)."""
    if not any(backends.library_dir().glob("*ggml-cuda*")):
        pytest.skip("this venv's llama.cpp has no CUDA backend")
    if backends.backends().accelerators:
        pytest.skip("a GPU is here: this is not the machine this test is about")
    assert backends.cuda_runtime_dirs()  # NVIDIA's wheels, installed by packaging/cuda_libs.py
    args = ["-m", "app", "--model", str(tiny.main), "--draft", str(tiny.draft), "--prompt", "hi", "-n", "4", "-t", "2", "-c", "256"]
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    version = subprocess.run([sys.executable, "-m", "app", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "CPU backend" in version.stdout and "CUDA" not in version.stdout


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user not installed (Debian: qemu-user)")
@pytest.mark.parametrize("cpu,variant", [("Haswell", "haswell"), ("Nehalem", "sse42")])
def test_an_older_cpu_gets_its_own_build_and_answers(tiny, cpu, variant) -> None:
    """Emulated (qemu-user): an AVX2 laptop CPU and a pre-AVX one get the variant built for them, and answer."""
    python = Path(sys.prefix) / "bin" / "python"  # the venv's launcher: it finds the venv under qemu too
    # the kernel trial's children would run natively, outside the emulation: force llama.cpp's default placement
    env = {**os.environ, "TANDEM_CPU_EXTRA_BUFFERS": "1"}
    args = ["-m", "app", "--model", str(tiny.main), "--draft", str(tiny.draft), "--prompt", "hi", "-n", "4", "-t", "2", "-c", "256",
            "--temp", "0", "--json"]  # fmt: skip
    out = subprocess.run(["qemu-x86_64", "-cpu", cpu, str(python), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout)
    assert reply["tokens"] and f"CPU {variant}" in reply["stats"]["backend"], reply["stats"]


# --- the choice ---------------------------------------------------------------------------------------

AMX, REPACK, PLAIN = ("AMX", "CPU_REPACK"), ("CPU_REPACK",), ()


def trial(bufts, token_ms, eight_ms=None, failure="") -> Trial:
    widths = {8: eight_ms / 1000} if eight_ms else {}
    return Trial(bufts, token_ms / 1000, widths, sorted(widths), failure)


def test_the_fastest_safe_placement_is_chosen() -> None:
    trials = [trial(AMX, 50, failure="crashed (signal 11) on a batch of 2 tokens"), trial(REPACK, 70, 200), trial(PLAIN, 90, 300)]
    choice = kernels.choose(trials, "main")
    assert choice.bufts == REPACK and choice.batches
    assert "amx" in choice.reason and "crashed" in choice.reason  # the reason names what was ruled out


def timed(bufts, token_ms: float, per_width_ms: dict[int, float]) -> Trial:
    """A trial timed at every width the engine decodes, by linear interpolation between the given ones."""
    points = sorted({1: token_ms, **per_width_ms}.items())
    widths = {}
    for width in kernels.MEASURED_WIDTHS[1:]:
        (a, ta), (b, tb) = next(((p, q) for p, q in itertools.pairwise(points) if p[0] <= width <= q[0]), points[-2:])
        widths[width] = (ta + (tb - ta) * (width - a) / (b - a)) / 1000
    return Trial(bufts, token_ms / 1000, widths, sorted(widths))


def test_a_main_model_gets_the_kernels_fastest_for_the_batches_it_decodes() -> None:
    """The figures of an AMX Xeon (the real pair's Q4_K_M main model, quiet): repacked was 4% faster for one token
    and a third slower for 4 and 8. A drafting main model, or four replies at once, decode those batches; plain
    decoding of one reply decodes one token at a time."""
    amx = timed(AMX, 25.3, {4: 32.6, 8: 56.8, 64: 400})
    repacked = timed(REPACK, 24.3, {4: 49.2, 8: 71.1, 64: 520})
    assert kernels.choose([amx, repacked], "main").bufts == AMX
    assert kernels.choose([amx, repacked], "main", sequences=4, drafting=False).bufts == AMX
    assert kernels.choose([amx, repacked], "main", drafting=False).bufts == REPACK
    assert kernels.choose([amx, repacked], "draft").bufts == REPACK  # a draft decodes one token at a time
    # one token much faster outweighs batches a little slower
    assert kernels.choose([timed(AMX, 40, {4: 48, 8: 80}), timed(REPACK, 24, {4: 50, 8: 84})], "main").bufts == REPACK


def test_a_tie_is_settled_by_the_batches_a_drafting_main_model_decodes() -> None:
    for role in ("main", "draft"):
        assert kernels.choose([trial(REPACK, 70, 250), trial(PLAIN, 70.5, 200)], role, drafting=False).bufts == PLAIN
        assert kernels.choose([trial(REPACK, 60, 250), trial(PLAIN, 70, 200)], role, drafting=False).bufts == REPACK


def test_the_widths_weighed_follow_the_sequences_and_drafting() -> None:
    assert kernels.decode_widths("draft", 8) == {1: 1.0}
    assert kernels.decode_widths("main", 1, drafting=False) == {1: 1.0}
    one = kernels.decode_widths("main")
    assert one[1] == kernels.PLAIN_SHARE and sorted(one)[1:] == list(range(2, 10))
    four = kernels.decode_widths("main", 4)
    assert four[4] == kernels.PLAIN_SHARE and min(w for w in four if w != 4) == 8 and max(four) == 32
    assert kernels.decode_widths("main", 64, drafting=False) == {64: 1.0}
    for widths in (one, four, kernels.decode_widths("main", 64)):
        assert sum(widths.values()) == pytest.approx(1.0) and set(widths) <= set(kernels.MEASURED_WIDTHS)


def test_a_width_one_candidate_did_not_time_is_left_out_for_all() -> None:
    partial = Trial(REPACK, 0.010, {8: 0.030}, [8])
    full = timed(PLAIN, 11, {8: 50})
    shares = kernels.decode_widths("main")
    expected = (1.1 ** shares[1] * (50 / 30) ** shares[8]) ** (1 / (shares[1] + shares[8]))  # widths 1 and 8 only
    assert kernels.workload_cost([partial, full], shares) == {0: 1.0, 1: pytest.approx(expected)}


def test_a_draft_may_run_one_token_at_a_time_on_the_fastest_kernels() -> None:
    single_only = trial(AMX, 5.3, failure="crashed (signal 11) on a batch of 2 tokens")
    single_only.token_seconds = 0.0053
    trials = [single_only, trial(REPACK, 11, 40), trial(PLAIN, 11, 45)]
    assert kernels.choose(trials, "main").bufts == REPACK  # a main model verifies batches: never
    draft = kernels.choose(trials, "draft")
    assert draft.bufts == AMX and not draft.batches


def test_nothing_sound_falls_back_to_plain_memory_and_says_why() -> None:
    choice = kernels.choose([trial(AMX, 0, failure="crashed (signal 4) on loading")], "main")
    assert choice.bufts == PLAIN and "crashed (signal 4)" in choice.reason


@pytest.mark.parametrize("widths,failure", [
    ([1, 2, 3], "crashed (signal 11) on a batch of 4 tokens"),
    ([1, *kernels.VERIFY_WIDTHS, *kernels.PROMPT_WIDTHS], "crashed (signal 11) on its way out, after every width"),
    ([], "crashed (signal 11) on loading"),
])  # fmt: skip
def test_a_crashing_trial_is_read_as_far_as_it_got(monkeypatch, tmp_path, widths, failure) -> None:
    """A child that dies (as llama.cpp's AMX kernels do on some batches) costs only itself."""
    script = (
        "import json, os, signal, sys\n"
        f"for w in {widths!r}:\n"
        "    print(json.dumps({'width': w, 'seconds': 0.01 * w}), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    monkeypatch.setattr(kernels, "_self_command", lambda: [sys.executable, "-c", script])
    result = kernels.trial(tmp_path / "any.gguf", AMX, 2)
    assert result.token_seconds == (0.01 if widths else 0.0) and result.safe_widths == widths[1:]
    assert result.failure == failure and not result.batches


def test_a_real_trial_on_this_cpu(kquant, monkeypatch, tmp_path) -> None:
    """Every candidate this CPU offers is tried in a child; the choice decodes every width safely, and is cached."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "QUIET_SHARE", 0.0)  # a busy moment must not keep it from the cache under test here
    init_backend()
    if len(kernels.candidates()) <= 1:
        pytest.skip("this CPU's backend offers no weight placement but plain memory")
    choice = kernels.cached_choice(kquant, 2, "main")
    entry = next(iter(probe.load_cache().values()))
    assert [tuple(t["bufts"]) for t in entry["trials"]] == kernels.candidates()
    assert any(t["token_seconds"] > 0 for t in entry["trials"])
    model = Model(kquant, kernels=choice)
    ctx = Context(model, 128, 2)
    ctx.decode(model.tokenize("the cat sat on the mat and the dog " * 3)[:40], all_logits=True)
    assert ctx.logits().shape[0] == 40

    def measured_again(*_args, **_kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(kernels, "measure", measured_again)
    assert kernels.cached_choice(kquant, 2, "main") == choice


def test_repacked_without_amx_puts_weights_where_it_says(kquant) -> None:
    init_backend()
    offered = kernels.extra_buffer_types()
    if "CPU_REPACK" not in offered:
        pytest.skip("this CPU's backend has no repacked kernels")
    info = Model(kquant, kernels=kernels.PLAIN_CHOICE).info
    names = kernels.supported_tensors(info, "CPU_REPACK")
    assert names and all(not n.startswith("token_embd") for n in names)
    patterns = [re.compile(p) for p in kernels._name_patterns(names)]
    for tensor in info.tensors:
        assert any(p.search(tensor.name) for p in patterns) == (tensor.name in names)
    from app.engine import backend

    Model(kquant, kernels=KernelChoice(REPACK))
    log = "".join(backend._log_tail)
    assert "CPU_REPACK" in log and "AMX model buffer" not in log


# --- measurements that heal ------------------------------------------------------------------------------


def test_an_implausible_cached_curve_is_measured_again(kquant, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    # a tiny model's curve is microseconds and its noise can dip 30%: here only the planted curve (a dip to a third)
    # is to read as implausible, and the machine as quiet, so the test is of the rule, not of this moment's noise
    monkeypatch.setattr(probe, "PLAUSIBLE_DIP", 0.45)
    monkeypatch.setattr(probe, "QUIET_SHARE", 0.0)
    model = Model(kquant)
    first = probe.profile_main(model, 2)
    assert first.plausible
    busy = dict(first.verify_seconds)
    busy[8], busy[9] = busy[1] * 12, busy[1] * 4  # 9 tokens far cheaper than 8: timed while something else ran
    key = probe._main_key(model, 2, probe.VERIFY_SIZES)
    probe.store(key, {"kernels": probe.asdict(first.kernels), "verify_seconds": busy})
    assert not probe.MainProfile(first.kernels, busy).plausible
    again = probe.profile_main(model, 2)
    assert again.plausible and probe.load_cache()[key]["verify_seconds"] != {str(n): s for n, s in busy.items()}


def test_a_curve_timed_under_load_is_replaced_within_one_reply(kquant, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "PLAUSIBLE_DIP", 0.0)  # the re-timed curve is kept whatever this moment's noise
    monkeypatch.setattr(probe, "QUIET_SHARE", 0.0)
    model = Model(kquant)
    quiet = probe.profile_main(model, 2)
    # a plausible shape, fifty times too slow: a tiny model's live rounds carry Python's share on top of the decode,
    # and a 0.2 ms decode that a busy moment stretches past 0.75x a 10x curve breaks the run of stale rounds
    slowed = {n: s * 50 for n, s in quiet.verify_seconds.items()}
    key = probe._main_key(model, 2, probe.VERIFY_SIZES)
    probe.store(key, {"kernels": probe.asdict(quiet.kernels), "verify_seconds": slowed})
    engine = SpeculativeEngine(model, None, n_ctx=512, n_threads=2, lookup=True)
    assert engine.main_profile.verify_seconds == slowed  # plausible, so used as cached
    prompt = model.tokenize("alpha beta gamma delta " * 4)
    config = GenerationConfig(max_tokens=60, sampler=SamplerSettings(temperature=0.0), draft_max=0)
    list(engine.generate(prompt, config))
    assert engine.main_profile.verify_seconds[1] < 0.75 * slowed[1]
    stored = probe.load_cache()[key]["verify_seconds"]
    assert float(stored["1"]) == engine.main_profile.verify_seconds[1]


def test_first_measurements_report_their_progress(kquant, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    # a tiny model's curve is microseconds: noise may dip it, or a busy moment take the CPU, and then it is rightly not
    # kept (the next test); here the measurement counts as quiet and plausible, so the cache itself is what is tested
    monkeypatch.setattr(probe, "PLAUSIBLE_DIP", 0.0)
    monkeypatch.setattr(probe, "QUIET_SHARE", 0.0)
    steps: list[tuple[str, int, int]] = []
    engine = load_engine(EngineSpec(main=kquant, threads=2, ctx_size=256), measuring=lambda *step: steps.append(step))
    engine.close()
    trials = [s for s in steps if "trying this CPU's kernels" in s[0]]
    checks = [s for s in steps if "measuring this CPU's kernels" in s[0]]
    assert trials[-1][1:] == (len(kernels.candidates()), len(kernels.candidates())) or len(kernels.candidates()) <= 1
    # the self-check, step by step: one-token decoding, each verify width, the reply-deep run
    assert [done for _, done, _ in checks] == list(range(1, len(probe.VERIFY_SIZES) + 2))
    assert checks[-1][2] == len(probe.VERIFY_SIZES) + 1
    steps.clear()  # cached now: a second launch measures nothing
    load_engine(EngineSpec(main=kquant, threads=2, ctx_size=256), measuring=lambda *step: steps.append(step)).close()
    assert steps == []


def test_measurements_on_a_busy_machine_are_used_but_not_kept(kquant, monkeypatch, tmp_path) -> None:
    """A machine busy with other work (the process got well under its threads' CPU time) times everything
    slow and out of shape: those figures serve this launch only, the next launch measures again."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    init_backend()
    if len(kernels.candidates()) <= 1:
        pytest.skip("this CPU's backend offers no weight placement but plain memory")
    busy = [Trial(bufts, 0.05, {8: 0.2}, [8], cpu_share=0.4) for bufts in kernels.candidates()]
    monkeypatch.setattr(kernels, "trial", lambda path, bufts, n_threads, cancel=None: next(t for t in busy if t.bufts == bufts))
    choice = kernels.cached_choice(kquant, 2, "main")
    assert choice.bufts == kernels.candidates()[0] and probe.load_cache() == {}
    model = Model(kquant, kernels=kernels.PLAIN_CHOICE)  # (the made-up trials above vouch for no real kernel)
    monkeypatch.setattr(probe.CpuShare, "quiet", property(lambda self: False))
    profile = probe.profile_main(model, 2)
    assert not profile.quiet and probe.load_cache() == {}
    monkeypatch.undo()
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "PLAUSIBLE_DIP", 0.0)  # a quiet measurement is kept (noise cannot dip it out here)
    monkeypatch.setattr(probe, "QUIET_SHARE", 0.0)
    assert probe.profile_main(model, 2).quiet and probe._main_key(model, 2, probe.VERIFY_SIZES) in probe.load_cache()
