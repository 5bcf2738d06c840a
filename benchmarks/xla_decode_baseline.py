"""A plain-XLA decode step, the baseline of the GPU performance issue.

Unrolled layers, per-layer weight arrays, a contiguous per-layer KV cache [B, L, K, D]
donated into the step, einsum attention over the whole cache masked to each sequence's
length, greedy argmax. No paging, no scheduler: the shape GPU_NOTES measured at 1.10x the
floor at batch 1. `measure(model)` times it at the issue's four points.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxpaged.models.loader import config_from_preset

POINTS = {"B1_ctx512": (1, 512), "B1_ctx4096": (1, 4096), "B32_ctx1024": (32, 1024),
          "B128_ctx512": (128, 512)}  # fmt: skip


def _params(c, key, dtype):
    e, f, hd, kd = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    )
    shapes = {"wq": (e, hd), "wk": (e, kd), "wv": (e, kd), "wo": (hd, e), "wg": (e, f),
              "wu": (e, f), "wd": (f, e)}  # fmt: skip

    def layer(k):
        ks = jax.random.split(k, len(shapes))
        return {n: (jax.random.normal(kk, s, jnp.float32) * 0.02).astype(dtype)
                for kk, (n, s) in zip(ks, shapes.items(), strict=True)}  # fmt: skip

    keys = jax.random.split(key, c.num_layers + 2)
    return {
        "layers": [layer(k) for k in keys[: c.num_layers]],
        "embed": (jax.random.normal(keys[-2], (c.vocab_size, e)) * 0.02).astype(dtype),
        "head": (jax.random.normal(keys[-1], (e, c.vocab_size)) * 0.02).astype(dtype),
    }


def _rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def make_step(c):
    kh, g, d = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim

    def step(params, caches, tokens, pos):  # tokens, pos: i32[B]
        x = params["embed"][tokens]
        b = x.shape[0]
        new = []
        for p, (kc, vc) in zip(params["layers"], caches, strict=True):
            h = _rms(x)
            q = (h @ p["wq"]).reshape(b, kh, g, d)
            kc = kc.at[jnp.arange(b), pos].set((h @ p["wk"]).reshape(b, kh, d))
            vc = vc.at[jnp.arange(b), pos].set((h @ p["wv"]).reshape(b, kh, d))
            s = jnp.einsum("bkgd,blkd->bkgl", q, kc).astype(jnp.float32) / d**0.5
            mask = jnp.arange(kc.shape[1])[None, :] <= pos[:, None]
            s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
            o = jnp.einsum("bkgl,blkd->bkgd", jax.nn.softmax(s, -1).astype(x.dtype), vc)
            x = x + o.reshape(b, -1) @ p["wo"]
            h = _rms(x)
            x = x + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]
            new.append((kc, vc))
        return jnp.argmax(_rms(x) @ params["head"], -1).astype(jnp.int32), new

    return jax.jit(step, donate_argnums=(1,))


def model_config(model: str, smoke: bool = False):
    """The preset's config; with `smoke`, the same family at toy size (runs on CPU)."""
    c = config_from_preset(model)
    if smoke:
        from dataclasses import replace

        c = replace(c, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                    num_kv_heads=2, head_dim=16, vocab_size=256)  # fmt: skip
    return c


def measure(model: str, smoke: bool = False, iters: int = 20) -> dict:
    c = model_config(model, smoke)
    points = POINTS
    if smoke:
        points, iters = {"B2_ctx64": (2, 64)}, 3
    dtype = jnp.bfloat16
    params = _params(c, jax.random.key(0), dtype)
    step = make_step(c)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    out = {"weight_bytes": weight_bytes}
    for name, (b, ctx) in points.items():
        shape = (b, ctx, c.num_kv_heads, c.head_dim)
        caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers)]
        tokens = jnp.zeros((b,), jnp.int32)
        pos = jnp.full((b,), ctx - 1, jnp.int32)  # attend over the full context
        tokens, caches = step(params, caches, tokens, pos)
        jax.block_until_ready(tokens)
        start = time.perf_counter()
        for _ in range(iters):
            tokens, caches = step(params, caches, tokens, pos)
        jax.block_until_ready(tokens)
        ms = (time.perf_counter() - start) / iters * 1e3
        kv_bytes = 2 * c.num_layers * b * ctx * c.num_kv_heads * c.head_dim * 2
        out[name] = {"ms_per_step": ms, "tokens_per_s": b / ms * 1e3, "kv_bytes": kv_bytes}
        del caches
    return out
