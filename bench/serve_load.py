"""Serving load: N concurrent clients against `medassist serve` on loopback, for a bounded time.

Starts the server itself (a subprocess, so clients and server do not share a GIL), waits for
/health, then runs N client loops that each send one chat completion after another until
--seconds have passed. Reports requests/s, completion tokens/s, p50/p95 latency (and time to
first token with --stream) of the answered requests, and error counts by status.

With more than one client, the same server first serves ONE client for --seconds (the
baseline; --no-baseline skips it), then the N clients, and the script prints N clients over
one client: aggregate completion tokens/s (the last line, ``ratio: X``), p95 time to first
token, and the errors. Issue 14's target for 8 clients on smollm2-135m: tokens/s >= 3x,
p95 first token <= 2x, no errors:

    .venv/bin/python bench/serve_load.py --model smollm2-135m --clients 8 --seconds 60 --max-tokens 64 --stream
    .venv/bin/python bench/serve_load.py --model tiny-qwen3 --clients 4 --seconds 20 --max-tokens 16

The server batches concurrent requests by default (continuous batching, --max-concurrency
rows); --no-batching serves each request in its own thread, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx

QUESTIONS = [
    "What are the symptoms of asthma?",
    "How is type 2 diabetes treated?",
    "What causes high blood pressure?",
    "Is a fever of 38.5 C dangerous for an adult?",
    "What are the side effects of ibuprofen?",
]


@dataclass
class Result:
    status: int | str  # HTTP status, or the exception name when no answer came
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "medassist", "serve", "--model", args.model,
        "--host", "127.0.0.1", "--port", str(port), "--max-concurrency", str(args.max_concurrency),
        "--max-queue", str(args.max_queue), "--max-tokens-limit", str(max(args.max_tokens, 16)),
        "--log-level", "warning", "--batching" if args.batching else "--no-batching",
    ] + (["--threads", str(args.threads)] if args.threads else []) \
      + (["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


async def one_request(http: httpx.AsyncClient, args, i: int) -> Result:
    body = {"model": args.model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    t0 = time.perf_counter()
    try:
        if not args.stream:
            r = await http.post("/v1/chat/completions", json=body)
            tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return Result(r.status_code, time.perf_counter() - t0, None, tokens)
        body.update(stream=True, stream_options={"include_usage": True})
        ttft, tokens = None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(r.status_code, time.perf_counter() - t0)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if ttft is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return Result(200, time.perf_counter() - t0, ttft, tokens)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return Result(type(exc).__name__, time.perf_counter() - t0)


async def client_loop(http: httpx.AsyncClient, args, index: int, stop_at: float, results: list[Result],
                      clients: int) -> None:
    i = index
    while time.monotonic() < stop_at:
        result = await one_request(http, args, i)
        results.append(result)
        i += clients
        if result.status in (429, 503):  # a polite client backs off briefly, as Retry-After asks
            await asyncio.sleep(args.backoff)


async def run_load(base: str, args, clients: int) -> tuple[list[Result], float]:
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as http:
        t0 = time.monotonic()
        stop_at = t0 + args.seconds
        await asyncio.gather(*(client_loop(http, args, k, stop_at, results, clients) for k in range(clients)))
        return results, time.monotonic() - t0


async def warm_up(base: str, args) -> None:
    """One request first, so the first measured one does not pay for lazy initialisation."""
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as http:
        await one_request(http, args, 0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass
class Summary:
    tokens_per_s: float
    ttft_p95: float
    errors: int


def summarize(results: list[Result], elapsed: float) -> Summary:
    ok = [r for r in results if r.status == 200]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return Summary(sum(r.completion_tokens for r in ok) / elapsed, percentile(ttfts, 95),
                   sum(1 for r in results if r.status != 200))


def report(results: list[Result], elapsed: float, args, clients: int) -> str:
    ok = [r for r in results if r.status == 200]
    latencies = [r.latency for r in ok]
    statuses = Counter(str(r.status) for r in results if r.status != 200)
    tokens = sum(r.completion_tokens for r in ok)
    lines = [
        f"model {args.model}; {clients} client{'s' if clients > 1 else ''} for {args.seconds:g} s; max_tokens "
        f"{args.max_tokens}; temperature {args.temperature:g}; stream {args.stream}; server "
        f"{'batching' if args.batching else 'no batching'}, max-concurrency {args.max_concurrency}, "
        f"max-queue {args.max_queue}, threads {args.threads or 'default'}",
        f"{'requests':<24}{len(results)} in {elapsed:.1f} s ({len(ok)} answered)",
        f"{'answered requests/s':<24}{len(ok) / elapsed:.2f}",
        f"{'completion tokens/s':<24}{tokens / elapsed:.1f} ({tokens / max(1, len(ok)):.1f} tokens per answer)",
        f"{'latency p50 / p95':<24}{percentile(latencies, 50):.3f} s / {percentile(latencies, 95):.3f} s"
        f" (max {max(latencies, default=float('nan')):.3f} s)",
    ]
    if args.stream:
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        lines.append(f"{'first token p50 / p95':<24}{percentile(ttfts, 50):.3f} s / {percentile(ttfts, 95):.3f} s")
    refused = [r.latency for r in results if r.status in (429, 503)]
    lines.append(f"{'errors by status':<24}" + (", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) or "none"))
    if refused:
        lines.append(f"{'refusal latency p95':<24}{percentile(refused, 95) * 1000:.1f} ms")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-qwen3", help="run, preset or path (default: %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long clients keep sending (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--stream", action="store_true", help="stream answers (also reports time to first token)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="server option: generations admitted at once, the batch rows (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=4, help="server option (default: %(default)s)")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                   help="server option: continuous batching (default: on)")
    p.add_argument("--max-batch-size", type=int, help="server option: rows per step (default: max-concurrency)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="with several clients, first measure one client on the same server and print the "
                        "ratios (default: on)")
    p.add_argument("--threads", type=int, help="server option: CPU threads for generation (default: torch's)")
    p.add_argument("--backoff", type=float, default=0.05, help="pause after a 429/503, seconds (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the model to load")
    args = p.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1:
        p.error("--clients, --seconds and --max-tokens must be positive")

    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    phases = [1, args.clients] if args.baseline and args.clients > 1 else [args.clients]
    runs = []
    try:
        wait_ready(base, proc, args.ready_timeout)
        asyncio.run(warm_up(base, args))
        for clients in phases:
            runs.append((clients, *asyncio.run(run_load(base, args, clients))))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"serving load on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs; "
          f"load average before: {load_before}, after: {load})")
    for clients, results, elapsed in runs:
        print()
        print(report(results, elapsed, args, clients))
    if len(runs) == 2:
        one, many = (summarize(results, elapsed) for _, results, elapsed in runs)
        tokens = many.tokens_per_s / one.tokens_per_s if one.tokens_per_s else float("nan")
        ttft = many.ttft_p95 / one.ttft_p95 if args.stream and one.ttft_p95 else float("nan")
        print()
        print(f"{args.clients} clients vs 1 client (same server):")
        print(f"  aggregate completion tokens/s: {many.tokens_per_s:.1f} vs {one.tokens_per_s:.1f} = {tokens:.2f}x "
              f"(target >= 3)")
        if args.stream:
            print(f"  p95 first token: {many.ttft_p95:.3f} s vs {one.ttft_p95:.3f} s = {ttft:.2f}x (target <= 2)")
        else:
            print("  p95 first token: not measured (add --stream)")
        print(f"  errors: {many.errors} with {args.clients} clients, {one.errors} with 1 (target 0)")
        print(f"ratio: {tokens:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
