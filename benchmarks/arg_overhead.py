"""What an executable call costs the host per argument buffer, and whether stacked layer
weights (one array per kind, sliced statically in an unrolled loop) cost device time.

    PYTHONPATH=. python benchmarks/arg_overhead.py --out $OUT [--smoke]

benchmarks/cuda_graphs.py found the step's call returning after ~15 us per argument with
the whole step in two replayed CUDA graphs. Here:
1. args: a jitted sum over n tiny arrays (n = 8 ... 512), as separate arguments, as the
   AOT-compiled executable, and as one stacked array: time for the call to return.
2. mlp: an unrolled 32-layer bf16 MLP at batch 1 with Llama-3-8B widths (gate, up, down),
   per-layer weight arrays (96 arguments) against one stacked array per kind (3 arguments,
   w[l] sliced statically): call return and wall per call (device bound when the host
   keeps up); equal walls mean the static slices are not copies.
Results: $OUT/arg_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def timed_calls(fn, args, n: int = 50) -> tuple[float, float]:
    """(mean ms for the call to return, wall ms per call) over n back-to-back calls."""
    import jax

    for _ in range(3):
        out = fn(*args)
    jax.block_until_ready(out)
    calls = []
    start = time.perf_counter()
    for _ in range(n):
        c0 = time.perf_counter()
        out = fn(*args)
        calls.append(time.perf_counter() - c0)
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    return 1e3 * sum(calls[3:]) / (n - 3), 1e3 * wall / n


def per_arg() -> list[dict]:
    import jax
    import jax.numpy as jnp

    rows = []
    for n in (8, 64, 256, 512):
        xs = [jnp.full((64,), i, jnp.float32) for i in range(n)]
        f = jax.jit(lambda *xs: sum(x[0] for x in xs))
        stacked = jnp.stack(xs)
        g = jax.jit(lambda s: s[:, 0].sum())
        row = {"n": n}
        row["jit_call_ms"], _ = timed_calls(f, xs)
        row["compiled_call_ms"], _ = timed_calls(f.lower(*xs).compile(), xs)
        row["stacked_call_ms"], _ = timed_calls(g, [stacked])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mlp(smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp

    layers, d, f = (4, 64, 128) if smoke else (32, 4096, 14336)
    key = jax.random.key(0)
    gate = jax.random.normal(key, (layers, d, f), jnp.bfloat16) * 0.01
    up = jax.random.normal(key, (layers, d, f), jnp.bfloat16) * 0.01
    down = jax.random.normal(key, (layers, f, d), jnp.bfloat16) * 0.01
    split = [(gate[i], up[i], down[i]) for i in range(layers)]
    split = jax.block_until_ready(jax.tree.map(jnp.copy, split))

    def per_layer(ws, x):
        for a, b, c in ws:
            x = x + (jax.nn.silu(x @ a) * (x @ b)) @ c
        return x

    def stacked(a, b, c, x):
        for i in range(layers):
            x = x + (jax.nn.silu(x @ a[i]) * (x @ b[i])) @ c[i]
        return x

    x = jnp.zeros((1, d), jnp.bfloat16)
    floor_ms = 3 * layers * d * f * 2 / 3.2e12 * 1e3
    res = {"layers": layers, "weight_read_floor_ms_at_3.2TBps": floor_ms}
    res["per_layer_call_ms"], res["per_layer_wall_ms"] = timed_calls(jax.jit(per_layer), [split, x])
    res["stacked_call_ms"], res["stacked_wall_ms"] = timed_calls(
        jax.jit(stacked), [gate, up, down, x]
    )
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import jax

    results = {"device": str(jax.devices()[0]), "args": per_arg(), "mlp": mlp(args.smoke)}
    with open(os.path.join(args.out, "arg_overhead.json"), "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
