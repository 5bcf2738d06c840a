"""Reference attention backend: plain jnp over the paged KV pool, runs on any device.

Layout of each of K and V per layer: [num_blocks, block_size, num_kv_heads, head_dim].
The write is an XLA scatter into the flattened slots (in place when the pool is donated).
Attention walks each token's block table in chunks of keys with an online softmax, so memory
stays O(tokens x chunk) instead of O(tokens x max_model_len); the loop runs only as far as
the longest sequence in the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.attention.backend import KVCache
from jaxpaged.attention.metadata import AttentionMetadata

_KEYS_PER_CHUNK = 128
_NEG_INF = -1e30


class ReferenceBackend:
    name = "reference"

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def __call__(
        self,
        q: jax.Array,  # [T, H, D]
        k: jax.Array,  # [T, K, D]
        v: jax.Array,  # [T, K, D]
        kv_cache: KVCache,
        md: AttentionMetadata,
        scale: float,
    ) -> tuple[jax.Array, KVCache]:
        k_cache = write_kv(kv_cache[0], k, md.slot_mapping)
        v_cache = write_kv(kv_cache[1], v, md.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, md, scale)
        return out, (k_cache, v_cache)


def write_kv(cache: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """cache [N, bs, K, D] with new [T, K, D] written at flat slots slot_mapping i32[T]."""
    n, bs, kh, d = cache.shape
    flat = cache.reshape(n * bs, kh, d).at[slot_mapping].set(new.astype(cache.dtype))
    return flat.reshape(n, bs, kh, d)


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_cache: jax.Array,  # [N, bs, K, D]
    v_cache: jax.Array,  # [N, bs, K, D]
    md: AttentionMetadata,
    scale: float,
) -> jax.Array:  # [T, H, D]
    t, h, d = q.shape
    _, bs, kh, _ = k_cache.shape
    g = h // kh
    blocks_per_chunk = max(1, _KEYS_PER_CHUNK // bs)
    req = md.token_req_idx
    # Position of each token: the last query_len tokens of its sequence are this step's.
    q_end = md.query_start_loc[req + 1]
    pos = md.seq_lens[req] - (q_end - jnp.arange(t, dtype=jnp.int32))  # i32[T], < 0 for padding
    tables = md.block_tables[req]  # i32[T, W]
    width = tables.shape[1]
    pad = (-width) % blocks_per_chunk
    tables = jnp.pad(tables, ((0, 0), (0, pad)))
    keys_per_chunk = blocks_per_chunk * bs
    num_chunks = (jnp.max(md.seq_lens) + keys_per_chunk - 1) // keys_per_chunk
    qg = q.reshape(t, kh, g, d).astype(jnp.float32) * scale

    def body(c, carry):
        m, denom, acc = carry
        blk = jax.lax.dynamic_slice_in_dim(tables, c * blocks_per_chunk, blocks_per_chunk, 1)
        kc = k_cache[blk].reshape(t, keys_per_chunk, kh, d).astype(jnp.float32)
        vc = v_cache[blk].reshape(t, keys_per_chunk, kh, d).astype(jnp.float32)
        key_pos = c * keys_per_chunk + jnp.arange(keys_per_chunk, dtype=jnp.int32)
        valid = key_pos[None, :] <= pos[:, None]  # [T, S]: causal and inside the sequence
        s = jnp.einsum("tkgd,tskd->tkgs", qg, kc)
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        # Zero masked values too: unused pages may hold anything, and 0 * NaN is NaN.
        vc = jnp.where(valid[:, :, None, None], vc, 0.0)
        acc = acc * alpha[..., None] + jnp.einsum("tkgs,tskd->tkgd", p, vc)
        return m_new, denom * alpha + p.sum(-1), acc

    init = (
        jnp.full((t, kh, g), _NEG_INF, jnp.float32),
        jnp.zeros((t, kh, g), jnp.float32),
        jnp.zeros((t, kh, g, d), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.reshape(t, h, d).astype(q.dtype)
