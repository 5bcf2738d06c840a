"""Pallas attention backend: jaxpaged's GPU path over the pallas_kernels Mosaic GPU kernels.

Per layer and step: one in-place XLA scatter writes this step's K/V into their slots, then the
decode kernel (md.decode_only: one query token per request) or the ragged kernel (chunked
prefill and mixed batches) attends over the paged pool. The pool layout per array is
[num_blocks, block_size, num_kv_heads, head_dim], the reference backend's (docs/kernels.md
says why). Call it under jax.jit with the KV caches donated so both updates stay in place.
`interpret=True` runs the same kernels in Mosaic GPU interpret mode on CPU (tests only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.attention.backend import KVCache
from jaxpaged.attention.metadata import AttentionMetadata
from pallas_kernels import (
    DEFAULT_LAYOUT,
    decode_paged_attention,
    kv_cache_shape,
    ragged_paged_attention,
    write_kv,
)


class PallasBackend:
    name = "pallas"

    def __init__(self, layout: str = DEFAULT_LAYOUT, interpret: bool = False):
        self.layout = layout
        self.interpret = interpret

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return kv_cache_shape(self.layout, num_blocks, block_size, num_kv_heads, head_dim)

    def __call__(
        self,
        q: jax.Array,  # [T, H, D]
        k: jax.Array,  # [T, K, D]
        v: jax.Array,  # [T, K, D]
        kv_cache: KVCache,
        md: AttentionMetadata,
        scale: float,
    ) -> tuple[jax.Array, KVCache]:  # out [T, H, D]
        k_cache, v_cache = kv_cache
        dtype = k_cache.dtype
        if dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"The pallas attention backend needs a bfloat16 or float16 KV cache, got "
                f"{dtype}; use dtype='bfloat16' or attention_backend='reference'."
            )
        k_cache, v_cache = write_kv(
            k_cache, v_cache, k.astype(dtype), v.astype(dtype), md.slot_mapping, layout=self.layout
        )
        common = dict(scale=float(scale), layout=self.layout, interpret=self.interpret)
        if md.decode_only:
            out = decode_paged_attention(
                q.astype(dtype), k_cache, v_cache, md.block_tables, md.seq_lens, **common
            )
        else:
            out = ragged_paged_attention(
                q.astype(dtype),
                k_cache,
                v_cache,
                md.block_tables,
                md.seq_lens,
                md.query_start_loc,
                **common,
            )
        return out.astype(q.dtype), (k_cache, v_cache)
