"""Writes this step's new K/V into their pool slots with one in-place XLA scatter per array.

Under jax.jit with the pool donated, XLA updates the pool in place: the write moves
2 * T * K * D elements, not the pool. A fused write inside the attention kernel was not built:
docs/kernels.md gives the measured cost of this scatter next to the attention time.
Padding tokens point at slots of the null block 0; their writes collide harmlessly.
"""

from __future__ import annotations

import jax

from pallas_kernels.common import DEFAULT_LAYOUT, cache_dims


def write_kv(
    k_cache: jax.Array,  # [num_blocks, block_size, K, D] ("NHD") or [num_blocks, K, block_size, D]
    v_cache: jax.Array,  # same as k_cache
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # i32[T], block_id * block_size + offset
    *,
    layout: str = DEFAULT_LAYOUT,
) -> tuple[jax.Array, jax.Array]:
    nb, bs, kh, d = cache_dims(k_cache, layout)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}.")
    t = slot_mapping.shape[0]
    for name, x in (("k", k), ("v", v)):
        if x.shape != (t, kh, d):
            raise ValueError(f"{name} must be [{t}, {kh}, {d}], got shape {x.shape}.")
        if x.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} != cache dtype {k_cache.dtype}.")
    if layout == "NHD":
        flat = (nb * bs, kh, d)
        k_cache = k_cache.reshape(flat).at[slot_mapping].set(k, mode="drop")
        v_cache = v_cache.reshape(flat).at[slot_mapping].set(v, mode="drop")
        return k_cache.reshape(nb, bs, kh, d), v_cache.reshape(nb, bs, kh, d)
    blk, off = slot_mapping // bs, slot_mapping % bs
    k_cache = k_cache.at[blk, :, off].set(k, mode="drop")
    v_cache = v_cache.at[blk, :, off].set(v, mode="drop")
    return k_cache, v_cache
