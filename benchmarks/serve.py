"""Serving load generator for jaxpaged or any OpenAI-compatible server (loopback only).

For each concurrency level, max(--num-prompts, concurrency) streaming /v1/completions
requests are sent with at most `concurrency` in flight, each with ignore_eos and a fixed
max_tokens so that every request generates exactly that many tokens. Reported: request
throughput, output tokens/s, and TTFT and inter-token latency percentiles measured at the
client from SSE chunk arrival times. Bounded in count (--num-prompts) and time
(--max-seconds per level).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --model NAME \
        --concurrency 1 5 10 20 64 --num-prompts 64 --max-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a paged KV cache works in an inference server.",
    "List five facts about the Moon.",
    "What is the capital of France, and why is it famous?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of a heist movie in three sentences.",
    "Why is the sky blue? Answer briefly.",
]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def check_loopback(base_url: str) -> None:
    """Refuses anything but loopback: this tool must never load someone else's server."""
    host = urlparse(base_url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        addrs = set()
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise SystemExit(f"refusing non-loopback host {host!r} ({sorted(addrs)})")


async def one_request(client: httpx.AsyncClient, args, prompt: str) -> RequestResult:
    body = {
        "model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
        "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    last, result = None, RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(False, error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except (httpx.HTTPError, OSError) as exc:
        return RequestResult(False, error=repr(exc))
    result.latency = time.perf_counter() - start
    result.ok = last is not None
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def run_level(args, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, headers=headers,
                                 timeout=args.max_seconds) as client:  # fmt: skip

        async def guarded(i: int) -> RequestResult:
            async with sem:
                return await one_request(client, args, PROMPTS[i % len(PROMPTS)])

        start = time.perf_counter()
        # At least one request per slot, so a level really reaches its concurrency.
        num_requests = max(args.num_prompts, concurrency)
        tasks = [asyncio.create_task(guarded(i)) for i in range(num_requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in pending:
            task.cancel()
        elapsed = time.perf_counter() - start
    results = [t.result() for t in done]
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok) + len(pending),
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * pct(ttfts, 50),
        "ttft_p99_ms": 1000 * pct(ttfts, 99),
        "itl_p50_ms": 1000 * pct(itls, 50),
        "itl_p99_ms": 1000 * pct(itls, 99),
        "mean_latency_s": statistics.fmean(r.latency for r in ok) if ok else float("nan"),
    }


def print_table(rows: list[dict]) -> None:
    cols = ["concurrency", "completed", "failed", "request_throughput", "output_tokens_per_s",
            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (default: the first served)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 5, 10, 20, 64])
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time cap per level")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.num_prompts > 10_000:
        raise SystemExit("--num-prompts is capped at 10000")
    check_loopback(args.base_url)
    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(args.base_url + "/v1/models", timeout=30, headers=headers)
        args.model = models.json()["data"][0]["id"]
    rows = []
    for concurrency in args.concurrency:
        row = asyncio.run(run_level(args, concurrency))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
