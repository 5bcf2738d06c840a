"""Device idle share of steady decode steps, read from the device's own timeline.

    PYTHONPATH=. python benchmarks/device_idle.py --out $OUT [--model llama3-8b] [--smoke]
        [--points B1_ctx512,B128_ctx512,P256_in128] [--no-xla]
        [--max-num-seqs 256] [--max-num-batched-tokens 2048]

e2e_gpu.py's idle probe sees host gaps between steps only. A launch-bound step also leaves
the device waiting inside the step, for kernels the host has not launched yet. Here, per
(batch, context) point, a greedy decode run is traced with jax.profiler for 32 steps, from
the 8th after its prefill. The GPU planes' stream events (kernels and copies, from CUPTI)
are merged into busy intervals, and idle = 1 - busy / span, where the span runs from the
first event to the last. XLA turns CUDA graphs off while a profiler runs
(command_buffer_thunk.cc), so the traced kernels are launched one by one; a second,
untraced run of the same point times the steps with graphs on (`graphs_on`).
The same traces also give where the device time goes: every stream event's kernel name,
summed per step (`kernels`), and the sums by kind (`kinds`: matmul, attention, ...). The plain
unrolled-XLA step of benchmarks/xla_decode_baseline.py is traced at the same points, so the
two steps' kernels can be set side by side. Prefill points (P256_in128) trace the
chunked-prefill steps of a batch of prompts submitted at once instead (no XLA baseline).
Results: $OUT/device_idle.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POINTS = {"B1_ctx512": (1, 512), "B32_ctx1024": (32, 1024), "B128_ctx512": (128, 512),
          "B256_ctx192": (256, 192),  # (b)'s decode steps at max_num_seqs 256
          "B1000_ctx192": (1000, 192)}  # (b)'s decode steps at max_num_seqs 1024  # fmt: skip
# Prefill points, "P<prompts>_in<len>": chunked-prefill steps (traced_prefill).
PREFILL_POINTS = {"P256_in128": (256, 128), "P1000_in128": (1000, 128)}


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(time covered by the union of [start, end) intervals, last end - first start)."""
    if not intervals:
        return 0.0, 0.0
    intervals = sorted(intervals)
    busy, (cur_start, cur_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy, max(end for _, end in intervals) - intervals[0][0]


def _stream_events(planes):
    """Every event on a GPU plane's stream lines (kernels and copies). The derived lines
    ("XLA Modules", "XLA Ops", ...) span idle time too and are left out."""
    for plane in planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    yield from line.events


def device_intervals(planes) -> list[tuple[float, float]]:
    """[start, end) in ns of every GPU stream event."""
    return [(e.start_ns, e.start_ns + e.duration_ns) for e in _stream_events(planes)]


def _totals(keyed_events) -> dict:
    """key -> [count, total duration ns] over (key, event) pairs."""
    table: dict = {}
    for key, e in keyed_events:
        row = table.setdefault(key, [0, 0.0])
        row[0] += 1
        row[1] += e.duration_ns
    return table


KINDS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv", "matmul", "dot")),
    ("attention", ("mosaic", "attention", "paged", "decode", "ragged")),
    ("scatter", ("scatter", "dynamic_update", "dynamic-update")),
    ("copy", ("memcpy", "memset", "copy")),
    ("reduce", ("reduce", "argmax", "sort", "topk")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_table(planes, steps: int, top: int = 40) -> dict:
    """Per kernel name on the GPU stream lines: launches and device microseconds per step,
    the `top` largest, and the totals per kind."""
    table = _totals((e.name, e) for e in _stream_events(planes))
    steps = max(steps, 1)
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    kinds: dict[str, dict] = {}
    for name, (n, ns) in rows:
        k = kinds.setdefault(kind_of(name), {"launches_per_step": 0.0, "us_per_step": 0.0})
        k["launches_per_step"] += n / steps
        k["us_per_step"] += ns / 1e3 / steps
    return {
        "launches_per_step": sum(n for n, _ in table.values()) / steps,
        "device_us_per_step": sum(ns for _, ns in table.values()) / 1e3 / steps,
        "kinds": kinds,
        "kernels": [{"name": name[:160], "kind": kind_of(name), "launches_per_step": n / steps,
                     "us_per_step": ns / 1e3 / steps} for name, (n, ns) in rows[:top]],
    }  # fmt: skip


def host_table(planes, steps: int, top: int = 60) -> list[dict]:
    """Per (host thread, event name): count and milliseconds per step, the `top` largest.
    Host events nest (an executable's run holds its thunks, a thunk its driver calls), so
    totals overlap; they show where a thread's time goes, not a partition of it."""
    table = _totals(((ln.name, e.name), e) for p in planes if p.name.startswith("/host")
                    for ln in p.lines for e in ln.events)  # fmt: skip
    steps = max(steps, 1)
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"thread": t[:60], "name": n[:160], "count_per_step": c / steps,
             "ms_per_step": ns / 1e6 / steps} for (t, n), (c, ns) in rows]  # fmt: skip


def _read_trace(trace_dir: str):
    """The newest trace's planes as plain namespaces (ProfileData's planes, lines and events
    are one-pass iterators, and the trace is read twice)."""
    from types import SimpleNamespace as NS

    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return None
    data = ProfileData.from_file(max(files, key=os.path.getmtime))
    ev = lambda e: NS(name=e.name, start_ns=e.start_ns, duration_ns=e.duration_ns)  # noqa: E731
    return [NS(name=p.name, lines=[NS(name=ln.name, events=[ev(e) for e in ln.events])
                                   for ln in p.lines]) for p in data.planes]  # fmt: skip


def _summary(planes, steps: int) -> dict:
    busy, span = busy_and_span(device_intervals(planes))
    if not span:
        return {"note": "no GPU stream events (CPU backend?)"}
    return {"traced_span_ms": span / 1e6, "device_busy_ms": busy / 1e6,
            "device_idle_fraction": 1 - busy / span, "ms_per_traced_step": span / 1e6 / steps,
            **kernel_table(planes, steps), "host": host_table(planes, steps)}  # fmt: skip


def traced_xla(model: str, batch: int, ctx: int, trace_dir: str, smoke: bool) -> dict:
    """The plain unrolled-XLA decode step (xla_decode_baseline) traced for 32 steps after 8."""
    import jax
    import jax.numpy as jnp

    from benchmarks.xla_decode_baseline import _params, make_step, model_config

    c = model_config(model, smoke)
    dtype = jnp.bfloat16
    params = _params(c, jax.random.key(0), dtype)
    step = make_step(c)
    shape = (batch, ctx, c.num_kv_heads, c.head_dim)
    caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers)]
    tokens = jnp.zeros((batch,), jnp.int32)
    pos = jnp.full((batch,), ctx - 1, jnp.int32)
    for _ in range(8):
        tokens, caches = step(params, caches, tokens, pos)
    jax.block_until_ready(tokens)
    jax.profiler.start_trace(trace_dir)
    for _ in range(32):
        tokens, caches = step(params, caches, tokens, pos)
    jax.block_until_ready(tokens)
    jax.profiler.stop_trace()
    planes = _read_trace(trace_dir)
    return _summary(planes, 32) if planes else {"error": "no trace written"}


def traced_decode(llm, batch: int, ctx: int, num_out: int, trace_dir: str | None) -> dict:
    """Decode `batch` greedy streams of context ~ctx and look at 32 steps, from the 8th after
    the prefill steps. With a trace_dir, trace them: the device's idle share over the traced
    span and its kernels. Without, time them with CUDA graphs on: the host time inside each
    step's call (its launch) and the time between the starts of consecutive steps."""
    prompt_len = ctx - num_out // 2
    first = 8 + -(-batch * prompt_len // llm.config.scheduler.max_num_batched_tokens)
    return traced_steps(llm, batch, prompt_len, num_out, first, 32, trace_dir)


def traced_prefill(llm, batch: int, prompt_len: int, trace_dir: str | None) -> dict:
    """As traced_decode, for the chunked-prefill steps of `batch` prompts submitted at once
    (workload (b)'s first wave): 8 steps from the 3rd, each a full max_num_batched_tokens
    step of prompt chunks with the finished prompts' first decodes."""
    return traced_steps(llm, batch, prompt_len, 4, 3, 8, trace_dir)


def traced_steps(llm, batch, prompt_len, num_out, first, num_steps, trace_dir) -> dict:
    """Generate from `batch` random prompts and trace (or time) steps first..first+n-1."""
    import jax
    import numpy as np

    from jaxpaged.sampling_params import SamplingParams

    runner = llm.model_runner
    run_step, count, starts, calls, keys = runner._run_step, [0], [], [], []
    last = first + num_steps - 1

    def traced(key, *args):
        count[0] += 1
        if count[0] == first and trace_dir:
            jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        out = run_step(key, *args)
        if first <= count[0] <= last:
            starts.append(t0)
            calls.append(time.perf_counter() - t0)
            keys.append(list(key))
        if count[0] == last and trace_dir:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
        return out

    rng = np.random.default_rng(0 if trace_dir else 1)  # untraced: prompts not yet cached
    prompts = [rng.integers(0, llm.config.model.vocab_size, prompt_len).tolist()
               for _ in range(batch)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True)
    runner._run_step = traced
    start = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner._run_step
        if trace_dir and first <= count[0] < last:  # fewer steps than the window
            jax.profiler.stop_trace()
    res = {"steps": count[0], "wall_s": time.perf_counter() - start, "buckets": keys}
    if not trace_dir:
        gaps = np.diff(starts) * 1e3
        med = lambda xs: float(np.median(xs)) if len(xs) else None  # noqa: E731
        return {**res, "call_ms_median": med(np.array(calls) * 1e3),
                "step_start_to_start_ms_median": med(gaps)}  # fmt: skip
    planes = _read_trace(trace_dir)
    if planes is None:
        return {"error": "no trace written", **res}
    return {**res, **_summary(planes, min(count[0], last) - first + 1)}


def _xla_points(model: str, points: dict, smoke: bool) -> dict:
    """Every point's XLA trace, in a child process: this process's engine holds the GPU's
    memory in its KV pool, and the child's memory is freed when it exits."""
    cmd = [sys.executable, os.path.abspath(__file__), "--xla-child", "--model", model,
           "--points", ",".join(points)] + (["--smoke"] if smoke else [])  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--points", default="", help="comma-separated subset of the points")
    ap.add_argument("--no-xla", action="store_true", help="skip tracing the plain XLA step")
    ap.add_argument("--xla-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = ap.parse_args()
    points = {"B1_ctx64": (1, 64), "B4_ctx64": (4, 64)} if args.smoke else POINTS
    prefill = {"P8_in32": (8, 32)} if args.smoke else PREFILL_POINTS
    if args.points:
        wanted = args.points.split(",")
        unknown = [k for k in wanted if k not in points and k not in prefill]
        if unknown:
            ap.error(f"unknown points {unknown}; known: {list(points) + list(prefill)}")
        points = {k: points[k] for k in wanted if k in points}
        prefill = {k: prefill[k] for k in wanted if k in prefill}
    if args.xla_child:
        res = {name: traced_xla(args.model, b, ctx, tempfile.mkdtemp(prefix="trace-xla-"),
                                args.smoke) for name, (b, ctx) in points.items()}  # fmt: skip
        print("RESULT " + json.dumps(res))
        return
    path = os.path.join(args.out, "device_idle.json")
    results: dict = {"model": args.model, "points": {}}

    def save() -> None:  # after every stage: a run cut short keeps what it measured
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2)

    if not args.no_xla and points:  # the XLA step has no prefill points
        results["xla"] = _xla_points(args.model, points, args.smoke)
        print("xla", json.dumps(results["xla"])[:2000], flush=True)
        save()
    from jaxpaged.llm import LLM

    kw = dict(max_model_len=4608, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    model = args.model
    if args.smoke:
        from benchmarks.e2e_gpu import _tiny_config_dir

        model = _tiny_config_dir(args.model)
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_kv_blocks=200)  # fmt: skip
    start = time.perf_counter()
    llm = LLM(model, load_format="dummy", show_progress=False, **kw)
    results["startup_s"] = time.perf_counter() - start
    for name, (batch, ctx) in points.items():
        res = traced_decode(llm, batch, ctx, 64, tempfile.mkdtemp(prefix="trace-"))
        res["graphs_on"] = traced_decode(llm, batch, ctx, 64, None)
        results["points"][name] = res
        print(name, json.dumps(res)[:2000], flush=True)
        save()
    for name, (batch, prompt_len) in prefill.items():
        res = traced_prefill(llm, batch, prompt_len, tempfile.mkdtemp(prefix="trace-"))
        res["graphs_on"] = traced_prefill(llm, batch, prompt_len, None)
        results["points"][name] = res
        print(name, json.dumps(res)[:2000], flush=True)
        save()


if __name__ == "__main__":
    main()
