"""Ragged paged attention: chunked prefill and mixed batches over the paged KV pool.

The query tokens of all requests are flattened ([T, H, D], request r owning
query_start_loc[r] : query_start_loc[r + 1]). Each request's tokens are cut into tiles of
tokens_per_tile = 64 // G tokens (a tile never spans two requests), and every tile attends
causally to its request's whole paged history, this step's tokens included (they were written
to the pool before the call). Tile metadata is computed here with a few XLA ops:

    tile i -> (request, first flat token, tokens in the tile, position of its first token)

The tile count is static: cdiv(T, tokens_per_tile) + R bounds it; unused tiles are empty.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import DEFAULT_LAYOUT, validate_attention_inputs, validate_kernel_shape
from pallas_kernels.decode import _pad_block_tables
from pallas_kernels.paged_kernel import ROWS, paged_attention_call
from pallas_kernels.tuning import KernelConfig, ragged_config


def tile_metadata(
    query_start_loc: jax.Array,  # i32[R + 1]
    seq_lens: jax.Array,  # i32[R]
    tokens_per_tile: int,
    num_tiles: int,
) -> jax.Array:  # i32[4, num_tiles]
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    tiles = (q_len + tokens_per_tile - 1) // tokens_per_tile
    ends = jnp.cumsum(tiles)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    req = jnp.minimum(jnp.searchsorted(ends, i, side="right"), len(seq_lens) - 1)
    local = (i - (ends - tiles)[req]) * tokens_per_tile
    valid = i < ends[-1]
    ntok = jnp.where(valid, jnp.clip(q_len[req] - local, 0, tokens_per_tile), 0)
    t0 = jnp.where(valid, query_start_loc[req] + local, 0)
    p0 = seq_lens[req] - q_len[req] + local
    return jnp.stack([req, t0, ntok, p0]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "layout", "config", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, K, D] ("NHD") or [num_blocks, K, block_size, D]
    v_cache: jax.Array,  # same as k_cache
    block_tables: jax.Array,  # i32[R, max_blocks]
    seq_lens: jax.Array,  # i32[R], context length including this step's tokens
    query_start_loc: jax.Array,  # i32[R + 1]
    *,
    scale: float,
    layout: str = DEFAULT_LAYOUT,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, num_heads, head_dim]; zeros past query_start_loc[R]
    _, bs, kh, d, group = validate_attention_inputs(
        q, k_cache, v_cache, block_tables, seq_lens, layout
    )
    r = seq_lens.shape[0]
    if query_start_loc.shape != (r + 1,) or query_start_loc.dtype != jnp.int32:
        raise ValueError(
            f"query_start_loc must be i32[{r + 1}], got {query_start_loc.dtype}"
            f"{list(query_start_loc.shape)}."
        )
    t = q.shape[0]
    if config is None:
        config = ragged_config(t, d, bs)
    if config.num_splits != 1:
        raise ValueError("ragged_paged_attention does not split keys; use num_splits=1.")
    validate_kernel_shape(d, bs, group, config.block_kv)
    tpt = ROWS // group
    num_tiles = -(-t // tpt) + r
    meta = tile_metadata(query_start_loc, seq_lens, tpt, num_tiles)
    # Pad one tile of rows so that every tile's TMA stays in bounds.
    q_t = q.reshape(t, kh, group, d).swapaxes(0, 1).reshape(kh, t * group, d)
    q_t = jnp.pad(q_t, ((0, 0), (0, tpt * group), (0, 0)))
    out = paged_attention_call(
        meta,
        _pad_block_tables(block_tables, config.block_kv // bs),
        q_t,
        k_cache,
        v_cache,
        group=group,
        tokens_per_tile=tpt,
        block_size=bs,
        scale=scale,
        layout=layout,
        config=config,
        num_tokens=t,
        interpret=interpret,
    )
    out = out.reshape(kh, t, group, d).swapaxes(0, 1).reshape(q.shape)
    # Tokens past query_start_loc[R] belong to no tile: define them as zeros.
    real = jnp.arange(t, dtype=jnp.int32) < query_start_loc[-1]
    return jnp.where(real[:, None, None], out, jnp.zeros_like(out))
