"""The same throughput workload with two source trees, alternating, on one machine.

    PYTHONPATH=. python benchmarks/ab_trees.py --out $OUT --tree old=ab_old --tree new=. \\
        [--order old,new,old,new] [--model qwen3-0.6b] [--workload b]

Each run is a child process whose working directory and PYTHONPATH are that tree (a
directory holding every top-level package the engine imports, e.g. `git archive <commit>
jaxpaged converters pallas_kernels | tar -x -C ab_old`): it builds the throughput engine
(256 seqs / 2048 tokens / max_model_len 4608, dummy weights) and runs the workload twice
with jaxpaged.bench.run_throughput, with seeds 0 and 1 (other prompts, so the second run
has no prefix-cache hits), keeping both figures (the first includes any first-use cost,
such as each executable's first CUDA-graph recording). The trees share the persistent
compilation cache, so only the first run compiles. Workloads: e2e_gpu.py's (b) 1000 x
128/128 and (c) 1000 x 1024/512.
Results: $OUT/ab_trees.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOADS = {"b": (1000, 128, 128), "c": (1000, 1024, 512)}

CHILD = """
import argparse, json, time
from jaxpaged import bench
from jaxpaged.llm import LLM
c0 = time.perf_counter()
llm = LLM({model!r}, load_format="dummy", show_progress=False, max_model_len=4608,
          max_num_seqs=256, max_num_batched_tokens=2048)
start = time.perf_counter() - c0
runs = []
for seed in (0, 1):  # other prompts the second time: no prefix-cache hits
    args = argparse.Namespace(num_prompts={n}, input_len={i}, output_len={o}, seed=seed,
                              random_range=None)
    runs.append(bench.run_throughput(llm, args)["output_tokens_per_s"])
print("RESULT " + json.dumps({{"startup_s": start, "output_tokens_per_s": runs,
                              "package": bench.__file__}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tree", action="append", required=True, help="name=directory")
    ap.add_argument("--order", default=None, help="comma list of tree names (default: each once)")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="b")
    ap.add_argument("--smoke", action="store_true", help="a toy model and 16 requests, on CPU")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    order = args.order.split(",") if args.order else list(trees)
    n, i, o = WORKLOADS[args.workload]
    model = args.model
    if args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.e2e_gpu import _tiny_config_dir

        model, n, i, o = _tiny_config_dir(args.model), 16, 32, 8
    code = CHILD.format(model=model, n=n, i=i, o=o)
    results = []
    for name in order:
        tree = os.path.abspath(trees[name])
        env = dict(os.environ, PYTHONPATH=tree)
        c0 = time.perf_counter()
        # cwd too: `python -c` puts the working directory ahead of PYTHONPATH.
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=tree, timeout=400)  # fmt: skip
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        res = {"tree": name, "dir": trees[name], "seconds": round(time.perf_counter() - c0, 1)}
        res.update(json.loads(line[0][7:]) if line else {"error": proc.stderr[-1500:]})
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(os.path.join(args.out, "ab_trees.json"), "w") as f:
            json.dump({"model": args.model, "workload": args.workload, "runs": results}, f,
                      indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
