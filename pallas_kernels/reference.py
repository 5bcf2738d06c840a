"""Plain-jnp references with the same signatures as the kernels (f32 math, any device).

Each reference gathers every request's blocks into a dense [max_blocks * block_size] history,
masks keys past the causal limit to -inf and zeroes them (so NaN in unused pages cannot leak
through 0 * NaN), and runs softmax attention in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import DEFAULT_LAYOUT, validate_attention_inputs


def _gather_history(cache: jax.Array, block_tables: jax.Array, layout: str) -> jax.Array:
    """[R, max_blocks * block_size, K, D] dense history of each request."""
    pages = cache[block_tables]  # [R, max_blocks, bs, K, D] or [R, max_blocks, K, bs, D]
    if layout == "HND":
        pages = pages.swapaxes(2, 3)
    r, mb, bs, kh, d = pages.shape
    return pages.reshape(r, mb * bs, kh, d)


def _attend(q, keys, values, key_ok, scale):
    """q [T, K, G, D]; keys/values [T, S, K, D]; key_ok bool[T, S] -> [T, K, G, D] f32."""
    keys = jnp.where(key_ok[:, :, None, None], keys.astype(jnp.float32), 0.0)
    values = jnp.where(key_ok[:, :, None, None], values.astype(jnp.float32), 0.0)
    s = jnp.einsum("tkgd,tskd->tkgs", q.astype(jnp.float32), keys) * scale
    s = jnp.where(key_ok[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("tkgs,tskd->tkgd", p, values)
    return jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, K, D] ("NHD") or [num_blocks, K, block_size, D]
    v_cache: jax.Array,  # same as k_cache
    block_tables: jax.Array,  # i32[R, max_blocks]
    seq_lens: jax.Array,  # i32[R], context length including this step's tokens
    query_start_loc: jax.Array,  # i32[R + 1]
    *,
    scale: float,
    layout: str = DEFAULT_LAYOUT,
) -> jax.Array:  # [T, num_heads, head_dim]
    """Causal attention of each request's query tokens to its paged history.

    Token t of request r sits at position seq_lens[r] - (query_start_loc[r + 1] - t) and sees
    keys at positions <= its own. Tokens past query_start_loc[R] get zeros.
    """
    _, _, kh, d, group = validate_attention_inputs(
        q, k_cache, v_cache, block_tables, seq_lens, layout
    )
    t = q.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    req = jnp.clip(jnp.searchsorted(query_start_loc, tok, side="right") - 1, 0, len(seq_lens) - 1)
    real = tok < query_start_loc[-1]
    pos = seq_lens[req] - (query_start_loc[req + 1] - tok)
    keys = _gather_history(k_cache, block_tables, layout)[req]  # [T, S, K, D]
    values = _gather_history(v_cache, block_tables, layout)[req]
    key_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)
    key_ok = (key_pos[None, :] <= pos[:, None]) & real[:, None]
    out = _attend(q.reshape(t, kh, group, d), keys, values, key_ok, scale)
    return out.reshape(q.shape).astype(q.dtype)


def decode_paged_attention_reference(
    q: jax.Array,  # [B, num_heads, head_dim], one query token per sequence
    k_cache: jax.Array,  # [num_blocks, block_size, K, D] ("NHD") or [num_blocks, K, block_size, D]
    v_cache: jax.Array,  # same as k_cache
    block_tables: jax.Array,  # i32[B, max_blocks]
    seq_lens: jax.Array,  # i32[B], keys to attend to (0: padding row, output zeros)
    *,
    scale: float,
    layout: str = DEFAULT_LAYOUT,
) -> jax.Array:  # [B, num_heads, head_dim]
    b = q.shape[0]
    query_start_loc = jnp.arange(b + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=scale, layout=layout
    )


def write_kv_reference(
    k_cache: jax.Array,  # layout-dependent pool, see pallas_kernels.common
    v_cache: jax.Array,
    k: jax.Array,  # [T, K, D] new keys
    v: jax.Array,  # [T, K, D] new values
    slot_mapping: jax.Array,  # i32[T], block_id * block_size + offset
    *,
    layout: str = DEFAULT_LAYOUT,
) -> tuple[jax.Array, jax.Array]:
    """Writes token t's K/V into slot slot_mapping[t], one token at a time (unvectorized);
    a token whose slot is in the null block 0 is padding and is not written."""
    bs = _block_size(k_cache, layout)

    def write(i, caches):
        kc, vc = caches
        blk, off = slot_mapping[i] // bs, slot_mapping[i] % bs
        if layout == "NHD":
            return kc.at[blk, off].set(k[i]), vc.at[blk, off].set(v[i])
        return kc.at[blk, :, off].set(k[i]), vc.at[blk, :, off].set(v[i])

    def write_one(i, caches):
        return jax.lax.cond(slot_mapping[i] < bs, lambda c: c, lambda c: write(i, c), caches)

    return jax.lax.fori_loop(0, k.shape[0], write_one, (k_cache, v_cache))


def _block_size(cache: jax.Array, layout: str) -> int:
    return cache.shape[1] if layout == "NHD" else cache.shape[2]
