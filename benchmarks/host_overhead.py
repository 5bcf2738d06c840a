"""Where the host's time per engine step goes, and whether dispatch waits for the device.

    PYTHONPATH=. python benchmarks/host_overhead.py --out $OUT [--model llama3-8b] [--smoke]

1. Micro: a jitted step that donates a large buffer, dispatched 20 times in a row; the time
   each call takes to return (async dispatch: microseconds; blocking: the device time).
   Also device_put of 22 small arrays (one step's inputs) against one packed array.
2. Engine: one greedy stream of 128 tokens, async and sync scheduling, with every host
   stage timed per step (schedule, dispatch's input build / device_put / executable call,
   collect's wait, update) and the device-idle share.
3. With --dump-ops: XLA's optimised HLO of the step is dumped and the top-level
   instructions of its entry computation (each one a kernel launch, a library call or a
   copy for the XLA:GPU runtime) are counted by kind, per step and per layer.
With the runner's launcher thread (the GPU default), "dispatch" is the engine thread's part
(diffs, input build, hand-off); "_stage_inputs" (the transfer) and "executable_call" run on
the launcher thread, and "collect" includes waiting for the call to return.
Results: $OUT/host_overhead.json, and a summary printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def micro(smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 1 << (20 if smoke else 28)  # 512 MiB of bf16: ~0.3 ms of HBM traffic per pass
    x = jnp.zeros((n,), jnp.bfloat16)
    step = jax.jit(lambda a, t: (a + t.astype(a.dtype), t + 1), donate_argnums=(0,))
    t = jnp.int32(0)
    x, t = step(x, t)
    jax.block_until_ready(x)
    calls = []
    start = time.perf_counter()
    for _ in range(20):
        c0 = time.perf_counter()
        x, t = step(x, t)
        calls.append(time.perf_counter() - c0)
    dispatched = time.perf_counter() - start
    jax.block_until_ready(x)
    total = time.perf_counter() - start
    arrays = [np.zeros(64, np.int32) for _ in range(22)]
    jax.block_until_ready(jax.device_put(arrays))
    c0 = time.perf_counter()
    for _ in range(50):
        jax.device_put(arrays)
    put22 = (time.perf_counter() - c0) / 50
    packed = np.zeros(22 * 64, np.int32)
    c0 = time.perf_counter()
    for _ in range(50):
        jax.device_put(packed)
    put1 = (time.perf_counter() - c0) / 50
    return {"donated_call_ms": [c * 1e3 for c in calls], "dispatch_20_ms": dispatched * 1e3,
            "run_20_ms": total * 1e3, "device_put_22_arrays_ms": put22 * 1e3,
            "device_put_1_array_ms": put1 * 1e3}  # fmt: skip


@contextlib.contextmanager
def timed(obj, name: str, times: dict):
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        c0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - c0)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


def engine_stages(llm, async_on: bool, num_tokens: int) -> dict:
    from benchmarks.e2e_gpu import _idle_fraction, _idle_probe, _set_async
    from jaxpaged.sampling_params import SamplingParams

    _set_async(llm, async_on)
    runner, engine = llm.model_runner, llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    llm.generate([[1] * 100], params, use_tqdm=False)  # warm-up
    times = defaultdict(list)
    with contextlib.ExitStack() as stack:
        for obj, name in [(engine.scheduler, "schedule"), (runner, "dispatch"),
                          (runner, "collect"), (runner, "_stage_inputs"), (engine, "_update"),
                          (runner.input_batch, "prepare")]:  # fmt: skip
            stack.enter_context(timed(obj, name, times))
        marks = stack.enter_context(_idle_probe(llm))
        calls = defaultdict(list)

        def timing(run_step):
            def call(*args):
                c0 = time.perf_counter()
                out = run_step(*args)
                calls["executable_call"].append(time.perf_counter() - c0)
                return out

            return call

        # The step's calls: staging, forward, sampler, copy (ModelRunner._run_step).
        runner._run_step = timing(runner._run_step)
        c0 = time.perf_counter()
        llm.generate([[1] * 100], params, use_tqdm=False)
        wall = time.perf_counter() - c0
    times.update(calls)
    res = {k: {"mean_ms": 1e3 * sum(v) / len(v), "n": len(v)} for k, v in times.items()}
    res["wall_per_token_ms"] = wall / num_tokens * 1e3
    res["device_idle_fraction"] = _idle_fraction(marks)
    _set_async(llm, True)
    return res


def count_entry_ops(dump_dir: str) -> dict:
    """Opcode counts of the ENTRY computation of each dumped optimised step module."""
    import glob
    import re

    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*_forward_fn*after_optimizations.txt"))):
        text = open(path).read()
        entry = text[text.index("\nENTRY ") :]
        entry = entry[: entry.index("\n}\n")]
        ops = re.findall(r"= [^ ]+ ([a-z][a-z0-9-]*)\(", entry)
        counts: dict[str, int] = defaultdict(int)
        for op in ops:
            counts[op] += 1
        out[os.path.basename(path)] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dump-ops", action="store_true")
    args = ap.parse_args()
    dump_dir = None
    if args.dump_ops:  # before jax initialises its backend
        dump_dir = "/tmp/jaxpaged_hlo_dump"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                                   " --xla_dump_hlo_module_re=.*_forward_fn.*")  # fmt: skip
    from jaxpaged.llm import LLM

    res = {"micro": micro(args.smoke)}
    print("micro", json.dumps(res["micro"]), flush=True)
    model, kw = args.model, dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=64)
    if args.smoke:
        from benchmarks.e2e_gpu import _tiny_config_dir

        model, kw = _tiny_config_dir(args.model), dict(kw, num_kv_blocks=200)
    llm = LLM(model, load_format="dummy", show_progress=False, **kw)
    n = 16 if args.smoke else 128
    for mode in ("async", "sync"):
        res[mode] = engine_stages(llm, mode == "async", n)
        print(mode, json.dumps(res[mode]), flush=True)
    if dump_dir:
        res["entry_ops"] = count_entry_ops(dump_dir)
        res["num_layers"] = llm.config.model.num_layers
        for name, counts in res["entry_ops"].items():
            print(name, sum(counts.values()), "top-level ops:", json.dumps(counts), flush=True)
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
