"""`jaxpaged bench throughput|latency`, with vLLM's benchmark semantics.

throughput: N requests of random token prompts (fixed or uniform-random lengths), all
            submitted at once, ignore_eos; reports requests/s, total and output tokens/s.
latency:    one batch of B requests, generated end to end `--num-iters` times after a
            warm-up; reports the mean and percentiles of the batch latency, and the
            per-output-token time.
Start-up (weights + every bucket compiled) is timed separately and reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jaxpaged.sampling_params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=["throughput", "latency"])
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="latency mode")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="throughput: input and output lengths uniform in [LO, HI]")  # fmt: skip
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--async-depth", type=int, default=1,
                   help="dispatched steps unread when the next is scheduled")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)


def make_requests(num: int, input_len: int, output_len: int, vocab: int, seed: int,
                  random_range: tuple[int, int] | None = None):  # fmt: skip
    """Random token prompts and their SamplingParams (ignore_eos, exact output lengths)."""
    rng = np.random.default_rng(seed)
    if random_range:
        lo, hi = random_range
        in_lens = rng.integers(lo, hi + 1, num)
        out_lens = rng.integers(lo, hi + 1, num)
    else:
        in_lens, out_lens = np.full(num, input_len), np.full(num, output_len)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in in_lens]
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=int(n), ignore_eos=True)
              for n in out_lens]  # fmt: skip
    return prompts, params


def _build(args):
    from jaxpaged.llm import LLM

    start = time.perf_counter()
    llm = LLM(
        args.model, load_format=args.load_format, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend, seed=args.seed,
        async_scheduling=args.async_scheduling, async_depth=args.async_depth,
    )  # fmt: skip
    return llm, time.perf_counter() - start


def run_throughput(llm, args) -> dict:
    vocab = llm.config.model.vocab_size
    prompts, params = make_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                                    args.seed, args.random_range)  # fmt: skip
    scheduler = llm.engine.scheduler
    preemptions = scheduler.num_preemptions_total
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    preemptions = scheduler.num_preemptions_total - preemptions
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    # Cached tokens the decode steps' attention reads: output j >= 1 of a prompt of n tokens
    # is computed at context n + j.
    outs_in = [(len(o.outputs[0].token_ids), len(p)) for o, p in zip(outs, prompts, strict=True)]
    kv_reads = sum((m - 1) * n + m * (m - 1) // 2 for m, n in outs_in if m)
    return {
        "requests_per_s": len(outs) / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "elapsed_s": elapsed,
        "num_requests": len(outs),
        "num_input_tokens": num_in,
        "num_output_tokens": num_out,
        "decode_kv_token_reads": kv_reads,
        "max_output_tokens": max((m for m, _ in outs_in), default=0),
        "num_preemptions": preemptions,
    }


def run_latency(llm, args) -> dict:
    vocab = llm.config.model.vocab_size
    prompts, params = make_requests(args.batch_size, args.input_len, args.output_len, vocab,
                                    args.seed)  # fmt: skip
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.num_iters):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    times = np.array(times)
    return {
        "batch_size": args.batch_size,
        "mean_latency_s": float(times.mean()),
        "p50_latency_s": float(np.percentile(times, 50)),
        "p99_latency_s": float(np.percentile(times, 99)),
        "per_output_token_ms": float(times.mean() / args.output_len * 1e3),
        "output_tokens_per_s": float(args.batch_size * args.output_len / times.mean()),
    }


def run(args: argparse.Namespace) -> int:
    llm, startup_s = _build(args)
    result = run_throughput(llm, args) if args.mode == "throughput" else run_latency(llm, args)
    result["startup_s"] = startup_s
    result["compile_s"] = llm.compile_seconds
    result["num_buckets"] = llm.model_runner.num_compiled
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            plain = {k: v for k, v in vars(args).items() if not callable(v)}
            json.dump({"args": plain, "result": result}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpaged bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
