"""Where the host's time per engine step goes, and whether dispatch waits for the device.

    PYTHONPATH=. python benchmarks/host_overhead.py --out $OUT [--model llama3-8b] [--smoke]

1. Micro: a jitted step that donates a large buffer, dispatched 20 times in a row; the time
   each call takes to return (async dispatch: microseconds; blocking: the device time).
   Also device_put of 22 small arrays (one step's inputs) against one packed array.
2. Engine: one greedy stream of 128 tokens, async and sync scheduling, with every host
   stage timed per step (schedule, dispatch's input build / device_put / executable call,
   collect's wait, update) and the device-idle share.
3. With --points (e.g. B256_ctx192, workload (b)'s decode steps): the same stage timing on
   the throughput engine (256 seqs / 2048 tokens) for B greedy streams of context ~ctx, the
   period between the starts of full steps (all B streams decoding; the streams start and
   stop staggered, so the first and last decode-only steps carry fewer live rows), and a
   replay: the last full step's executable calls made 32 times back to back with the same
   inputs, so its period is the device's own step time with CUDA graphs on. Step period -
   replay period = what the host path adds. The replay is then made more like the engine
   one step at a time (replay(): two steps' inputs in turn; each result read after the
   next call; the calls on the launcher thread; the engine thread's measured Python per
   step spun after each read), to find which difference costs time. --switch-us / --gc-off
   rerun the points at another GIL interval / with gc disabled. With --points only these
   run (not 1 and 2).
4. With --dump-ops: XLA's optimised HLO of the step is dumped and the top-level
   instructions of its entry computation (each one a kernel launch, a library call or a
   copy for the XLA:GPU runtime) are counted by kind, per step and per layer; the optimised
   largest decode-only forward is saved as $OUT/hlo_decode.tar.gz.
With the runner's launcher thread (the GPU default), "dispatch" is the engine thread's part
(diffs, input build, hand-off); "_stage_inputs" (the transfer) and "executable_call" run on
the launcher thread, and "collect" includes waiting for the call to return.
Results: $OUT/host_overhead.json, and a summary printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import re
import sys
import tarfile
import time
from collections import defaultdict, deque

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


def _timing(fn, label: str, times: dict):
    """fn, with the duration of every call appended to times[label]."""

    def call(*args, **kwargs):
        c0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - c0)

    return call


@contextlib.contextmanager
def timed(obj, name: str, times: dict):
    original = getattr(obj, name)
    setattr(obj, name, _timing(original, name, times))
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


@contextlib.contextmanager
def timed_values(table: dict, label: str, times: dict):
    """Time every call of the callables in `table` (an executable dict) under `label`."""
    original = dict(table)
    table.update({k: _timing(v, label, times) for k, v in original.items()})
    try:
        yield
    finally:
        table.update(original)


# The engine thread's own work per step (host_overhead's stage names), less its waits.
ENGINE_THREAD_STAGES = ("schedule", "dispatch", "update_from_output", "process_outputs")


def replay(runner, args_list, n, lag=None, launcher=False, busy_ms=0.0) -> tuple[float, float]:
    """(period, enqueue time) in ms of n step calls cycling through args_list (_run_step's
    arguments). lag=1: each call's result is read (device_get) once the next call is made,
    as the engine reads a step after dispatching the next; launcher: the calls go to the
    runner's launcher thread, as the engine's do; busy_ms: Python spun after each read, the
    engine thread's own work."""
    import jax

    def call(args):
        if launcher:
            return runner._launch(lambda: runner._run_step(*args))
        return runner._run_step(*args)

    def result(out):
        return out.result() if launcher else out

    outs = []
    c0 = time.perf_counter()
    for i in range(n):
        outs.append(call(args_list[i % len(args_list)]))
        if lag is not None and len(outs) > lag:
            jax.device_get(result(outs[-1 - lag]))
            end = time.perf_counter() + busy_ms * 1e-3
            while time.perf_counter() < end:
                pass
    enqueued = time.perf_counter() - c0
    jax.block_until_ready([result(o) for o in outs])
    return 1e3 * (time.perf_counter() - c0) / n, 1e3 * enqueued / n


def parse_points(spec: str) -> dict[str, tuple[int, int]]:
    """'B256_ctx192,B128_ctx512' -> {name: (batch, context)}."""
    points = {}
    for name in filter(None, spec.split(",")):
        m = re.fullmatch(r"B(\d+)_ctx(\d+)", name)
        if not m:
            raise ValueError(f"bad point {name!r}: expected B<batch>_ctx<context>")
        points[name] = (int(m[1]), int(m[2]))
    return points


def throughput_llm(model: str, smoke: bool):
    """The throughput engine of the --points runs (device_idle.py's: 256 seqs / 2048 tokens)."""
    from jaxpaged.llm import LLM

    kw = dict(max_model_len=4608, max_num_seqs=256, max_num_batched_tokens=2048)
    if smoke:
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_kv_blocks=200)  # fmt: skip
    return LLM(model, load_format="dummy", show_progress=False, **kw)


def point_stages(llm, batch: int, ctx: int, num_out: int = 64, replays: int = 32,
                 mark=None) -> dict:  # fmt: skip
    """Stage times per decode-only step of `batch` streams at context ~ctx, and the replayed
    device period of that step (see the module docstring). mark(phase), if given, is called
    as the engine run ("engine") and the replay ("replay") start and after both ("end")."""
    import jax
    import numpy as np

    from jaxpaged.sampling_params import SamplingParams

    runner, engine = llm.model_runner, llm.engine
    rng = np.random.default_rng(batch * 7919 + ctx)  # prompts of their own: no cache hits
    prompts = [rng.integers(0, llm.config.model.vocab_size, ctx - num_out // 2).tolist()
               for _ in range(batch)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True)
    times, steps, decode_args = defaultdict(list), [], []
    run_step, dispatch = runner._run_step, runner.dispatch
    full = deque()  # per launched step, in launch order: all `batch` streams, one token each

    def counted(so):
        n = so.num_scheduled_tokens
        if n:
            full.append(len(n) == batch and all(v == 1 for v in n.values()))
        return dispatch(so)

    def recorded(key, mode, packed):
        c0 = time.perf_counter()
        out = run_step(key, mode, packed)
        decode = key[2] and key[1] >= batch
        is_full = full.popleft()
        steps.append((c0, decode, is_full))
        if decode:
            times["launcher_call"].append(time.perf_counter() - c0)
        if is_full:
            decode_args[:] = [*decode_args[-1:], (key, mode, packed)]
        return out

    runner.dispatch = counted  # under the stage timing below
    try:
        with contextlib.ExitStack() as stack:
            for obj, name in [(engine.scheduler, "schedule"), (runner, "dispatch"),
                              (runner, "collect"), (jax, "device_get"),
                              (engine.scheduler, "update_from_output"),
                              (engine.output_processor, "process_outputs"),
                              (runner, "_stage_inputs"), (runner, "_head_copy")]:  # fmt: skip
                stack.enter_context(timed(obj, name, times))
            # The launcher's executable calls, by kind (the forward, the sampler).
            for table, label in [
                (runner._compiled, "forward_call"),
                (runner._samplers, "sampler_call"),
            ]:
                stack.enter_context(timed_values(table, label, times))
            runner._run_step = recorded
            if mark is not None:
                mark("engine")
            try:
                llm.generate(prompts, params, use_tqdm=False)
            finally:
                del runner._run_step
    finally:
        del runner.dispatch
    res = {k: {"median_ms": 1e3 * float(np.median(v[len(v) // 4 :])), "n": len(v)}
           for k, v in times.items()}  # fmt: skip
    # Full steps only: the streams start decoding as their prefills end and stop as staggered,
    # so the last decode steps carry fewer live rows (less attention) in the same bucket.
    starts = np.array([c for c, _, is_full in steps if is_full])
    res["full_steps"] = len(starts)
    if len(starts) > 1:
        res["step_period_ms"] = 1e3 * float(np.median(np.diff(starts)))
    decode = np.array([c for c, d, _ in steps if d])  # every decode-only step (earlier runs)
    res["step_period_all_decode_ms"] = 1e3 * float(np.median(np.diff(decode[len(decode) // 4 :])))
    if decode_args:  # the same step, back to back: the device-bound period
        last = decode_args[-1]
        jax.block_until_ready([runner._run_step(*last) for _ in range(2)])
        if mark is not None:
            mark("replay")
        res["replay_period_ms"], res["replay_enqueue_ms"] = replay(runner, [last], replays)
        # Made more like the engine step by step (see replay()): two steps' inputs in turn;
        # each result read after the next call; the calls on the launcher thread; and the
        # engine thread's measured Python work per step spun after each read.
        busy = sum(res[k]["median_ms"] for k in ENGINE_THREAD_STAGES if k in res)
        if "collect" in res and "device_get" in res:  # collect's own work, less its wait
            busy += max(0.0, res["collect"]["median_ms"] - res["device_get"]["median_ms"])
        for name, kw in [
            ("alternate", dict(args_list=decode_args)),
            ("lag1", dict(lag=1)),
            ("lag1_launcher", dict(lag=1, launcher=True)),
            ("lag1_launcher_busy", dict(lag=1, launcher=True, busy_ms=busy)),
        ]:
            kw.setdefault("args_list", [last])
            res[f"replay_{name}_period_ms"] = replay(runner, n=replays, **kw)[0]
        res["replay_busy_ms"] = busy
        serial = []  # one call at a time on an idle device: the launcher's own host cost
        for _ in range(8):
            c0 = time.perf_counter()
            out = runner._run_step(*last)
            serial.append(time.perf_counter() - c0)
            jax.block_until_ready(out)
        res["serial_call_ms"] = 1e3 * float(np.median(serial))
        if mark is not None:
            mark("end")
        # The replays rewrote those blocks' KV: forget them as prefix-cache hits.
        engine.scheduler.reset_prefix_cache()
    return res


def count_entry_ops(text: str) -> dict:
    """Opcode counts of the ENTRY computation of one dumped optimised step module."""
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}\n")]
    counts: dict[str, int] = defaultdict(int)
    for op in re.findall(r"= [^ ]+ ([a-z][a-z0-9-]*)\(", entry):
        counts[op] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dump-ops", action="store_true")
    ap.add_argument("--points", default="", help="e.g. B256_ctx192,B128_ctx512 (see docstring)")
    ap.add_argument("--switch-us", type=float, default=0,
                    help="with --points: run them again at this GIL switch interval")  # fmt: skip
    ap.add_argument("--gc-off", action="store_true",
                    help="with --points: run them again with gc disabled")  # fmt: skip
    args = ap.parse_args()
    try:
        points = parse_points(args.points)
    except ValueError as e:
        ap.error(str(e))
    dump_dir = None
    if args.dump_ops:  # before jax initialises its backend
        dump_dir = "/tmp/jaxpaged_hlo_dump"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                                   " --xla_dump_hlo_module_re=.*_forward_fn.*")  # fmt: skip
    from jaxpaged.llm import LLM

    res: dict = {}
    model = args.model
    if args.smoke:
        from benchmarks.e2e_gpu import _tiny_config_dir

        model = _tiny_config_dir(args.model)
    if points:
        llm = throughput_llm(model, args.smoke)
        res["points"] = {}
        default = sys.getswitchinterval()
        runs = [(default, True, "")]
        if args.switch_us:
            runs.append((args.switch_us * 1e-6, True, f"@switch{args.switch_us:g}us"))
        if args.gc_off:
            runs.append((default, False, "@gc_off"))
        for interval, gc_on, suffix in runs:
            sys.setswitchinterval(interval)
            gc.enable() if gc_on else gc.disable()
            for name, (batch, ctx) in points.items():
                label = name + suffix
                res["points"][label] = point_stages(llm, batch, ctx, 16 if args.smoke else 64)
                print(label, json.dumps(res["points"][label]), flush=True)
        sys.setswitchinterval(default)
        gc.enable()
    else:
        res["micro"] = micro(args.smoke)
        print("micro", json.dumps(res["micro"]), flush=True)
        kw = dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=64)
        if args.smoke:
            kw = dict(kw, num_kv_blocks=200)
        llm = LLM(model, load_format="dummy", show_progress=False, **kw)
        n = 16 if args.smoke else 128
        for mode in ("async", "sync"):
            res[mode] = engine_stages(llm, mode == "async", n)
            print(mode, json.dumps(res[mode]), flush=True)
    if dump_dir:
        # Each dumped forward read once: its opcode counts, and whether it is a decode-only
        # forward of T = max_num_seqs tokens (the largest of those is kept: all of them are
        # over what a run can bring back).
        res["entry_ops"], res["num_layers"] = {}, llm.config.model.num_layers
        t, decode = llm.config.scheduler.max_num_seqs, []
        pattern = os.path.join(dump_dir, "*_forward_fn*after_optimizations.txt")
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                text = f.read()
            counts = res["entry_ops"][os.path.basename(path)] = count_entry_ops(text)
            print(os.path.basename(path), sum(counts.values()), "top-level ops:",
                  json.dumps(counts), flush=True)  # fmt: skip
            if f"s32[{t}]" in text and not any(f"s32[{n}]" in text for n in (2048, 4096)):
                decode.append(path)
        if decode:
            with tarfile.open(os.path.join(args.out, "hlo_decode.tar.gz"), "w:gz") as tar:
                tar.add(max(decode, key=os.path.getsize), arcname="decode_forward.txt")
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
