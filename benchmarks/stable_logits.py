"""Does the stable logits buffer stop XLA updating the step's CUDA graphs, and what does that
change for the host-bound Qwen3-0.6B steps?

    PYTHONPATH=. python benchmarks/stable_logits.py --out $OUT [--model qwen3-0.6b]
        [--variants on,off,cmdbuf_off] [--smoke]

One child process per variant, each with XLA's command-buffer log on (TF_CPP_VMODULE):
  on          stable buffers with the persistent logits buffer (JAXPAGED_STABLE_LOGITS=1)
  off         stable buffers, a fresh logits array each step (JAXPAGED_STABLE_LOGITS=0)
  cmdbuf_off  as `on`, with XLA's command buffers off (every kernel launched on its own)
Each builds the engine at its default sizes (dummy weights, max_model_len 4608), then runs
workload (b) (1000 x 128 / 128) twice (other prompts the second time) and e2e_gpu's steady
decode-step periods at B1_ctx512 and B1000_ctx192. Per phase it counts the graph executions,
updates and their host time from the log. Results: $OUT/stable_logits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cuda_graphs import FLAGS, PHASE, phase_logs  # noqa: E402

VARIANTS = {"on": ("1", "default"), "off": ("0", "default"), "cmdbuf_off": ("1", "cmdbuf_off")}
POINTS = {"B1_ctx512": (1, 512), "B1000_ctx192": (1000, 192)}


def child(model: str, smoke: bool) -> dict:
    from benchmarks.e2e_gpu import _decode_steps, _tiny_config_dir
    from jaxpaged import bench
    from jaxpaged.llm import LLM

    def mark(phase: str) -> None:
        sys.stderr.write(f"{PHASE}{phase}\n")
        sys.stderr.flush()

    kw = dict(max_model_len=4608)
    points, n_req = POINTS, 1000
    if smoke:
        model = _tiny_config_dir(model)
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=200)
        points, n_req = {"B1_ctx64": (1, 64), "B4_ctx64": (4, 64)}, 20
    start = time.perf_counter()
    llm = LLM(model, load_format="dummy", show_progress=False, **kw)
    runner = llm.model_runner
    res = {"startup_s": time.perf_counter() - start, "stable_logits": runner.stable_logits,
           "stable_buffers": runner.stable_buffers}  # fmt: skip
    for seed in (0, 1):
        spec = argparse.Namespace(num_prompts=n_req, input_len=128 if not smoke else 16,
                                  output_len=128 if not smoke else 8, random_range=None,
                                  seed=seed)  # fmt: skip
        mark(f"b_seed{seed}")
        res[f"b_seed{seed}"] = bench.run_throughput(llm, spec)
    for name, point in points.items():
        mark(name)
        res.update(_decode_steps(llm, {name: point}, 16 if smoke else 64))
    mark("end of run")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--variants", default="on,off,cmdbuf_off")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.smoke)), flush=True)
        return
    command = "PYTHONPATH=. python3 benchmarks/stable_logits.py " + " ".join(sys.argv[1:])
    results = {"command": command.replace(args.out, "$OUT"), "runs": {}}
    for variant in args.variants.split(","):
        stable, flags = VARIANTS[variant]
        env = dict(os.environ, JAXPAGED_STABLE_LOGITS=stable, XLA_FLAGS=FLAGS[flags],
                   TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="command_buffer_thunk=3",
                   JAXPAGED_COMPILATION_CACHE="0")  # fmt: skip
        cmd = [sys.executable, __file__, "--child", "--model", args.model]
        cmd += ["--smoke"] if args.smoke else []
        c0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        res = json.loads(line[0][7:]) if line else {"error": proc.stderr[-2000:]}
        res["seconds"] = round(time.perf_counter() - c0, 1)
        res["graphs"] = phase_logs(proc.stderr)
        results["runs"][variant] = res
        summary = {k: res.get(k, {}).get("output_tokens_per_s") for k in ("b_seed0", "b_seed1")}
        summary.update({p: res.get(p, {}).get("ms_per_step") for p in POINTS})
        print(variant, res["seconds"], "s:", summary, flush=True)
        for phase, counts in res["graphs"].items():
            print(f"  {phase}: executed {counts['executed']}, updated {counts['updated']} "
                  f"({counts['update_us_total'] / 1e3:.1f} ms)", flush=True)  # fmt: skip
        with open(os.path.join(args.out, "stable_logits.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
