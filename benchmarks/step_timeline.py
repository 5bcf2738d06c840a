"""Where a throughput workload's wall time goes, step by step.

    PYTHONPATH=. python benchmarks/step_timeline.py --out $OUT [--model qwen3-0.6b]
        [--workloads b,c] [--max-num-seqs N] [--max-num-batched-tokens N] [--smoke]

The e2e workloads (b) 1000 x 128/128 and (c) 1000 x 1024/512 run through `bench`'s
throughput path (vLLM's sampling settings, ignore_eos) with the model runner's dispatch and
collect wrapped. Per step it records the scheduled requests, tokens and decode rows, the
bucket, the host time inside dispatch and collect, and when its collect returned; the
engine's other host stages (schedule, update_from_output, process_outputs) are timed per
call. With asynchronous scheduling and a device-bound run, the time between consecutive
collects is the step's device period, so the steps' periods, grouped by kind (decode-only /
mixed) and by bucket, split the workload's elapsed time; what is left is host time before
the first step and after the last. Results: $OUT/step_timeline_<model>.json (every step) and
a summary printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPECS = {"b": (1000, 128, 128), "c": (1000, 1024, 512)}


def record_steps(llm, run, host_stages: dict) -> tuple[list[dict], float, float]:
    """Run `run()` with the runner's dispatch / collect recorded, and the engine's other
    host stages timed into host_stages (name -> [calls, seconds]); returns (steps in
    collect order, run's start and end on perf_counter)."""
    runner = llm.model_runner
    dispatch, collect = runner.dispatch, runner.collect
    pending: dict[int, dict] = {}
    steps: list[dict] = []

    def dispatching(so):
        t0 = time.perf_counter()
        handle = dispatch(so)
        counts = list(so.num_scheduled_tokens.values())
        ones = sum(c == 1 for c in counts)
        # The bucket dispatch chose: the same call on the same counts.
        key = counts and runner.buckets.select(sum(counts), len(counts), ones == len(counts))
        pending[id(handle)] = {
            "dispatch_start": t0, "dispatch_s": time.perf_counter() - t0,
            "reqs": len(counts), "tokens": so.total_num_scheduled_tokens,
            "ones": ones, "new": len(so.scheduled_new_reqs),
            "bucket": list(key) if key else None,
        }  # fmt: skip
        return handle

    def collecting(handle):
        t0 = time.perf_counter()
        out = collect(handle)
        rec = pending.pop(id(handle), None)
        if rec is not None:
            rec["collected"] = time.perf_counter()
            rec["collect_s"] = rec["collected"] - t0
            steps.append(rec)
        return out

    runner.dispatch, runner.collect = dispatching, collecting
    engine = llm.engine
    stages = [(engine.scheduler, "schedule"), (engine.scheduler, "update_from_output"),
              (engine.output_processor, "process_outputs")]  # fmt: skip
    for obj, name in stages:
        setattr(obj, name, _timed(getattr(obj, name), host_stages.setdefault(name, [0, 0.0])))
    start = time.perf_counter()
    try:
        run()
    finally:
        del runner.dispatch, runner.collect
        for obj, name in stages:
            delattr(obj, name)
    return steps, start, time.perf_counter()


def _timed(fn, row: list):
    """fn, counting its calls and seconds into row = [calls, seconds]."""

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            row[0] += 1
            row[1] += time.perf_counter() - t0

    return timed


def summarize(steps: list[dict], start: float, end: float) -> dict:
    """Periods (collect to collect; the first from the run's start) summed by step kind and
    bucket, with the host time in dispatch and the run's head and tail."""
    if not steps:
        return {"elapsed_s": end - start, "num_steps": 0}
    prev = start
    kinds: dict[str, dict] = {}
    buckets: dict[str, dict] = {}
    for rec in steps:
        rec["period_s"] = rec["collected"] - prev
        prev = rec["collected"]
        kind = "decode" if rec["ones"] == rec["reqs"] else "mixed"
        for table, key in ((kinds, kind), (buckets, str(rec["bucket"]))):
            row = table.setdefault(key, {"steps": 0, "period_s": 0.0, "dispatch_s": 0.0,
                                         "collect_s": 0.0, "tokens": 0, "reqs": 0})  # fmt: skip
            row["steps"] += 1
            row["period_s"] += rec["period_s"]
            row["dispatch_s"] += rec["dispatch_s"]
            row["collect_s"] += rec["collect_s"]
            row["tokens"] += rec["tokens"]
            row["reqs"] += rec["reqs"]
    for row in (*kinds.values(), *buckets.values()):
        row["mean_period_ms"] = 1e3 * row["period_s"] / row["steps"]
        row["mean_dispatch_ms"] = 1e3 * row["dispatch_s"] / row["steps"]
        row["mean_collect_ms"] = 1e3 * row["collect_s"] / row["steps"]
    head, tail = steps[0]["dispatch_start"] - start, end - steps[-1]["collected"]
    for rec in steps:  # seconds from the run's start
        rec["dispatch_start"] -= start
        rec["collected"] -= start
    return {
        "elapsed_s": end - start,
        "num_steps": len(steps),
        "first_dispatch_after_s": head,
        "after_last_collect_s": tail,
        "dispatch_s": sum(r["dispatch_s"] for r in steps),
        "kinds": kinds,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1]["period_s"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--workloads", default="b,c")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    args = ap.parse_args()
    from jaxpaged import bench
    from jaxpaged.llm import LLM

    kw = dict(max_model_len=4608, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    model, scale = args.model, 1.0
    if args.smoke:
        from benchmarks.e2e_gpu import _tiny_config_dir

        model, scale = _tiny_config_dir(args.model), 0.02
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_kv_blocks=200)  # fmt: skip
    t0 = time.perf_counter()
    llm = LLM(model, load_format="dummy", show_progress=False, **kw)
    sched = llm.config.scheduler
    results: dict = {"model": args.model, "startup_s": time.perf_counter() - t0,
                     "max_num_seqs": sched.max_num_seqs,
                     "max_num_batched_tokens": sched.max_num_batched_tokens,
                     "num_kv_blocks": llm.model_runner.num_blocks, "workloads": {}}  # fmt: skip
    path = os.path.join(args.out, f"step_timeline_{args.model}.json")
    for name in args.workloads.split(","):
        num, n_in, n_out = SPECS[name]
        if args.smoke:
            num, n_in, n_out = max(int(num * scale), 4), min(n_in, 64), min(n_out, 32)
        spec = argparse.Namespace(seed=0, num_prompts=num, input_len=n_in, output_len=n_out,
                                  random_range=None)  # fmt: skip
        result: dict = {}
        stages: dict = {}
        steps, start, end = record_steps(
            llm,
            lambda spec=spec, result=result: result.update(bench.run_throughput(llm, spec)),
            stages,
        )
        summary = summarize(steps, start, end)
        summary["host_stages_ms_per_call"] = {
            k: 1e3 * t / max(n, 1) for k, (n, t) in stages.items()
        }
        results["workloads"][name] = {"throughput": result, "summary": summary, "steps": steps}
        print(name, json.dumps({"throughput": result, "summary": summary}, indent=1), flush=True)
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
