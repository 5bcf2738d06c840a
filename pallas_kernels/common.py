"""KV pool layouts and input validation shared by the paged-attention kernels.

A layer's pool is two arrays, K and V, each in one of two layouts:

    "NHD"  [num_blocks, block_size, num_kv_heads, head_dim]   (token-major; the reference's)
    "HND"  [num_blocks, num_kv_heads, block_size, head_dim]   (head-major inside a block)

The kernels read one (block, kv head) page of [block_size, head_dim] per TMA copy in either
layout; docs/kernels.md records which one measured faster and is the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYOUTS = ("NHD", "HND")
DEFAULT_LAYOUT = "NHD"


def kv_cache_shape(
    layout: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int, int, int]:
    if layout == "NHD":
        return (num_blocks, block_size, num_kv_heads, head_dim)
    if layout == "HND":
        return (num_blocks, num_kv_heads, block_size, head_dim)
    raise ValueError(f"Unknown KV layout {layout!r}; choose one of {LAYOUTS}.")


def cache_dims(k_cache: jax.Array, layout: str) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_dim) of a pool array."""
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be 4-D ({layout}), got shape {k_cache.shape}.")
    if layout == "NHD":
        nb, bs, kh, d = k_cache.shape
    elif layout == "HND":
        nb, kh, bs, d = k_cache.shape
    else:
        raise ValueError(f"Unknown KV layout {layout!r}; choose one of {LAYOUTS}.")
    return nb, bs, kh, d


def validate_attention_inputs(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # layout-dependent, see module docstring
    v_cache: jax.Array,  # same shape as k_cache
    block_tables: jax.Array,  # i32[R, max_blocks]
    seq_lens: jax.Array,  # i32[R]
    layout: str,
) -> tuple[int, int, int, int, int]:
    """Checks shapes and dtypes; returns (num_blocks, block_size, num_kv_heads, head_dim, G)."""
    nb, bs, kh, d = cache_dims(k_cache, layout)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}.")
    if q.ndim != 3 or q.shape[2] != d:
        raise ValueError(f"q must be [T, num_heads, {d}], got shape {q.shape}.")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"q, k_cache, v_cache dtypes must match, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}."
        )
    num_heads = q.shape[1]
    if num_heads % kh:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kh}.")
    group = num_heads // kh
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
        raise ValueError(
            f"block_tables must be i32[R, max_blocks], got {block_tables.dtype}"
            f"{list(block_tables.shape)}."
        )
    if seq_lens.shape != (block_tables.shape[0],) or seq_lens.dtype != jnp.int32:
        raise ValueError(
            f"seq_lens must be i32[{block_tables.shape[0]}], got {seq_lens.dtype}"
            f"{list(seq_lens.shape)}."
        )
    return nb, bs, kh, d, group


def validate_kernel_shape(head_dim: int, block_size: int, group: int, block_kv: int) -> None:
    """Limits of the Mosaic GPU kernel (the references take any shape)."""
    if head_dim % 64:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 64 for the GPU kernel.")
    if block_size % 8 or block_kv % block_size:
        raise ValueError(
            f"block_size={block_size} must be a multiple of 8 dividing block_kv={block_kv}."
        )
    if not 1 <= group <= 64:
        raise ValueError(f"GQA group size {group} must be in [1, 64] for the GPU kernel.")
