"""Does XLA replay the step as CUDA graphs, or re-record them every step?

    PYTHONPATH=. python benchmarks/cuda_graphs.py --out $OUT [--smoke]

XLA:GPU wraps runs of a step's kernels in command buffers (CUDA graphs), but re-records a
graph whenever a buffer it uses moved (command_buffer_thunk.cc, UpdateBufferAllocations).
A fresh input or output array each step moves. One child process per variant (XLA_FLAGS
differ), each with XLA's command-buffer log on (TF_CPP_VMODULE), counting in the timed
phase how often graphs were executed, created or updated:

1. micro: an unrolled 8-layer bf16 MLP at batch 1 (3 matmuls and 2 elementwise ops per
   layer), called 50 times with a fresh input and output each call, or with a donated
   input that is returned (every address stable). Time for the call to return, and wall.
2. engine: an 8-layer (or --layers) Llama-3-8B-shape engine, one greedy stream of 64
   tokens, async scheduling, with and without ModelRunner(stable_buffers=True): the
   executable call's time to return and the wall time per token.
Variants of XLA_FLAGS: default, command buffers off, update mode SKIP_TEMP.
--runs thread: the --full-layers engine with the runner's launcher thread on and off
(JAXPAGED_LAUNCH_THREAD), with and without stable buffers.
--runs points --points B256_ctx192,...: host_overhead.py's decode-only points on the
throughput engine (full depth, the launcher thread on) under the XLA_FLAGS variants of
--flags (default flags and command buffers off unless given); the log lines are counted
apart for each point's engine run and its replay (the same step's calls, same inputs).
Results: $OUT/cuda_graphs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = {
    "default": "",
    "cmdbuf_off": "--xla_gpu_enable_command_buffer=",
    "skip_temp": "--xla_gpu_command_buffer_update_mode=SKIP_TEMP",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
}
MARK = "=== TIMED PHASE ==="


def micro(stable: bool, smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    d, f = (64, 128) if smoke else (4096, 14336)
    keys = jax.random.split(jax.random.key(0), 24)
    ws = [
        (jax.random.normal(keys[3 * i], (d, f), jnp.bfloat16) * 0.01,
         jax.random.normal(keys[3 * i + 1], (d, f), jnp.bfloat16) * 0.01,
         jax.random.normal(keys[3 * i + 2], (f, d), jnp.bfloat16) * 0.01)
        for i in range(8)
    ]  # fmt: skip

    def mlp(ws, x):
        for a, b, c in ws:
            h = jax.nn.silu(x @ a) * (x @ b)
            x = x + h @ c
        return x

    step = jax.jit(mlp, donate_argnums=(1,) if stable else ())
    x = jnp.zeros((1, d), jnp.bfloat16)
    for _ in range(3):
        x = step(ws, x if stable else np.zeros((1, d), np.float32).astype(jnp.bfloat16))
    jax.block_until_ready(x)
    sys.stderr.write(MARK + "\n")
    sys.stderr.flush()
    calls = []
    start = time.perf_counter()
    for _ in range(50):
        c0 = time.perf_counter()
        arg = x if stable else jax.device_put(np.zeros((1, d), jnp.bfloat16))
        x = step(ws, arg)
        calls.append(time.perf_counter() - c0)
    jax.block_until_ready(x)
    wall = time.perf_counter() - start
    return {"call_return_ms": 1e3 * sum(calls[5:]) / 45, "wall_per_call_ms": wall / 50e-3}


def engine(stable: bool, layers: int, smoke: bool) -> dict:
    from benchmarks.dispatch_blocking import one_stream, small_8b_engine

    def mark():
        sys.stderr.write(MARK + "\n")
        sys.stderr.flush()

    return one_stream(small_8b_engine(layers, smoke, stable_buffers=stable), mark)


def points_child(spec: str, smoke: bool) -> dict:
    from benchmarks.e2e_gpu import _tiny_config_dir
    from benchmarks.host_overhead import parse_points, point_stages, throughput_llm

    llm = throughput_llm(_tiny_config_dir("llama3-8b") if smoke else "llama3-8b", smoke)
    res = {}
    for name, (batch, ctx) in parse_points(spec).items():

        def mark(phase: str, name=name) -> None:
            sys.stderr.write(f"{PHASE}{phase} {name}\n")
            sys.stderr.flush()

        res[name] = point_stages(llm, batch, ctx, 16 if smoke else 64, mark=mark)
    return res


PHASE = "=== PHASE "


def phase_logs(stderr: str) -> dict:
    """graph_log's counts for each marked phase (the text up to the next marker)."""
    parts = stderr.split(PHASE)[1:]
    out = {}
    for part in parts:
        name, _, text = part.partition("\n")
        if not name.startswith("end "):
            out[name] = _count(text)
    return out


def _count(text: str) -> dict:
    updates = [float(x) for x in re.findall(r"Updated command buffer in (\d+)", text)]
    sizes = [int(x) for x in re.findall(r"Initialize command buffer.*num_commands=(\d+)",
                                        text)]  # fmt: skip
    return {
        "executed": len(re.findall(r"Execute command buffer", text)),
        "updated": len(updates),
        "update_us_total": sum(updates),
        "initialized": len(sizes),
        "initialized_commands": sum(sizes),
        "updated_allocs": re.findall(r"updated_allocs=(\d+)", text)[:12],
        "updated_num_commands": re.findall(
            r"after \d+ executions since last update; "
            r"num_commands=(\d+)",
            text,
        )[:12],
    }


def graph_log(stderr: str) -> dict:
    """Counts of XLA's command-buffer log lines, in the timed phase and overall."""
    timed = stderr.split(MARK, 1)[1] if MARK in stderr else ""
    return {"timed": _count(timed), "all": _count(stderr)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument(
        "--full-layers",
        type=int,
        default=32,
        help="one engine run at this depth: stable buffers, default flags",
    )
    ap.add_argument("--budget-s", type=float, default=470)
    ap.add_argument("--runs", choices=("probe", "thread", "points"), default="probe")
    ap.add_argument("--points", default="B256_ctx192,B128_ctx512",
                    help="with --runs points: B<batch>_ctx<context>,...")  # fmt: skip
    ap.add_argument("--flags", default="default,cmdbuf_off",
                    help=f"with --runs points: XLA_FLAGS variants, of {sorted(FLAGS)}")  # fmt: skip
    ap.add_argument("--child", nargs=2, metavar=("PART", "STABLE"))
    args = ap.parse_args()
    if args.child:
        part, stable = args.child[0], args.child[1] == "1"
        if part == "micro":
            res = micro(stable, args.smoke)
        elif part.startswith("points:"):
            res = points_child(part.split(":", 1)[1], args.smoke)
        else:
            res = engine(stable, int(part.split(":")[1]), args.smoke)
        print("RESULT " + json.dumps(res), flush=True)
        return
    eng, full = f"engine:{args.layers}", f"engine:{args.full_layers}"
    if args.runs == "thread":  # the launcher thread on/off, at full depth, default flags
        runs = [(full, s, "default", t) for t in (1, 0) for s in (1, 0)]
    elif args.runs == "points":  # the throughput engine as built: stable buffers, thread on
        runs = [(f"points:{args.points}", 1, flags, 1) for flags in args.flags.split(",")]
    else:
        runs = [("micro", 0, "default"), ("micro", 1, "default"), (eng, 0, "default"),
            (eng, 1, "default"), (full, 1, "default"), (eng, 0, "skip_temp"),
            (eng, 1, "skip_temp"), (eng, 1, "cmdbuf_off"), ("micro", 0, "cmdbuf_off"),
            ("micro", 1, "cmdbuf_off"), (eng, 0, "cmdbuf_off")]  # fmt: skip
        runs = [(*r, 0) for r in runs]  # as first run: before the launcher thread existed
    results, start = [], time.perf_counter()
    for part, stable, flags, thread in runs:
        if time.perf_counter() - start > args.budget_s:
            results.append({"part": part, "stable": stable, "flags": flags, "skipped": True})
            continue
        env = dict(os.environ, XLA_FLAGS=FLAGS[flags], TF_CPP_MIN_LOG_LEVEL="0",
                   TF_CPP_VMODULE="command_buffer_thunk=3",
                   JAXPAGED_LAUNCH_THREAD=str(thread))  # fmt: skip
        cmd = [sys.executable, __file__, "--child", part, str(stable)]
        cmd += ["--smoke"] if args.smoke else []
        c0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=400 if part.startswith("points:") else 240)  # fmt: skip
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            out, err = e.stdout or "", (e.stderr or "") + "\nTIMEOUT"
            out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        res = {"part": part, "stable": stable, "flags": flags, "launch_thread": thread,
               "seconds": round(time.perf_counter() - c0, 1)}  # fmt: skip
        res.update(json.loads(line[0][7:]) if line else {"error": err[-1500:]})
        res["graphs"] = graph_log(err)
        if part.startswith("points:"):
            res["graphs"]["phases"] = phase_logs(err)
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(os.path.join(args.out, "cuda_graphs.json"), "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
