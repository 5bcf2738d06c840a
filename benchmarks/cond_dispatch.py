"""Does a lax.cond after heavy device work make the executable call block the host?

    PYTHONPATH=. python benchmarks/cond_dispatch.py   (one child process per XLA_FLAGS variant)

XLA:GPU runs a conditional by copying its predicate to the host, which waits for all earlier
work on the stream, so the call returns only when the device is nearly done. Printed per
variant: how long the call takes to return, and the device time of the whole step.

This micro-benchmark's cond did not block, but in the engine's step one did: a profiler
trace (benchmarks/device_idle.py) found the 8B step's call inside one XLA conditional for
4.1 of its 5.7 ms, and the sampler now has none (docs/benchmarks.md, 2026-12-02 afternoon).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "cmdbuf_conditional": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
    "CONDITIONAL,WHILE",
    "cmdbuf_conditional_min1": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
    "CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1",
}


def child() -> None:
    import jax
    import jax.numpy as jnp

    n = 8192
    w = jnp.ones((n, n), jnp.bfloat16) * 0.001

    def heavy(x):
        for _ in range(8):
            x = jnp.tanh(x @ w)
        return x

    def with_cond(x, flag):
        y = heavy(x)
        return jax.lax.cond(flag, lambda a: a * 2, lambda a: a + 1, y)

    def no_cond(x, flag):
        y = heavy(x)
        return jnp.where(flag, y * 2, y + 1)

    out = {}
    x = jnp.ones((n, n), jnp.bfloat16)
    flag = jnp.bool_(True)
    for name, fn in (("cond", with_cond), ("no_cond", no_cond)):
        f = jax.jit(fn).lower(x, flag).compile()
        jax.block_until_ready(f(x, flag))
        calls, totals = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            y = f(x, flag)
            calls.append(time.perf_counter() - t0)
            jax.block_until_ready(y)
            totals.append(time.perf_counter() - t0)
        out[name] = {"call_return_ms": min(calls) * 1e3, "total_ms": min(totals) * 1e3}
    print("RESULT " + json.dumps(out))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return
    results = {}
    for name, flags in VARIANTS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results[name] = json.loads(line[0][7:]) if line else {"error": proc.stderr[-600:]}
        print(name, json.dumps(results[name]), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cond_dispatch.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
