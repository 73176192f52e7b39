"""Plain vs speculative decoding through the same engine, runs interleaved, medians reported.

With llama.cpp's own tools present (built by ../shared/tools/build-llama-anchor.sh), it also runs
`llama-speculative-simple` and `llama-bench` on the same files and settings, and prints our
ratios to them. This is a benchmark, not a test: numbers on a shared 2-core machine are noisy,
which is why every figure is a median of interleaved runs and every claim is a ratio within one run.

    python bench/bench.py [--pair demo|real] [--runs 3] [--max-tokens 256] [--modes plain,k2,k4,k8,adaptive]
                          [--anchor-dir DIR|none] [--chat] [--busy N]

`--pair real` is Qwen2.5-Coder-1.5B-Instruct Q4_K_M with its 0.5B sibling as draft, fetched (and cached) by
../shared/tools/fetch-real-pair.sh. Besides the shared prompts it runs a short answer (a JSON array of a few
tokens: where fixed costs weigh most). `--chat` measures time to first token over a multi-turn chat, plain
against the default mode. Every table starts with the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine import kernels  # noqa: E402
from app.engine.backend import Model, amx_cpu, init_backend  # noqa: E402
from app.engine.backends import backends  # noqa: E402
from app.engine.chat import ChatSession, Message, format_chat, tokenize_prompt  # noqa: E402
from app.engine.demo import ensure_demo_pair  # noqa: E402
from app.engine.events import Finished  # noqa: E402
from app.engine.sampling import SamplerSettings  # noqa: E402
from app.engine.speculative import GenerationConfig, SpeculativeEngine  # noqa: E402

SHORT_ANSWER = {"id": "short-json", "kind": "short", "prompt": "List three primary colors as a JSON array of strings. Output JSON only."}
CHAT_TURNS = (
    "Write a Python function that parses a CSV line into a list of fields, handling quoted fields.",
    "Now add a docstring and type hints to it.",
    "Write three pytest tests for it.",
)
REAL_PAIR = ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


@dataclass
class Sample:
    tok_s: float
    acceptance: float
    tokens: tuple[int, ...]
    exact: bool = True
    overhead_per_round: float = 0.0  # seconds outside llama_decode per round


def machine() -> str:
    """CPU model, AMX or not, cores: every figure is about one machine."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    init_backend()
    return f"{model}, {'AMX' if amx_cpu() else 'no AMX'}, {os.cpu_count()} cores, llama.cpp CPU backend {backends().cpu_variant}"


def real_pair() -> tuple[Path, Path]:
    root = Path(os.environ.get("REAL_PAIR_DIR") or Path.home() / ".cache" / "tandem-real-pair")
    if not all((root / name).exists() for name in REAL_PAIR):
        script = ROOT.parent / "shared" / "tools" / "fetch-real-pair.sh"
        out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.split()
        return Path(out[-2]), Path(out[-1])
    return root / REAL_PAIR[0], root / REAL_PAIR[1]


def load_prompts(path: Path | None) -> list[dict[str, str]]:
    candidates = [path] if path else [ROOT.parent / "shared" / "bench" / "prompts.jsonl", ROOT / "bench" / "prompts.jsonl"]
    for candidate in candidates:
        if candidate and candidate.exists():
            return [json.loads(line) for line in candidate.read_text().splitlines() if line.strip()]
    raise SystemExit("no prompts.jsonl found")


def mode_config(name: str, base: GenerationConfig) -> tuple[str, GenerationConfig]:
    """(engine, config): plain, kN (fixed draft-model length N), adaptive (model + lookup), adaptive-pNN (with
    --draft-p-min NN%), lookup (no draft model)."""
    if name == "plain":
        return "model", replace(base, draft_max=0, adaptive=False)
    if m := re.fullmatch(r"k(\d+)", name):
        return "model", replace(base, draft_max=int(m.group(1)), adaptive=False, draft_p_min=0.0)  # as llama-speculative-simple
    if name == "adaptive":  # the default: draft model + lookup, controller's choice, llama.cpp's default draft-max
        return "model", replace(base, draft_max=16, adaptive=True)
    if m := re.fullmatch(r"adaptive-p(\d+)", name):  # the default with another --draft-p-min (percent)
        return "model", replace(base, draft_max=16, adaptive=True, draft_p_min=int(m.group(1)) / 100)
    if name == "lookup":
        return "lookup", replace(base, draft_max=16, adaptive=True)
    if name == "mtp":  # the default on a model with an MTP head: the head + lookup, controller's choice
        return "mtp", replace(base, draft_max=16, adaptive=True)
    if name == "mtp-alone":  # the head without lookup, controller's choice (--draft mtp where lookup never matches)
        return "mtp-alone", replace(base, draft_max=16, adaptive=True)
    if m := re.fullmatch(r"mtp-k(\d+)", name):  # the head alone, a fixed length (llama-server's draft-mtp)
        return "mtp", replace(base, draft_max=int(m.group(1)), adaptive=False, draft_p_min=0.0)
    raise SystemExit(f"unknown mode {name!r}")


def _spin() -> None:
    while True:
        pass


def run_once(engine: SpeculativeEngine, prompt: list[int], config: GenerationConfig) -> Sample:
    finished = next(e for e in engine.generate(prompt, config) if isinstance(e, Finished))
    stats = finished.stats
    return Sample(stats.tokens_per_second, stats.acceptance_rate, finished.tokens, stats.exact, stats.overhead_time / max(stats.rounds, 1))


def chat_ttft(main_path: Path, draft_path: Path | None, threads: int, runs: int, max_tokens: int) -> None:
    """Time to first token over a multi-turn chat: each turn re-renders the chat, both contexts keep their
    KV prefix. Plain (--no-draft) against the default (draft model + lookup, adaptive), runs alternating."""
    main_model = Model(main_path)
    draft_model = Model(draft_path, role="draft") if draft_path else None
    base = GenerationConfig(max_tokens=max_tokens, sampler=SamplerSettings(temperature=0.0))
    ttft: dict[str, list[list[float]]] = {"plain": [], "default": []}
    for _ in range(runs):
        for mode in ("plain", "default"):
            engine = SpeculativeEngine(main_model, draft_model if mode == "default" else None, n_ctx=4096, n_threads=threads,
                                       lookup=mode == "default")  # fmt: skip
            session, config = ChatSession(engine), base if mode == "default" else replace(base, draft_max=0)
            turns = []
            for text in CHAT_TURNS:
                finished = next(e for e in session.send(text, config) if isinstance(e, Finished))
                turns.append(finished.stats.time_to_first_token)
            ttft[mode].append(turns)
            engine.close()
    print(f"\ntime to first token, {len(CHAT_TURNS)}-turn chat, {runs} runs alternating, medians (s):")
    print("| turn | plain | default | default / plain |")
    print("|---|---|---|---|")
    for i in range(len(CHAT_TURNS)):
        plain = statistics.median(run[i] for run in ttft["plain"])
        default = statistics.median(run[i] for run in ttft["default"])
        print(f"| {i + 1} | {plain:.3f} | {default:.3f} | {default / plain:.2f}x |")


def anchor_dir(explicit: str | None) -> Path | None:
    if explicit == "none":  # skip llama.cpp's own tools
        return None
    if explicit:
        if not (Path(explicit) / "llama-speculative-simple").exists():
            raise SystemExit(f"no llama-speculative-simple in {explicit} (build it with ../shared/tools/build-llama-anchor.sh)")
        return Path(explicit)
    import llama_cpp

    guess = Path.home() / ".cache" / "llama-anchor" / llama_cpp.__version__ / "llama.cpp" / "build" / "bin"
    return guess if (guess / "llama-speculative-simple").exists() else None


def run_speculative_simple(bin_dir: Path, main: Path, draft: Path, prompt_text: str, args: argparse.Namespace, k: int,
                           extra: tuple[str, ...] = ()) -> float:
    cmd = [
        str(bin_dir / "llama-speculative-simple"), "-m", str(main), "-md", str(draft), "--spec-type", "draft-simple",
        "-p", prompt_text, "-n", str(args.max_tokens), "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
        "--spec-draft-p-min", "0", "-t", str(args.threads), "-td", str(args.threads), "--temp", "0", "-c", "4096",
    ]
    if amx_cpu():  # llama.cpp's AMX kernels crash on batches of quantized weights (see engine/kernels.py)
        cmd.append("--no-repack")
    cmd += extra
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"llama-speculative-simple printed no speed:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def engine_tg128(main_path: Path, threads: int, reps: int = 5) -> float:
    """Our plain decoding measured like llama-bench's tg128: 128 tokens from an empty cache (the BOS token as
    prompt: long enough never to stop early), in a context of llama-bench's size (128, which llama.cpp
    rounds up to 256: a 4096-token KV cache alone costs ~3% per token here), a warm-up run, median of reps."""
    model = Model(main_path)
    engine = SpeculativeEngine(model, None, n_ctx=256, n_threads=threads)
    _, config = mode_config("plain", GenerationConfig(max_tokens=128, sampler=SamplerSettings(temperature=0.0)))
    run_once(engine, [model.bos], config)
    return statistics.median(run_once(engine, [model.bos], config).tok_s for _ in range(reps))


def run_llama_bench(bin_dir: Path, model: Path, threads: int, n_gen: int = 128, depth: int = 0, reps: int = 5) -> float:
    """llama-bench's token-generation rate: n_gen tokens after `depth` tokens already in the cache. Its default
    kernels; on AMX CPUs a depth needs a prompt batch, on which they crash: then --repack 0 (as --no-repack)."""
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(n_gen),
               "-d", str(depth), "-r", str(reps), "-o", "json"]  # fmt: skip
    if depth and amx_cpu():
        command += ["--repack", "0"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("demo", "real"), default="demo")
    parser.add_argument("--model")
    parser.add_argument("--draft")
    parser.add_argument("--chat", action="store_true", help="time to first token over a multi-turn chat, then exit")
    parser.add_argument("--no-short", action="store_true", help="skip the short-answer prompt")
    parser.add_argument("--exact", action="store_true", help="as `tandem --exact`: batch-invariant main-model kernels")
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--only", help="comma-separated prompt ids")
    parser.add_argument("--modes", default="plain,k1,k2,k3,k4,k5,k6,k7,k8,adaptive,lookup")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anchor-dir")
    parser.add_argument("--anchor-k", type=int, default=8, help="draft length for llama-speculative-simple")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--busy", type=int, default=0, help="this many busy-loop processes hold cores meanwhile (a laptop "
                        "with a browser open: never slower must hold there too)")
    parser.add_argument("--tg-child", type=Path, help=argparse.SUPPRESS)  # one engine_tg128 measurement, in its own process
    args = parser.parse_args()
    if args.tg_child:
        print(f"{engine_tg128(args.tg_child, args.threads):.2f}")
        return 0

    if args.model:
        main_path, draft_path = Path(args.model), Path(args.draft) if args.draft else None
    elif args.pair == "real":
        main_path, draft_path = real_pair()
    else:
        main_path, draft_path = ensure_demo_pair()
    print(f"machine: {machine()}; measured {time.strftime('%Y-%m-%d')}", flush=True)
    if args.busy:
        hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for hog in hogs:
            hog.start()
        print(f"with {args.busy} busy-loop process(es) holding a core each", flush=True)
    if args.chat:
        chat_ttft(main_path, draft_path, args.threads, args.runs, args.max_tokens)
        return 0
    main_model = Model(main_path, kernels=kernels.PLAIN_CHOICE if args.exact else None, mtp=True)  # its head, if it has one
    draft_model = Model(draft_path, role="draft") if draft_path else None
    for model in (main_model, draft_model):
        if model is not None:
            print(f"kernels for {model.path.name}: {model.kernels.reason}", flush=True)
    engines = {
        "model": SpeculativeEngine(main_model, draft_model, n_ctx=4096, n_threads=args.threads, lookup=True, exact=args.exact),
        "lookup": SpeculativeEngine(main_model, None, n_ctx=4096, n_threads=args.threads, lookup=True, exact=args.exact),
    }
    if main_model.mtp_layers:
        for name, lookup in (("mtp", True), ("mtp-alone", False)):
            engines[name] = SpeculativeEngine(main_model, None, n_ctx=4096, n_threads=args.threads, lookup=lookup,
                                              exact=args.exact, mtp=True)  # fmt: skip
    base = GenerationConfig(max_tokens=args.max_tokens, sampler=SamplerSettings(temperature=0.0))
    modes = args.modes.split(",")
    prompts = load_prompts(args.prompts) + ([] if args.no_short else [SHORT_ANSWER])
    if args.only:
        prompts = [p for p in prompts if p["id"] in args.only.split(",")]
    bin_dir = None if args.no_anchor else anchor_dir(args.anchor_dir)

    print(f"main {main_path.name}, draft {draft_path.name if draft_path else '-'}, {args.threads} threads, "
          f"greedy, {args.max_tokens} tokens max, {args.runs} interleaved runs, medians", flush=True)
    engine = engines["model"]
    print(f"main-model kernels: {engine.main_profile.kernels.describe()}")
    print("verify cost (probe), batch of n / one token: "
          + " ".join(f"{n}:{engine.main_profile.ratio(n):.2f}" for n in engine.main_profile.verify_seconds))
    if engine.drafter:
        print(f"draft token / main token (probe): {engine.draft_profile.token_seconds / engine.main_profile.verify_seconds[1]:.2f}")
    print(f"adaptive: {engine.speculation_state(mode_config('adaptive', base)[1]) or 'every source may pay here'}", flush=True)
    header = ["prompt", *[f"{m} tok/s" for m in modes], *[f"{m}/plain" for m in modes if m != "plain"], "accept (k max)"]
    if bin_dir:
        header += [f"llama-speculative-simple k{args.anchor_k} tok/s", f"ours k{args.anchor_k} / it"]
        if "plain" in modes:
            header += ["llama-bench tg (same depth, length) tok/s", "plain / llama-bench"]
    rows, ratios, paired = [], {m: [] for m in modes}, {m: [] for m in modes}
    for prompt in prompts:
        text = format_chat(main_model, [Message("user", prompt["prompt"])])
        tokens = tokenize_prompt(main_model, text)
        samples: dict[str, list[Sample]] = {m: [] for m in modes}
        anchor: list[float] = []
        tg: list[float] = []
        for run in range(args.runs):
            for m in modes if run % 2 == 0 else modes[::-1]:  # the order alternates: no mode always runs first
                engine_key, config = mode_config(m, base)
                samples[m].append(run_once(engines[engine_key], tokens, config))
            if bin_dir and draft_path:
                anchor.append(run_speculative_simple(bin_dir, main_path, draft_path, text, args, args.anchor_k))
            if bin_dir and "plain" in modes:  # same depth and length as our plain run, interleaved with it
                tg.append(run_llama_bench(bin_dir, main_path, args.threads, len(samples["plain"][-1].tokens), len(tokens), reps=1))
        plain_tokens = samples[modes[0]][0].tokens
        identical = all(s.tokens == plain_tokens for runs in samples.values() for s in runs)
        inexact = sorted({m for m, runs in samples.items() for s in runs if not s.exact})
        med = {m: statistics.median(s.tok_s for s in samples[m]) for m in modes}
        label = prompt["id"] + ("" if identical else f" (differs from plain; not exact: {', '.join(inexact) or 'none'})")
        row = [label, *[f"{med[m]:.1f}" for m in modes]]
        plain = med.get("plain")
        for m in modes:
            if m != "plain" and plain:
                ratios[m].append(med[m] / plain)
                row.append(f"{med[m] / plain:.2f}x")
        k_max = max((m for m in modes if m.startswith("k")), key=lambda m: int(m[1:]), default=modes[-1])
        row.append(f"{statistics.median(s.acceptance for s in samples[k_max]):.0%}")
        if anchor:
            ours = med.get(f"k{args.anchor_k}", 0.0)
            row += [f"{statistics.median(anchor):.1f}", f"{ours / statistics.median(anchor):.2f}x"]
        if tg:
            row += [f"{statistics.median(tg):.1f}", f"{med['plain'] / statistics.median(tg):.2f}x"]
        rows.append(row)
        overhead = {m: statistics.median(s.overhead_per_round for s in samples[m]) * 1000 for m in modes}
        if "plain" in modes:  # each run against the plain run of the same round of runs: a drift between rounds cancels out
            for m in modes:
                paired[m] += [s.tok_s / p.tok_s for s, p in zip(samples[m], samples["plain"], strict=True) if m != "plain"]
        print(" | ".join(row), flush=True)
        print("   outside llama_decode, ms per round: " + ", ".join(f"{m} {v:.2f}" for m, v in overhead.items()), flush=True)

    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for m, values in ratios.items():
        if values:
            print(f"{m}/plain: mean {statistics.mean(values):.2f}x, min {min(values):.2f}x over {len(values)} prompts")
    for m, values in paired.items():
        if len(values) >= 4:
            q1, q2, q3 = statistics.quantiles(values, n=4)
            print(f"{m}/plain, paired (each run / the plain run of its round), all prompts: median {q2:.3f}x, "
                  f"quartiles {q1:.3f}-{q3:.3f}x over {len(values)} pairs")
    fixed = [m for m in modes if m.startswith("k")]
    if "adaptive" in modes and fixed:
        best = [max(float(r[1 + modes.index(m)]) for m in fixed) for r in rows]
        ada = [float(r[1 + modes.index("adaptive")]) for r in rows]
        print(f"adaptive / best fixed length in hindsight: mean {statistics.mean(a / b for a, b in zip(ada, best, strict=True)):.2f}x")
    if bin_dir:
        # llama-bench's tg128 measured the same way through our engine, each side in a fresh process (a
        # llama-bench run beside our long-lived process reads ~7% faster than one after it has exited),
        # runs alternating, medians
        ours, theirs = [], []
        for _ in range(max(args.runs, 3)):
            child = subprocess.run([sys.executable, __file__, "--tg-child", str(main_path), "--threads", str(args.threads)],
                                   capture_output=True, text=True, timeout=600, check=True)
            ours.append(float(child.stdout.split()[-1]))
            theirs.append(run_llama_bench(bin_dir, main_path, args.threads))
        print(f"tg128, runs alternating, medians: llama-bench {statistics.median(theirs):.1f} tok/s, our plain decoding "
              f"{statistics.median(ours):.1f} tok/s = {statistics.median(ours) / statistics.median(theirs):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
