"""The attention backend interface: the model calls it once per layer.

A backend owns the layout of one layer's KV cache and does both the write of this step's
K/V into their slots and the attention over each request's paged history:

    (out, kv_cache) = backend(q, k, v, kv_cache, metadata, scale)

The runner allocates the pool with `backend.allocate_kv_cache` and never looks inside it.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from jaxpaged.attention.metadata import AttentionMetadata

KVCache = tuple[jax.Array, jax.Array]
"""One layer's (k_cache, v_cache); the shape is the backend's `kv_cache_shape`."""


class AttentionBackend(Protocol):
    name: str

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of each of K and V for one layer."""
        ...

    def __call__(
        self,
        q: jax.Array,  # [T, num_heads, head_dim]
        k: jax.Array,  # [T, num_kv_heads, head_dim]
        v: jax.Array,  # [T, num_kv_heads, head_dim]
        kv_cache: KVCache,
        md: AttentionMetadata,
        scale: float,
    ) -> tuple[jax.Array, KVCache]:  # out [T, num_heads, head_dim]
        ...


def allocate_kv_cache(
    backend: AttentionBackend,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> list[KVCache]:
    """One (K, V) pair of zeroed arrays per layer, allocated on device (per-layer arrays:
    a stacked pool would be copied whole when one layer is updated)."""
    shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(zeros(), zeros()) for _ in range(num_layers)]


def get_backend(name: str) -> AttentionBackend:
    """'reference' (pure jnp, any device) or 'pallas' (NVIDIA GPU kernels)."""
    if name == "reference":
        from jaxpaged.attention.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "pallas":
        from jaxpaged.attention.pallas import PallasBackend

        # Off the GPU the kernels can only run in Pallas interpret mode (slow; for tests).
        return PallasBackend(interpret=jax.default_backend() != "gpu")
    raise ValueError(f"Unknown attention backend {name!r}; choose 'reference' or 'pallas'.")


def default_backend_name() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "reference"
