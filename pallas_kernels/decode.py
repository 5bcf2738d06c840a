"""Decode paged attention: one query token per sequence against the paged KV pool.

Each (sequence, KV head, split) is one program of the shared Mosaic GPU kernel
(pallas_kernels.paged_kernel) with a tile of one token and G query heads. With split-K the
sequence's key steps are divided evenly among `num_splits` programs, each writing a
normalized partial output and its log2-sum-exp; a small XLA epilogue merges them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import (
    DEFAULT_LAYOUT,
    validate_attention_inputs,
    validate_kernel_shape,
)
from pallas_kernels.paged_kernel import paged_attention_call
from pallas_kernels.tuning import KernelConfig, decode_config


def _pad_block_tables(block_tables: jax.Array, multiple: int) -> jax.Array:
    pad = -block_tables.shape[1] % multiple
    return jnp.pad(block_tables, ((0, 0), (0, pad))) if pad else block_tables


def _merge_splits(o_part: jax.Array, lse: jax.Array, group: int) -> jax.Array:
    """o_part [S, K, B * G, D], lse f32[S, K, B, 64] -> f32[K, B * G, D]."""
    s, kh, rows, d = o_part.shape
    lse = lse[..., :group].reshape(s, kh, rows)
    top = jnp.max(lse, axis=0)
    w = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0)[None])
    total = jnp.sum(w, axis=0)
    out = jnp.einsum("skr,skrd->krd", w, o_part.astype(jnp.float32))
    return out / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "layout", "config", "interpret"))
def decode_paged_attention(
    q: jax.Array,  # [B, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, K, D] ("NHD") or [num_blocks, K, block_size, D]
    v_cache: jax.Array,  # same as k_cache
    block_tables: jax.Array,  # i32[B, max_blocks]
    seq_lens: jax.Array,  # i32[B], keys to attend to (0: padding row, output zeros)
    *,
    scale: float,
    layout: str = DEFAULT_LAYOUT,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, num_heads, head_dim]
    _, bs, kh, d, group = validate_attention_inputs(
        q, k_cache, v_cache, block_tables, seq_lens, layout
    )
    b = q.shape[0]
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {b} sequences.")
    if config is None:
        config = decode_config(b, kh, d, bs, block_tables.shape[1] * bs)
    validate_kernel_shape(d, bs, group, config.block_kv)
    tok = jnp.arange(b, dtype=jnp.int32)
    meta = jnp.stack([tok, tok, jnp.ones_like(tok), seq_lens - 1])
    q_t = q.reshape(b, kh, group, d).swapaxes(0, 1).reshape(kh, b * group, d)
    out = paged_attention_call(
        meta,
        _pad_block_tables(block_tables, config.block_kv // bs),
        q_t,
        k_cache,
        v_cache,
        group=group,
        tokens_per_tile=1,
        block_size=bs,
        scale=scale,
        layout=layout,
        config=config,
        num_tokens=b,
        interpret=interpret,
    )
    if config.num_splits > 1:
        out = _merge_splits(*out, group)
    return out.reshape(kh, b, group, d).swapaxes(0, 1).reshape(q.shape).astype(q.dtype)
