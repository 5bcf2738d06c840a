"""Device idle share of steady decode steps, read from the device's own timeline.

    PYTHONPATH=. python benchmarks/device_idle.py --out $OUT [--model llama3-8b] [--smoke]

e2e_gpu.py's idle probe sees host gaps between steps only. A launch-bound step also leaves
the device waiting inside the step, for kernels the host has not launched yet. Here, per
(batch, context) point, a greedy decode run is traced with jax.profiler from its 8th step to
its 40th. The GPU planes' stream events (kernels and copies, from CUPTI) are merged into
busy intervals, and idle = 1 - busy / span, where the span runs from the first event to the
last. XLA turns CUDA graphs off while a profiler runs (command_buffer_thunk.cc), so the
traced kernels are launched one by one; benchmarks/cuda_graphs.py measured the same host
cost both ways.
Results: $OUT/device_idle.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POINTS = {"B1_ctx512": (1, 512), "B32_ctx1024": (32, 1024), "B128_ctx512": (128, 512)}


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


def device_intervals(planes) -> list[tuple[float, float]]:
    """[start, end) in ns of every event on a GPU plane's stream lines. The derived lines
    ("XLA Modules", "XLA Ops", ...) span idle time too and are left out."""
    out = []
    for plane in planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                out += [(e.start_ns, e.start_ns + e.duration_ns) for e in line.events]
    return out


def traced_decode(llm, batch: int, ctx: int, num_out: int, trace_dir: str) -> dict:
    """Decode `batch` greedy streams of context ~ctx; trace steps 8..40; return the idle
    share of the device over the traced span."""
    import jax
    import numpy as np
    from jax.profiler import ProfileData

    from jaxpaged.sampling_params import SamplingParams

    runner = llm.model_runner
    run_step, count = runner._run_step, [0]

    def traced(key, *args):
        count[0] += 1
        if count[0] == 8:
            jax.profiler.start_trace(trace_dir)
        out = run_step(key, *args)
        if count[0] == 40:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
        return out

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, llm.config.model.vocab_size, ctx - num_out // 2).tolist()
               for _ in range(batch)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True)
    runner._run_step = traced
    start = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner._run_step
        if 8 <= count[0] < 40:  # fewer steps than the window: stop the trace here
            jax.profiler.stop_trace()
    wall = time.perf_counter() - start
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": "no trace written", "steps": count[0]}
    planes = ProfileData.from_file(max(files, key=os.path.getmtime)).planes
    busy, span = busy_and_span(device_intervals(planes))
    gpu_lines = {ln.name for p in planes if p.name.startswith("/device:GPU") for ln in p.lines}
    res = {"steps": count[0], "wall_s": wall, "traced_span_ms": span / 1e6,
           "device_busy_ms": busy / 1e6, "gpu_lines": sorted(gpu_lines)[:20]}  # fmt: skip
    if span:
        res["device_idle_fraction"] = 1 - busy / span
        res["ms_per_traced_step"] = span / 1e6 / (min(count[0], 40) - 7)
    else:
        res["note"] = "no GPU stream events (CPU backend?)"
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from jaxpaged.llm import LLM

    kw = dict(max_model_len=4608, max_num_seqs=256, max_num_batched_tokens=2048)
    model, points = args.model, POINTS
    if args.smoke:
        from benchmarks.e2e_gpu import _tiny_config_dir

        model = _tiny_config_dir(args.model)
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_kv_blocks=200)  # fmt: skip
        points = {"B1_ctx64": (1, 64), "B4_ctx64": (4, 64)}
    llm = LLM(model, load_format="dummy", show_progress=False, **kw)
    results = {"model": args.model, "points": {}}
    for name, (batch, ctx) in points.items():
        res = traced_decode(llm, batch, ctx, 64, tempfile.mkdtemp(prefix="trace-"))
        results["points"][name] = res
        print(name, json.dumps(res), flush=True)
    with open(os.path.join(args.out, "device_idle.json"), "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
