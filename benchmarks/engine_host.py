"""The engine's own host work per step at full batch, without a device (runs on any CPU).

    PYTHONPATH=. python benchmarks/engine_host.py [--batch 256] [--rounds 5] [--out DIR]
        [--max-num-seqs 256] [--max-num-batched-tokens 2048]

The real Engine, Scheduler, KVCacheManager and OutputProcessor, async scheduling at depth 1,
driven by the tests' scripted model runner (tests/engine/test_engine.py: it tracks tokens
from the diffs and samples a fixed script, so it does no device work). Each round submits
`batch` prompts of 160 tokens with 64 greedy output tokens (ignore_eos, no detokenizer: the
dummy-weight benchmarks' setting) on a 256-seq / 2048-token engine (or the sizes given) and
times every call of schedule, update_from_output and process_outputs; the medians are over
the steps in which all `batch` requests are running. Results: a line per stage (one median
per round) and $OUT/engine_host.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = [("scheduler", "schedule"), ("scheduler", "update_from_output"),
          ("output_processor", "process_outputs")]  # fmt: skip


def run(batch: int, rounds: int, max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048) -> dict[str, list[float]]:  # fmt: skip
    from jaxpaged.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from jaxpaged.engine.engine import Engine
    from jaxpaged.sampling_params import SamplingParams
    from tests.engine.test_engine import FakeModelRunner

    model = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=8, intermediate_size=16,
                        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                        eos_token_ids=(999,))  # fmt: skip
    config = EngineConfig(
        model=model,
        cache=CacheConfig(block_size=16, num_blocks=max(8000, 16 * max_num_seqs)),
        scheduler=SchedulerConfig(
            max_model_len=512,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            async_scheduling=True,
            async_depth=1,
        ),  # fmt: skip
    )
    engine = Engine(config, FakeModelRunner(lambda r, i: (7 * i + 3) % 900, 1000), None, seed=0)
    times: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for owner, name in STAGES:
        obj = getattr(engine, owner)
        fn = getattr(obj, name)

        def timed(*args, fn=fn, name=name, **kwargs):
            c0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append((time.perf_counter() - c0, len(engine.scheduler.running)))
            return out

        setattr(obj, name, timed)
    params = SamplingParams(max_tokens=64, ignore_eos=True, detokenize=False)
    res: dict[str, list[float]] = defaultdict(list)
    for rnd in range(rounds):
        times.clear()
        for i in range(batch):
            prompt = [(31 * i + j + rnd) % 900 for j in range(160)]  # no prefix-cache hits
            engine.add_request(f"r{rnd}_{i}", None, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        for name, vals in times.items():
            full = [t for t, n in vals if n == batch]
            res[name].append(1e3 * statistics.median(full))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args.batch, args.rounds, args.max_num_seqs, args.max_num_batched_tokens)
    for name, vals in res.items():
        print(f"{name:20s} ms/step:", " ".join(f"{v:.3f}" for v in vals))
    if args.out:
        with open(os.path.join(args.out, "engine_host.json"), "w") as f:
            json.dump({"batch": args.batch, "median_ms_per_round": res}, f, indent=2)


if __name__ == "__main__":
    main()
