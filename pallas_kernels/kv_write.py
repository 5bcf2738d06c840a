"""Writes this step's new K/V into their pool slots with one in-place XLA scatter per array.

Under jax.jit with the pool donated, XLA updates the pool in place: the write moves
2 * T * K * D elements, not the pool. A fused write inside the attention kernel was not built:
docs/kernels.md gives the measured cost of this scatter next to the attention time.

Padding tokens point at slots of the null block 0. They are not written: each is moved to its
own slot past the pool's end, which the scatter drops, so that every index is distinct and the
scatter can say so (`unique_indices`). Without that promise XLA:GPU updates every element with
an atomic read-modify-write (a compare-and-swap loop for 16-bit types), which held the write to
~0.14 TB/s: 13.5 ms of a ~50 ms, 16,384-token prefill step on the Qwen3-0.6B shape (H200,
docs/benchmarks.md). Real tokens' slots are distinct: a step writes each slot at most once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    slots = distinct_slots(slot_mapping, nb, bs)
    put = dict(mode="drop", unique_indices=True)
    if layout == "NHD":
        flat = (nb * bs, kh, d)
        k_cache = k_cache.reshape(flat).at[slots].set(k, **put)
        v_cache = v_cache.reshape(flat).at[slots].set(v, **put)
        return k_cache.reshape(nb, bs, kh, d), v_cache.reshape(nb, bs, kh, d)
    blk, off = slots // bs, slots % bs
    k_cache = k_cache.at[blk, :, off].set(k, **put)
    v_cache = v_cache.at[blk, :, off].set(v, **put)
    return k_cache, v_cache


def distinct_slots(slot_mapping: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """slot_mapping with each null-block (padding) slot moved to its own slot past the pool's
    num_blocks * block_size slots: distinct when the real slots are."""
    past_end = num_blocks * block_size + jnp.arange(slot_mapping.shape[0], dtype=jnp.int32)
    return jnp.where(slot_mapping < block_size, past_end, slot_mapping)
