"""The HTTP server under load: requests/s and latency percentiles (time to first token and total, p50/p95)
for 1, 4 and 16 concurrent clients, plain decoding vs the default speculative mode, on one pair.

Each mode runs `tandem --serve` in its own process (as users run it) and streaming chat requests from
real HTTP clients (httpx). The engine serves one request at a time, so with more clients throughput
stays put and latency grows with the queue; what differs between modes is how fast each request runs.

    .venv/bin/python bench/server_bench.py [--pair demo|real] [--max-tokens 64] [--clients 1 4 16]
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

from bench.bench import load_prompts, machine, real_pair  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_args: list[str], mode_args: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "app", "--serve", "--port", str(port), "-t", str(threads), "-c", "4096", "--max-queue", "64"]
    process = subprocess.Popen([*args, *model_args, *mode_args], cwd=ROOT, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def one_request(base: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first content, total seconds, completion tokens) of one streaming chat request."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif not first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(base: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    requests = [prompts[i % len(prompts)] for i in range(max(2 * clients, 8))]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("demo", "real"), default="demo")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model_args: list[str] = []
    draft_args: list[str] = []
    if args.pair == "real":
        main_path, draft_path = real_pair()
        model_args, draft_args = ["--model", str(main_path)], ["--draft", str(draft_path)]
    prompts = [p["prompt"] for p in load_prompts(None)]
    modes = {"plain": ["--no-draft"], "speculative (default)": draft_args}
    print(f"machine: {machine()}; pair: {args.pair}; {args.threads} threads; {args.max_tokens} tokens per request, greedy")
    print("| mode | clients | requests | req/s | tok/s | TTFT p50 | TTFT p95 | total p50 | total p95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, mode_args in modes.items():
        process, base = start_server(model_args, mode_args, args.threads)
        try:
            one_request(base, prompts[0], 8)  # warm-up: the first request pays for the kernel probe's cache check
            for clients in args.clients:
                r = run_level(base, prompts, clients, args.max_tokens)
                print(f"| {mode} | {clients} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} s | "
                      f"{r['ttft_p95']:.2f} s | {r['total_p50']:.2f} s | {r['total_p95']:.2f} s |", flush=True)  # fmt: skip
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
