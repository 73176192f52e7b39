"""The main model on llama.cpp RPC workers, the draft here: plain vs the default mode vs a fixed draft length, over
loopback with added latency, and llama.cpp's own `llama-speculative-simple --rpc` on the same workers and files.

Each worker is `tandem --rpc-worker` (ggml's RPC server) on 127.0.0.1; between client and workers sits a delay
proxy (bench/delay_proxy.py) adding 0, 1, 5 or 20 ms each way: a LAN to a Wi-Fi link. Per worker count and
latency the pair is loaded once (its verify-cost probe measured over that network, as a user's first run does)
and the modes run interleaved on each prompt; then llama.cpp's tool runs on the same workers (a worker serves
one client at a time). Greedy; every figure is from this machine, which the table's first line names.

    python bench/rpc_bench.py [--pair real|demo] [--workers 1,2] [--latency 0,1,5,20] [--modes plain,adaptive,k4]
                              [--only quicksort,pythagoras] [--runs 1] [--max-tokens 128] [--no-anchor]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine.chat import Message, format_chat, tokenize_prompt  # noqa: E402
from app.engine.demo import ensure_demo_pair  # noqa: E402
from app.engine.loading import EngineSpec, load_engine  # noqa: E402
from app.engine.sampling import SamplerSettings  # noqa: E402
from app.engine.speculative import GenerationConfig, SpeculativeEngine  # noqa: E402
from bench.bench import SHORT_ANSWER, anchor_dir, load_prompts, machine, mode_config, real_pair, run_once, run_speculative_simple  # noqa: E402

WORKER_PORT, PROXY_PORT = 50700, 50800  # fixed ports: a probe cached for one (workers, latency) is found again


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a helper process on port {port} ended: {process.args}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port}")


@contextlib.contextmanager
def processes(commands: list[tuple[list[str], int]]) -> Iterator[None]:
    started = []
    try:
        for command, port in commands:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(process)
            wait_listening(port, process)
        yield
    finally:
        for process in started:
            process.kill()
            process.wait()


def workers(n: int, threads: int) -> list[tuple[list[str], int]]:
    return [([sys.executable, "-m", "app", "--rpc-worker", "--port", str(WORKER_PORT + i), "--threads", str(threads)],
             WORKER_PORT + i) for i in range(n)]  # fmt: skip


def proxies(n: int, latency_ms: float, slot: int) -> tuple[list[tuple[list[str], int]], tuple[str, ...]]:
    ports = [PROXY_PORT + 10 * slot + i for i in range(n)]
    commands = [([sys.executable, str(ROOT / "bench" / "delay_proxy.py"), str(port), f"127.0.0.1:{WORKER_PORT + i}", str(latency_ms)], port)
                for i, port in enumerate(ports)]  # fmt: skip
    return commands, tuple(f"127.0.0.1:{port}" for port in ports)


def close(engine: SpeculativeEngine) -> None:
    """Free both models now: a worker serves one client at a time, and the next is llama.cpp's tool."""
    engine.close()
    engine.main.close()
    if engine.draft_model is not None:
        engine.draft_model.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("demo", "real"), default="real")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--latency", default="0,1,5,20", help="ms added each way")
    parser.add_argument("--modes", default="plain,adaptive,k4")
    parser.add_argument("--only", default="quicksort,pythagoras", help="prompt ids (all: every bench prompt and the short answer)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="threads of each worker and of this process")
    parser.add_argument("--anchor-k", type=int, default=4)
    parser.add_argument("--no-anchor", action="store_true")
    args = parser.parse_args()

    main_path, draft_path = real_pair() if args.pair == "real" else ensure_demo_pair()
    prompts = [*load_prompts(None), SHORT_ANSWER]
    if args.only != "all":
        prompts = [p for p in prompts if p["id"] in args.only.split(",")]
    modes = args.modes.split(",")
    bin_dir = None if args.no_anchor else anchor_dir(None)
    base = GenerationConfig(max_tokens=args.max_tokens, sampler=SamplerSettings(temperature=0.0))
    print(f"machine: {machine()}; measured {time.strftime('%Y-%m-%d')}")
    print(f"main {main_path.name} on loopback RPC workers ({args.threads} threads each), draft {draft_path.name} here "
          f"({args.threads} threads); greedy, {args.max_tokens} tokens max, prompts {', '.join(p['id'] for p in prompts)}; "
          f"{args.runs} interleaved run(s), medians", flush=True)
    rows = []
    for n_workers in map(int, args.workers.split(",")):
        with processes(workers(n_workers, args.threads)):
            for slot, latency in enumerate(map(float, args.latency.split(","))):
                commands, endpoints = proxies(n_workers, latency, slot)
                with processes(commands):
                    rows.append(measure(n_workers, latency, endpoints, main_path, draft_path, prompts, modes, base, args, bin_dir))
    header = ["workers", "ms each way", *[f"{m} tok/s" for m in modes], *[f"{m} / plain" for m in modes if m != "plain"]]
    if bin_dir:
        header += [f"llama-speculative-simple k{args.anchor_k} tok/s", "ours default / it"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def measure(n_workers: int, latency: float, endpoints: tuple[str, ...], main_path: Path, draft_path: Path,
            prompts: list[dict[str, str]], modes: list[str], base: GenerationConfig, args: argparse.Namespace,
            bin_dir: Path | None) -> list[str]:  # fmt: skip
    started = time.perf_counter()
    spec = EngineSpec(main=main_path, draft=str(draft_path), rpc=endpoints, threads=args.threads, draft_on_gpu=False)
    engine = load_engine(spec)
    load_seconds = time.perf_counter() - started
    profile = engine.main_profile
    print(f"\n{n_workers} worker(s), {latency:g} ms each way: loaded in {load_seconds:.1f} s; verify cost, batch of n / one token "
          f"({profile.verify_seconds[1] * 1000:.0f} ms): " + " ".join(f"{n}:{profile.ratio(n):.2f}" for n in profile.verify_seconds),
          flush=True)  # fmt: skip
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    texts = []
    try:
        for prompt in prompts:
            text = format_chat(engine.main, [Message("user", prompt["prompt"])])
            texts.append(text)
            tokens = tokenize_prompt(engine.main, text)
            samples: dict[str, list[float]] = {m: [] for m in modes}
            first: dict[str, tuple[int, ...]] = {}
            for _ in range(args.runs):
                for m in modes:
                    sample = run_once(engine, tokens, mode_config(m, base)[1])
                    samples[m].append(sample.tok_s)
                    first.setdefault(m, sample.tokens)
            same = all(t == first[modes[0]] for t in first.values())
            line = ", ".join(f"{m} {statistics.median(v):.2f}" for m, v in samples.items())
            print(f"  {prompt['id']}: {line} tok/s" + ("" if same else " (outputs differ from plain: near-ties)"), flush=True)
            for m in modes:
                speeds[m].append(statistics.median(samples[m]))
    finally:
        close(engine)
    med = {m: statistics.median(v) for m, v in speeds.items()}  # the median over prompts
    row = [str(n_workers), f"{latency:g}", *[f"{med[m]:.2f}" for m in modes]]
    row += [f"{med[m] / med['plain']:.2f}x" for m in modes if m != "plain" and "plain" in med]
    if bin_dir:
        extra = ("--rpc", ",".join(endpoints), "-ngl", "99", "-ngld", "0")
        anchor = [run_speculative_simple(bin_dir, main_path, draft_path, text, args, args.anchor_k, extra) for text in texts]
        ours = med.get("adaptive", 0.0)
        row += [f"{statistics.median(anchor):.2f}", f"{ours / statistics.median(anchor):.2f}x"]
        print(f"  llama-speculative-simple k{args.anchor_k}: " + ", ".join(f"{a:.2f}" for a in anchor) + " tok/s", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
