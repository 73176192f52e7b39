"""The HTTP server under load: aggregate tok/s and latency percentiles (time to first token and total, p50/p95)
for 1, 4 and 16 concurrent clients; plain decoding and the default speculative mode, each at `--parallel 1`
(one request at a time) and `--parallel 4` (four sequences in one batch per round), on one pair; side by
side with llama.cpp's `llama-server -np 4 -md DRAFT` on the same files when its tools are built
(../shared/tools/build-llama-anchor.sh).

Every server runs in its own process (as users run it), all loaded before the first request; each client
level then runs on every server in turn (interleaved: a machine that gets busy touches them all alike), with
streaming chat requests from real HTTP clients (httpx), greedy, each with its own text (the shared prompts,
numbered). Ratios are read within one run.

    .venv/bin/python bench/server_bench.py [--pair demo|real] [--max-tokens 64] [--clients 1 4 16] [--parallel 1 4] [--exact] [--no-anchor]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine.backend import amx_cpu  # noqa: E402
from bench.bench import anchor_dir, load_prompts, machine, real_pair  # noqa: E402

CTX = 4096  # tokens per sequence


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(process: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server at {base} did not start")
        time.sleep(0.2)


def ready(process: subprocess.Popen, base: str, prompt: str) -> None:
    """One server at a time: a load (and any first-run measurement) never shares the machine with another."""
    wait_ready(process, base)
    one_request(base, prompt, 8)  # warm-up: the first request pays for loading what is cached


def start_tandem(model_args: list[str], mode_args: list[str], threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "app", "--serve", "--port", str(port), "-t", str(threads), "-c", str(CTX), "--max-queue", "64",
            "--parallel", str(parallel)]  # fmt: skip
    process = subprocess.Popen([*args, *model_args, *mode_args], cwd=ROOT, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def start_llama_server(bin_dir: Path, main: Path, draft: Path, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server with the draft model, `-c` its total: CTX per slot, as ours."""
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(main), "-md", str(draft), "-np", str(parallel), "-c", str(CTX * parallel),
           "-t", str(threads), "-td", str(threads), "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    if amx_cpu():  # llama.cpp's AMX kernels crash on batches of quantized weights (see engine/kernels.py)
        cmd.append("--no-repack")
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def one_request(base: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first content, total seconds, completion tokens) of one streaming chat request."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = 0.0
    usage = counted = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                counted += 1  # llama-server without usage: one token per chunk
                first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, usage or counted


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(base: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    # each request its own text, as independent clients send: the shared prompts repeated verbatim would let a
    # server answer some from its prompt cache, by the luck of which sequence is free when (see the README); the
    # level is in it too, or a server that keeps old prompts in RAM (llama-server's --cache-ram) reads the next
    # level's prompts from the last one's
    requests = [f"Request {clients}-{i + 1}. {prompts[i % len(prompts)]}" for i in range(max(3 * clients, 12))]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(base, p, max_tokens), requests))
    wall = time.perf_counter() - started
    ttft, total = [r[0] for r in results], [r[1] for r in results]
    return {
        "requests": len(results), "req_s": len(results) / wall, "tok_s": sum(r[2] for r in results) / wall,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
        "total_p50": percentile(total, 0.5), "total_p95": percentile(total, 0.95),
    }  # fmt: skip


def worker_clock(base: str) -> tuple[float, float] | None:
    """A Tandem server's (worker seconds, of which inside llama.cpp's decodes) from /metrics; None elsewhere."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("tandem:") and " " in line)
    if "tandem:worker_seconds_total" not in values:
        return None
    return float(values["tandem:worker_seconds_total"]), float(values["tandem:llama_decode_seconds_total"])


def python_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> str:
    """The part of the worker's time outside llama.cpp over one client level."""
    if before is None or after is None or after[0] <= before[0]:
        return "-"
    return f"{1 - (after[1] - before[1]) / (after[0] - before[0]):.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("demo", "real"), default="demo")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-anchor", action="store_true", help="leave out llama.cpp's llama-server")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4], help="Tandem's --parallel values to run")
    parser.add_argument("--exact", action="store_true", help="also Tandem speculative --exact at the widest --parallel")
    args = parser.parse_args()
    if args.pair == "real":
        main_path, draft_path = real_pair()
    else:
        from app.engine.demo import ensure_demo_pair

        main_path, draft_path = ensure_demo_pair()
    model_args, draft_args = ["--model", str(main_path)], ["--draft", str(draft_path)]
    prompts = [p["prompt"] for p in load_prompts(None)]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        kinds = [(mode, mode_args, parallel) for mode, mode_args in {"plain": ["--no-draft"], "speculative": draft_args}.items()
                 for parallel in args.parallel]  # fmt: skip
        if args.exact:
            kinds.append(("speculative --exact", [*draft_args, "--exact"], max(args.parallel)))
        for mode, mode_args, parallel in kinds:
            servers[f"Tandem {mode}, --parallel {parallel}"] = start_tandem(model_args, mode_args, args.threads, parallel)
            ready(*servers[f"Tandem {mode}, --parallel {parallel}"], prompts[0])
        bin_dir = None if args.no_anchor else anchor_dir(None)
        if bin_dir is not None and (bin_dir / "llama-server").exists():
            servers["llama-server -np 4 -md"] = start_llama_server(bin_dir, main_path, draft_path, args.threads, 4)
            ready(*servers["llama-server -np 4 -md"], prompts[0])
        print(f"machine: {machine()}; pair: {args.pair} ({main_path.name} + {draft_path.name}); {args.threads} threads; "
              f"{args.max_tokens} tokens per request, greedy, streaming")  # fmt: skip
        print("Python share: of the engine thread's time over the level, the part outside llama.cpp's decodes (/metrics)")
        print("| server | clients | requests | tok/s | TTFT p50 | TTFT p95 | total p50 | total p95 | Python share |")
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            for name, (_, base) in servers.items():
                before = worker_clock(base)
                r = run_level(base, prompts, clients, args.max_tokens)
                share = python_share(before, worker_clock(base))
                print(f"| {name} | {clients} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} s | "
                      f"{r['ttft_p95']:.2f} s | {r['total_p50']:.2f} s | {r['total_p95']:.2f} s | {share} |", flush=True)  # fmt: skip
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGINT)
        for process, _ in servers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
